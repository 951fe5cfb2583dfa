"""Lines in, lines out: encode, sort into batches, search, restore the input order, decode.

N lines in give N lines out, always: an empty line gives an empty line and a line longer
than the model accepts is truncated (with a warning naming it), never dropped. Lines are
sorted by length so batches hold similar lengths, and every sentence's search is
independent of the others in its batch, so the output does not depend on batch size.
``translate_each`` searches every batch under several settings after encoding it once
(choosing search settings on a validation set). With ``workers`` N, N batches are decoded
at once (``in_parallel``), each on its share of the cores; the output is the same for any N.

Input of any size streams through ``read_chunks`` and ``translate_stream``: a chunk of lines
at a time (the first of at most 64, doubling up to a budget), sorted and batched within
the chunk, its translations handed back in input order before the next chunk is read. A
chunk is also cut when no more input is waiting, so a line typed into a pipe is translated
at once. Memory is bounded by the chunk, and the output is the same for any chunk size,
since it is for any batch size.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, TypeVar

import torch

from nmt.config import SearchConfig
from nmt.data import decode_lines
from nmt.errors import NmtError
from nmt.models.base import Seq2Seq
from nmt.search import Hypothesis, search
from nmt.tokenizer import EOS, PAD, Tokenizer

log = logging.getLogger("nmt")
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Translation:
    line: int  # 0-based input line
    texts: list[str]  # n-best, best first
    hypotheses: list[Hypothesis]
    # Per hypothesis, with keep_attention: word alignment "i-j ..." (see word_alignment).
    alignments: list[str] = field(default_factory=list)


@dataclass
class Decoding:
    cfg: SearchConfig
    translations: list[Translation]
    seconds: float  # spent searching under this config (the encoder, shared by all, excluded)


def length_batches(lengths: list[int], order: list[int], max_tokens: int,
                   max_sentences: int) -> Iterable[list[int]]:
    """Consecutive runs of ``order``, each within ``max_sentences`` and ``max_tokens`` padded tokens."""
    batch: list[int] = []
    longest = 0
    for i in order:
        longest = max(longest, lengths[i])
        if batch and (len(batch) >= max_sentences or longest * (len(batch) + 1) > max_tokens):
            yield batch
            batch, longest = [], lengths[i]
        batch.append(i)
    if batch:
        yield batch


def source_ids(tokenizer: Tokenizer, lines: list[str], limit: int, source_name: str,
               first_line: int = 0) -> list[list[int]]:
    """The ids of each stripped line, cut to ``limit`` with a warning naming the line."""
    ids = tokenizer.encode([line.strip() for line in lines])
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            log.warning("%s:%d: %d subword tokens, truncated to the model's limit of %d",
                        source_name, first_line + i + 1, len(seq), limit)
            ids[i] = seq[:limit]
    return ids


# --- parallel batches ------------------------------------------------------------------------

def default_workers(device: str | torch.device) -> int:
    """Batches decoded at once when the user does not say: 2 on a CPU with at least two intra-op
    threads, 1 on a GPU (one batch at a time fills it).

    Measured on a 2-core Xeon (AVX-512), the Multi30k 3+3 Transformer on test2016, 2 workers of
    1 thread against 1 of 2, the same output (bench/decode_workers.py, median of 3): float32
    beam 5 101.3 against 94.3 sentences/s, greedy 288 against 276; int8 beam 5 123.1 against
    104.4, greedy 390 against 376. CTranslate2's own engine gains likewise from inter_threads 2
    (bench/decode_speed.py --ctranslate2).
    """
    return 2 if torch.device(device).type == "cpu" and torch.get_num_threads() >= 2 else 1


def in_parallel(fn: Callable[[T], R], items: list[T], workers: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) for every item, as each is done, ``workers`` of them computed at once.

    The workers are threads of this process, each on ``torch.get_num_threads() // workers``
    intra-op threads (at least one) for the length of the call: on a small model two
    batches decoded at once with one thread each keep the cores busier than one batch on
    two threads, whose steps are too small to split well. Threads, not processes: PyTorch
    releases the GIL inside its operators, which is most of a decoding step; the threads
    share the model without a copy and hand back results without pickling; and a process
    forked after OpenMP has run hangs at its first parallel region with more than one
    intra-op thread (GNU OpenMP's thread pool does not survive a fork), which would hold
    processes to one thread each. On an error the batches not yet started are dropped and
    the error is raised once the running ones end.
    """
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield item, fn(item)
        return
    threads = torch.get_num_threads()
    # The count is process-wide: each worker thread takes it up at its first operator.
    torch.set_num_threads(max(1, threads // workers))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="nmt-decode")
    try:
        futures = {pool.submit(fn, item): item for item in items}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


WORD_START = "\u2581"  # SentencePiece's mark of a piece that follows a space


def _word_of_piece(pieces: list[str]) -> list[int | None]:
    """The word (0-based, as the text splits on spaces) each piece belongs to; None for a bare
    space piece followed by another word start (it makes no word of its own)."""
    words: list[int | None] = []
    word = -1
    for i, piece in enumerate(pieces):
        if piece.startswith(WORD_START):
            if piece == WORD_START and (i + 1 == len(pieces) or pieces[i + 1].startswith(WORD_START)):
                words.append(None)
                continue
            word += 1
        words.append(max(word, 0))  # a first piece without the mark still begins word 0
    return words


def word_alignment(src_pieces: list[str], tgt_pieces: list[str], attention: torch.Tensor) -> list[tuple[int, int]]:
    """Word alignment from a hypothesis' attention (len(tgt_pieces) + 1, S): each target piece
    is aligned to the source piece it attends to most (EOS on either side left out), and
    the pairs are merged to words. Unique (source word, target word) pairs, sorted by target
    word, then source word."""
    if not src_pieces or not tgt_pieces:
        return []
    src_words, tgt_words = _word_of_piece(src_pieces), _word_of_piece(tgt_pieces)
    best = attention[: len(tgt_pieces), : len(src_pieces)].argmax(-1).tolist()  # (T,)
    pairs = {(src_words[s], tgt_words[j]) for j, s in enumerate(best)}
    return sorted(((i, j) for i, j in pairs if i is not None and j is not None), key=lambda p: (p[1], p[0]))


def _alignment_text(tokenizer: Tokenizer, src_ids: list[int], hyp: Hypothesis) -> str:
    """``word_alignment`` as Pharaoh text: 'i-j' pairs separated by spaces."""
    if hyp.attention is None:
        return ""
    pieces = tokenizer.sp.IdToPiece
    pairs = word_alignment([pieces(i) for i in src_ids], [pieces(i) for i in hyp.tokens], hyp.attention)
    return " ".join(f"{i}-{j}" for i, j in pairs)


def translate(model: Seq2Seq, tokenizer: Tokenizer, lines: list[str], cfg: SearchConfig,
              on_batch: Callable[[int], None] | None = None, keep_attention: bool = False,
              source_name: str = "<stdin>", first_line: int = 0, workers: int = 1) -> list[Translation]:
    """Translate ``lines``; ``on_batch(n)`` is told after each batch of n sentences.

    ``first_line``: how many lines of the input came before these (when it is read in
    chunks); ``Translation.line`` and warnings count from there, and sampling draws by it.
    ``keep_attention``: the hypotheses keep their attention, and ``Translation.alignments``
    holds each one's word alignment. ``workers``: batches decoded at once (see ``in_parallel``).
    """
    (decoding,) = translate_each(model, tokenizer, lines, [cfg], on_batch, keep_attention, source_name,
                                 first_line, workers)
    return decoding.translations


def translate_each(model: Seq2Seq, tokenizer: Tokenizer, lines: list[str], cfgs: list[SearchConfig],
                   on_batch: Callable[[int], None] | None = None, keep_attention: bool = False,
                   source_name: str = "<stdin>", first_line: int = 0, workers: int = 1) -> list[Decoding]:
    """Translate ``lines`` once under each of ``cfgs``, running the encoder once per batch.

    The configs must batch alike (``max_tokens``, ``max_sentences``); they may differ in
    anything the search alone uses (beam, penalties, length limits, stopping rule).
    ``workers``: batches decoded at once, each on its share of the intra-op threads
    (``in_parallel``); ``Decoding.seconds`` then sums the workers' search time.
    """
    first = cfgs[0]
    if any((c.max_tokens, c.max_sentences) != (first.max_tokens, first.max_sentences) for c in cfgs):
        raise ValueError("translate_each: the configs must have the same max_tokens and max_sentences")
    device = next(model.parameters()).device
    if workers > 1 and device.type != "cpu":
        raise NmtError(f"--workers {workers}: parallel batches are for decoding on the CPU; on {device.type} "
                       "one batch at a time already fills the device (give --workers 1)")
    ids = source_ids(tokenizer, lines, model.max_positions - 1, source_name, first_line)  # room for EOS
    results: list[list[Translation | None]] = [[None] * len(lines) for _ in cfgs]
    todo = [i for i, seq in enumerate(ids) if seq]
    for out, cfg in zip(results, cfgs):
        for i in set(range(len(lines))) - set(todo):
            out[i] = Translation(i, [""] * cfg.n_best, [])
    seconds = [0.0] * len(cfgs)
    lengths = [len(s) + 1 for s in ids]
    order = sorted(todo, key=lambda i: (lengths[i], i))

    def decode_batch(batch: list[int]) -> list[tuple[list[Translation], float]]:
        """Per config: the batch's translations and the seconds its search took."""
        src = torch.full((len(batch), max(lengths[i] for i in batch)), PAD, dtype=torch.long)  # (B, S)
        for row, i in enumerate(batch):
            src[row, : lengths[i]] = torch.tensor(ids[i] + [EOS])
        src, src_lens = src.to(device), torch.tensor([lengths[i] for i in batch]).to(device)
        with torch.no_grad():
            memory = model.encode(src, src_lens)
        found = []
        for cfg in cfgs:
            start = time.perf_counter()
            hyps = search(model, src, src_lens, cfg, keep_attention, memory,
                          torch.tensor([first_line + i for i in batch]))
            spent = time.perf_counter() - start
            translations = []
            for i, nbest in zip(batch, hyps):
                texts = tokenizer.decode([h.tokens for h in nbest])
                texts += [""] * (cfg.n_best - len(texts))
                translations.append(Translation(i, [t.replace("\n", " ") for t in texts], nbest,
                                                [_alignment_text(tokenizer, ids[i], h) for h in nbest]
                                                if keep_attention else []))
            found.append((translations, spent))
        return found

    was_training = model.training
    model.eval()
    try:
        batches = list(length_batches(lengths, order, first.max_tokens, first.max_sentences))
        for batch, found in in_parallel(decode_batch, batches, workers):
            for c, (out, (translations, spent)) in enumerate(zip(results, found)):
                seconds[c] += spent
                for t in translations:
                    out[t.line] = t
            if on_batch:
                on_batch(len(batch))
    finally:
        model.train(was_training)
    for out in results:  # lines counted in the whole input, not in this chunk of it
        for t in out:
            t.line += first_line
    return [Decoding(cfg, out, s) for cfg, out, s in zip(cfgs, results, seconds)]  # type: ignore[arg-type]


def translate_text(model: Seq2Seq, tokenizer: Tokenizer, lines: list[str],
                   cfg: SearchConfig, workers: int = 1) -> list[str]:
    """The best translation of each line."""
    return [t.texts[0] for t in translate(model, tokenizer, lines, cfg, workers=workers)]


# --- streaming: input of any size, a chunk at a time ---------------------------------------

FIRST_CHUNK = 16  # lines in the first chunk: the first translations come out soon
CHUNK_LINES = 2000  # the most lines in a chunk (the budget the chunks double up to)
READ_BYTES = 1 << 16


class _Lines:
    """Complete lines of a binary stream (bytes, without line ends), as they arrive.

    With a file descriptor (a pipe, a terminal, a file) ``waiting()`` asks ``select``
    whether more can be read now without blocking; reads go to the descriptor itself, so
    no buffer of Python's holds input that ``select`` cannot see. A stream without one
    (an in-memory buffer) always has more waiting until it ends.
    """

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            self.fd = None
        self.lines: deque[bytes] = deque()
        self.partial: list[bytes] = []  # a line whose end has not been read yet
        self.ended = False

    def waiting(self) -> bool:
        if self.ended:
            return False
        return self.fd is None or bool(select.select([self.fd], [], [], 0)[0])

    def read(self) -> None:
        """Read what there is (waiting for something if nothing is there yet)."""
        if self.fd is not None:
            data = os.read(self.fd, READ_BYTES)
        else:
            data = self.stream.read1(READ_BYTES) if hasattr(self.stream, "read1") else self.stream.read(READ_BYTES)
        if not data:
            self.ended = True
            if self.partial:  # a last line without a line end
                self.lines.append(b"".join(self.partial))
                self.partial = []
            return
        *complete, rest = data.split(b"\n")
        if complete:
            complete[0] = b"".join([*self.partial, complete[0]])
            self.partial = []
            self.lines.extend(complete)
        if rest:
            self.partial.append(rest)


def read_chunks(stream: BinaryIO, chunk_lines: int = CHUNK_LINES, first: int = FIRST_CHUNK,
                on_bad_line: str = "error", name: str = "<stdin>") -> Iterator[list[str]]:
    """The lines of a UTF-8 byte stream, a chunk at a time, as ``data.decode_lines`` reads them.

    The first chunk has at most ``first`` lines, each next one twice as many, up to
    ``chunk_lines``. A chunk is cut short when no more input is waiting, so that the lines
    typed so far into an interactive pipe are handed on without waiting for the end.
    Errors and warnings name lines by their number in the whole stream.
    """
    source = _Lines(stream)
    size, first_line = min(first, chunk_lines), 1
    while True:
        while len(source.lines) < size and not source.ended and (not source.lines or source.waiting()):
            source.read()
        if not source.lines:
            return
        raw = [source.lines.popleft() for _ in range(min(size, len(source.lines)))]
        yield decode_lines(b"".join(line + b"\n" for line in raw), name, on_bad_line, first_line)
        first_line += len(raw)
        size = min(2 * size, chunk_lines)


class Decode(Protocol):
    """What translates a list of lines: ``translate`` bound to a model, or an exported engine's."""

    def __call__(self, lines: list[str], cfg: SearchConfig, *, on_batch: Callable[[int], None] | None,
                 source_name: str, first_line: int) -> list[Translation]: ...


def translate_stream(decode: Decode, chunks: Iterable[list[str]], cfg: SearchConfig,
                     on_batch: Callable[[int], None] | None = None,
                     source_name: str = "<stdin>") -> Iterator[list[Translation]]:
    """The translations of each chunk, in input order, handed back before the next chunk is read.

    ``Translation.line`` counts lines from the start of the stream.
    """
    done = 0
    for lines in chunks:
        yield decode(lines, cfg, on_batch=on_batch, source_name=source_name, first_line=done)
        done += len(lines)
