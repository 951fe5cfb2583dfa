"""Vocabulary shortlists: each batch's output layer computed over a few target pieces only.

With an 8k joint vocabulary at d_model 256 the output projection is about 40% of a decoding
step's multiply-adds, and nearly all of it goes to pieces that cannot be in the translation.
A shortlist (Marian's ``--shortlist lex.s2t FIRST BEST``, CTranslate2's ``use_vmap``) lets a
sentence produce only its ``FIRST`` most frequent target pieces of the training data and the
``BEST`` likeliest translations of each of its source pieces.

The table: ``nmt shortlist RUN`` (``build``) estimates p(t|s), target piece given source
piece, with IBM Model 1 (Brown et al. 1993) on the run's prepared training data, the id
arrays the trainer reads (nmt/prepare.py), and keeps per source piece its translations with
p >= ``prune``, at most ``best``, best first, and the ``first`` most frequent target pieces.
Why Model 1: it needs no extra dependency (no fast_align, no GIZA++), its EM is a few
vectorized passes over the id arrays (seconds for Multi30k), and a shortlist asks of it only
each piece's few likeliest translations, where its known weaknesses matter little: it has no
notion of word order or distortion (a list has none either), and a rare source piece
collects the probability of unrelated frequent targets ("garbage collection"), which a
shortlist absorbs since those frequent pieces are in every list anyway.

EM runs over chunks of at most ``CHUNK_LINKS`` (source piece, target piece) links at a time,
so the links of the whole corpus are never in memory at once; what is kept is one
probability per distinct co-occurring pair (about 30 bytes each). That number grows with
the corpus, so EM reads at most ``MAX_PAIRS`` pairs, evenly spaced over the corpus (and the
printed line says how many it read); the frequency list counts every pair.

The file, ``RUN/shortlist.npz`` (numpy's uncompressed npz, written atomically; ``FORMAT``):
``frequent`` (F,) target pieces, most frequent first; ``offsets`` (V + 1,), ``targets`` and
``probs``: source piece s's translations are ``targets[offsets[s]:offsets[s + 1]]``, best
first, with their p(t|s); the build's ``first``, ``best``, ``prune``, ``pairs`` and
``iterations``; and ``spm_sha256``, the run's SentencePiece model: a table of another
tokenizer is refused.

Decoding (``Shortlisted``, ``search.shortlist`` / ``--shortlist FIRST,BEST``): for a batch,
the output layer is computed over the union U of its sentences' lists, and each row is
masked to its own sentence's list (its FIRST frequent pieces, the BEST translations of
each of its source pieces, and the special ids PAD, UNK, BOS, EOS, which the search's rules
treat as they do without a list), with the softmax over the allowed entries only. A
sentence's translation therefore does not depend on what it is batched with. CTranslate2's
vocabulary map (``write_vmap``, ``nmt export --shortlist``) restricts every sentence to the
union of its batch instead, with no per-sentence mask: its output can depend on the batch.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nmt.corpus import PreparedCorpus, TokenArray
from nmt.errors import NmtError
from nmt.files import sha256, write_bytes_atomic, write_text_atomic
from nmt.models.base import DecoderState, Memory, Seq2Seq
from nmt.quantize import OutputRows
from nmt.tokenizer import EOS, MODEL_FILE, PAD, Tokenizer

FILE = "shortlist.npz"
FORMAT = 1  # the version of the file's layout
FIRST, BEST, PRUNE = 1000, 100, 0.001  # what `nmt shortlist` keeps by default
ITERATIONS = 5  # EM iterations of Model 1: the best translations settle within a few
MAX_PAIRS = 1_000_000  # training pairs EM reads at most (see the module's doc)
CHUNK_LINKS = 1 << 22  # (source, target) links per EM chunk: ~100 MB of temporaries
CACHE_LINKS = 1 << 25  # up to this many links in all, each link's place in the table is kept (8 bytes each)
SPECIALS = torch.arange(EOS + 1)  # PAD, UNK, BOS, EOS: in every list, at their own columns


@dataclass
class Table:
    """A lexical shortlist table: see the module's doc for the fields."""

    frequent: np.ndarray  # (F,) int32 target pieces, most frequent first
    offsets: np.ndarray  # (V + 1,) int64
    targets: np.ndarray  # (E,) int32, each source piece's best first
    probs: np.ndarray  # (E,) float32 p(t|s)
    spm_sha256: str
    first: int  # the most frequent pieces kept
    best: int  # the most translations kept per source piece
    prune: float  # translations kept have p >= prune
    pairs: int  # training pairs EM read
    iterations: int

    @property
    def vocab_size(self) -> int:
        return len(self.offsets) - 1

    def translations(self, best: int) -> torch.Tensor:
        """(V, best) each source piece's ``best`` likeliest translations, PAD where it has fewer."""
        counts = np.diff(self.offsets)
        out = np.full((self.vocab_size, best), PAD, dtype=np.int64)
        rank = np.arange(len(self.targets)) - np.repeat(self.offsets[:-1], counts)  # place in its source's list
        keep = rank < best
        out[np.repeat(np.arange(self.vocab_size), counts)[keep], rank[keep]] = self.targets[keep]
        return torch.from_numpy(out)

    def check_sizes(self, first: int, best: int, path: Path) -> None:
        """Refuse sizes larger than what the table holds."""
        if first > self.first or best > self.best:
            raise NmtError(f"--shortlist {first},{best}: {path} holds at most {self.first} frequent pieces and "
                           f"{self.best} translations per source piece; ask for fewer, or build it again with "
                           f"nmt shortlist RUN --first {max(first, self.first)} --best {max(best, self.best)}")


# --- IBM Model 1 on the prepared id arrays ----------------------------------------------------

def _gather(side: TokenArray, pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of ``pairs`` on one side, end to end (int64), and their lengths."""
    lens = side.lens[pairs].astype(np.int64)
    starts = side.offsets[pairs].astype(np.int64)
    index = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
    return torch.from_numpy(side.tokens[index].astype(np.int64)), torch.from_numpy(lens)


def _links(src: torch.Tensor, src_lens: torch.Tensor, tgt: torch.Tensor, tgt_lens: torch.Tensor,
           null: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (source piece, target piece) link of a chunk of pairs: each target piece of a pair
    with each of the pair's source pieces and with NULL (id ``null``). Returns the source and
    target ids (M,) and the target piece each link belongs to (M,), an index into ``tgt``."""
    pair_of_word = torch.repeat_interleave(torch.arange(len(tgt_lens)), tgt_lens)  # (Tt,)
    fan = (src_lens + 1)[pair_of_word]  # (Tt,) the pair's source pieces and NULL
    word = torch.repeat_interleave(torch.arange(len(tgt)), fan)  # (M,)
    position = torch.arange(len(word)) - (torch.cumsum(fan, 0) - fan)[word]  # (M,) 0 .. |src|, |src| = NULL
    pair = pair_of_word[word]
    src_start = torch.cumsum(src_lens, 0) - src_lens
    at = (src_start[pair] + position).clamp(max=len(src) - 1)  # NULL's slot reads a neighbour, replaced below
    src_ids = torch.where(position == src_lens[pair], null, src[at])
    return src_ids, tgt[word], word


def _chunks(costs: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges whose costs sum to at most ``budget`` (at least one item each)."""
    total = np.cumsum(costs)
    ranges, start = [], 0
    while start < len(costs):
        base = total[start - 1] if start else 0
        end = max(int(np.searchsorted(total, base + budget, side="right")), start + 1)
        ranges.append((start, end))
        start = end
    return ranges


class _Pairs:
    """The training pairs EM reads (evenly spaced, at most ``limit``), in chunks of links."""

    def __init__(self, corpora: list[PreparedCorpus], limit: int):
        total = sum(len(c) for c in corpora)
        self.total = total
        self.used = min(total, limit)
        picked = np.unique(np.linspace(0, total - 1, self.used).round().astype(np.int64))
        bounds = np.cumsum([0] + [len(c) for c in corpora])
        self.parts = []  # (corpus, its picked pairs, [start, end) chunks of them)
        for corpus, lo, hi in zip(corpora, bounds[:-1], bounds[1:]):
            pairs = picked[(picked >= lo) & (picked < hi)] - lo
            costs = (corpus.src.lens[pairs].astype(np.int64) + 1) * corpus.tgt.lens[pairs]
            self.parts.append((corpus, pairs, _chunks(costs, CHUNK_LINKS)))

    def __iter__(self):
        """(source ids, source lengths, target ids, target lengths) of each chunk."""
        for corpus, pairs, ranges in self.parts:
            for start, end in ranges:
                yield (*_gather(corpus.src, pairs[start:end]), *_gather(corpus.tgt, pairs[start:end]))


def _slots(pairs, keys: torch.Tensor, vocab: int):
    """Per chunk of ``pairs``: each link's place in ``keys`` (M,) and its target piece (M,), both
    int32, and the chunk's number of target pieces."""
    for src, src_lens, tgt, tgt_lens in pairs:
        s, t, word = _links(src, src_lens, tgt, tgt_lens, vocab)
        yield torch.searchsorted(keys, s * vocab + t).int(), word.int(), len(tgt)


def ibm_model1(pairs, vocab_size: int, iterations: int = ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """p(t|s) by IBM Model 1's EM over ``pairs`` (an iterable of chunks, each (source ids,
    source lengths, target ids, target lengths), that can be iterated more than once).

    Returns the distinct co-occurring pairs as keys ``s * V + t`` (K,), sorted, with s = V for
    NULL, and their probabilities (K,). EM starts from the uniform table, so its first pass
    counts co-occurrences, each target piece shared equally among its pair's source pieces.
    """
    vocab = vocab_size
    keys, pending, links = torch.empty(0, dtype=torch.long), [], 0
    for src, src_lens, tgt, tgt_lens in pairs:
        s, t, _ = _links(src, src_lens, tgt, tgt_lens, vocab)
        pending.append(torch.unique(s * vocab + t))
        links += len(s)
        if sum(len(p) for p in pending) > max(len(keys), CHUNK_LINKS):  # merge seldom: each merge sorts all
            keys, pending = torch.unique(torch.cat([keys, *pending])), []
    keys = torch.unique(torch.cat([keys, *pending]))
    source = keys // vocab  # (K,) ascending: keys are sorted
    # Finding each link's place in the table costs most of a pass: kept when the links are few.
    cached = list(_slots(pairs, keys, vocab)) if links <= CACHE_LINKS else None
    prob = torch.ones(len(keys))
    for _ in range(iterations):
        counts = torch.zeros(len(keys), dtype=torch.float64)
        for slot, word, words in cached or _slots(pairs, keys, vocab):
            p = prob[slot]
            norm = torch.zeros(words).index_add_(0, word, p).clamp_(min=1e-30)  # (Tt,) over the pair's sources
            counts.index_add_(0, slot, (p / norm[word]).double())
        totals = torch.zeros(vocab + 1, dtype=torch.float64).index_add_(0, source, counts)
        prob = (counts / totals[source]).float()
    return keys, prob


def _best_first(keys: torch.Tensor, prob: torch.Tensor, vocab: int, best: int,
                prune: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, targets, probs): per source piece (NULL left out) its translations with p >= prune,
    at most ``best``, best first."""
    source, target, prob = (keys // vocab).numpy(), (keys % vocab).numpy(), prob.numpy()
    keep = (source < vocab) & (prob >= prune)
    source, target, prob = source[keep], target[keep], prob[keep]
    order = np.lexsort((-prob, source))  # by source piece, then most probable first
    source, target, prob = source[order], target[order], prob[order]
    starts = np.searchsorted(source, source, side="left")
    keep = np.arange(len(source)) - starts < best
    source, target, prob = source[keep], target[keep], prob[keep]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(source, minlength=vocab))]).astype(np.int64)
    return offsets, target.astype(np.int32), prob.astype(np.float32)


def target_frequencies(corpora: list[PreparedCorpus], vocab_size: int) -> np.ndarray:
    """(V,) how often each piece occurs on the target side of every pair (read a block at a time)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    block = 1 << 24
    for corpus in corpora:
        tokens = corpus.tgt.tokens
        for start in range(0, len(tokens), block):
            counts += np.bincount(tokens[start : start + block], minlength=vocab_size)[:vocab_size]
    return counts


def build_table(corpora: list[PreparedCorpus], vocab_size: int, spm_sha256: str, first: int = FIRST,
                best: int = BEST, prune: float = PRUNE, iterations: int = ITERATIONS,
                max_pairs: int = MAX_PAIRS) -> Table:
    """The shortlist table of prepared corpora (see the module's doc)."""
    check_build_sizes(first, best, prune)
    counts = target_frequencies(corpora, vocab_size)
    frequent = np.argsort(-counts, kind="stable")
    frequent = frequent[counts[frequent] > 0][:first].astype(np.int32)
    pairs = _Pairs(corpora, max_pairs)
    keys, prob = ibm_model1(pairs, vocab_size, iterations)
    offsets, targets, probs = _best_first(keys, prob, vocab_size, best, prune)
    return Table(frequent, offsets, targets, probs, spm_sha256, first, best, prune, pairs.used, iterations)


def check_build_sizes(first: int, best: int, prune: float) -> None:
    if first < 1:
        raise NmtError(f"--first {first}: must be at least 1 (the most frequent target pieces every list holds)")
    if best < 1:
        raise NmtError(f"--best {best}: must be at least 1 (the translations kept per source piece)")
    if not 0 <= prune < 1:
        raise NmtError(f"--prune {prune}: must be at least 0 and below 1 (the smallest p(t|s) kept)")


# --- the file ----------------------------------------------------------------------------------

def write_table(table: Table, path: Path) -> None:
    """Write ``table`` to ``path`` whole or not at all (``nmt.files.write_bytes_atomic``)."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, format=np.int64(FORMAT), frequent=table.frequent, offsets=table.offsets,
             targets=table.targets, probs=table.probs, spm_sha256=np.str_(table.spm_sha256),
             first=np.int64(table.first), best=np.int64(table.best), prune=np.float64(table.prune),
             pairs=np.int64(table.pairs), iterations=np.int64(table.iterations))
    write_bytes_atomic(path, buffer.getvalue())


_REBUILD = "build it again with nmt shortlist RUN"


def read_table(path: Path, spm_sha256: str | None = None) -> Table:
    """The table in ``path``; with ``spm_sha256``, refused unless built for that SentencePiece model."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {name: z[name] for name in z.files}
        if int(a["format"]) != FORMAT:
            raise NmtError(f"{path}: a shortlist of format {int(a['format'])}, this nmt reads format {FORMAT}; "
                           f"{_REBUILD}")
        table = Table(a["frequent"], a["offsets"], a["targets"], a["probs"], str(a["spm_sha256"]), int(a["first"]),
                      int(a["best"]), float(a["prune"]), int(a["pairs"]), int(a["iterations"]))
    except NmtError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise NmtError(f"{path}: not a readable shortlist ({type(e).__name__}: {e}); {_REBUILD}") from None
    vocab = table.vocab_size
    consistent = (vocab > EOS and table.offsets[0] == 0 and (np.diff(table.offsets) >= 0).all()
                  and table.offsets[-1] == len(table.targets) == len(table.probs)
                  and ((table.targets >= 0) & (table.targets < vocab)).all()
                  and ((table.frequent >= 0) & (table.frequent < vocab)).all())
    if not consistent:
        raise NmtError(f"{path}: damaged (its arrays disagree with each other); {_REBUILD}")
    if spm_sha256 is not None and table.spm_sha256 != spm_sha256:
        raise NmtError(f"{path}: built for another SentencePiece model (sha256 {table.spm_sha256[:12]}...) than "
                       f"the run's {MODEL_FILE} ({spm_sha256[:12]}...); {_REBUILD}")
    return table


def load_table(run_dir: Path, sizes: tuple[int, int] | None = None) -> Table:
    """The table of a run, checked against the run's ``spm.model`` and, given (FIRST, BEST)
    ``sizes``, refused if it holds fewer."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise NmtError(f"{run_dir} has no shortlist ({FILE}); build one with nmt shortlist {run_dir}, "
                       "or decode without --shortlist")
    table = read_table(path, sha256(Path(run_dir) / MODEL_FILE))
    if sizes is not None:
        table.check_sizes(*sizes, path)
    return table


@dataclass
class Built:
    path: Path
    table: Table
    bytes: int
    seconds: float  # EM and counting, the prepared data being at hand
    sha256: str
    pairs_total: int  # training pairs in the corpus (EM read table.pairs of them)

    def describe(self) -> str:
        """The line ``nmt shortlist`` prints: what was written, its size, the build time, the sha256."""
        t = self.table
        sources = int((np.diff(t.offsets) > 0).sum())
        read = f"{t.pairs:,} pairs" if t.pairs == self.pairs_total else f"{t.pairs:,} of {self.pairs_total:,} pairs"
        return (f"{self.path}: {len(t.targets):,} translations of {sources:,} source pieces (at most {t.best} "
                f"each, p >= {t.prune:g}) and {len(t.frequent):,} frequent pieces; {self.bytes / 1e6:.1f} MB, "
                f"built in {self.seconds:.1f} s ({t.iterations} EM iterations on {read}); sha256 {self.sha256}")


def build(run_dir: Path, first: int = FIRST, best: int = BEST, prune: float = PRUNE,
          iterations: int = ITERATIONS, max_pairs: int = MAX_PAIRS) -> Built:
    """``nmt shortlist RUN``: build the table from the run's prepared training data, write RUN/shortlist.npz."""
    from nmt import config, rundir
    from nmt.prepare import prepare_train

    check_build_sizes(first, best, prune)
    run_dir = Path(run_dir)
    rundir.require_run(run_dir)
    cfg = config.load_recipe(run_dir / rundir.CONFIG_FILE)
    tokenizer = Tokenizer(run_dir / MODEL_FILE)
    corpora = prepare_train(cfg, tokenizer)  # the arrays training mapped; encoded now only where missing
    start = time.perf_counter()
    table = build_table(corpora, len(tokenizer), tokenizer.sha256(), first, best, prune, iterations, max_pairs)
    seconds = time.perf_counter() - start
    path = run_dir / FILE
    write_table(table, path)
    return Built(path, table, path.stat().st_size, seconds, sha256(path), sum(len(c) for c in corpora))


def write_vmap(table: Table, pieces: list[str], first: int, best: int, path: Path) -> None:
    """The table as CTranslate2's vocabulary map: a line ``<TAB>`` + the ``first`` frequent pieces
    (always candidates), then per source piece with translations ``piece<TAB>`` + its ``best``
    best, pieces separated by spaces. Written whole or not at all."""
    lines = ["\t" + " ".join(pieces[i] for i in table.frequent[:first])]
    for s in range(table.vocab_size):
        targets = table.targets[table.offsets[s] : table.offsets[s + 1]][:best]
        if len(targets):
            lines.append(f"{pieces[s]}\t" + " ".join(pieces[t] for t in targets))
    write_text_atomic(path, "".join(f"{line}\n" for line in lines))


# --- decoding over a shortlist ------------------------------------------------------------------

@dataclass
class ShortlistMemory:
    inner: Memory  # the wrapped model's
    mask: torch.Tensor  # (n, S) True at real source tokens
    columns: torch.Tensor  # (U,) vocabulary id of each column: the union of the batch's lists
    blocked: torch.Tensor  # (n, U) True where the column is not in the sentence's list
    layer: Callable[[torch.Tensor], torch.Tensor]  # features (N, D) -> logits (N, U): the output layer over U


@dataclass
class ShortlistState:
    inner: DecoderState
    blocked: torch.Tensor  # (n, U) per sentence
    columns: torch.Tensor  # (U,)
    layer: Callable[[torch.Tensor], torch.Tensor]

    @property
    def attention(self) -> torch.Tensor | None:
        return self.inner.attention

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> ShortlistState:
        blocked = self.blocked if sentences is None else self.blocked.index_select(0, sentences)
        return ShortlistState(self.inner.select(rows, sentences), blocked, self.columns, self.layer)


class Shortlisted(Seq2Seq):
    """``model`` decoding over a shortlist: a Seq2Seq whose log-probs cover the batch's columns.

    ``encode`` computes each sentence's list, the batch's columns U (their union, ascending,
    so PAD, UNK, BOS and EOS keep their own ids as columns) and the output layer over them,
    once per batch; ``step`` maps the column tokens it is fed to vocabulary ids, runs the
    model's ``step_features`` and gives (N, U) log-probs, each row normalized over its own
    sentence's list (-inf elsewhere). Works for any model with ``step_features`` and an
    output layer ``nmt.quantize.OutputRows`` can restrict (float32 or int8).
    """

    kind = "shortlisted"

    def __init__(self, model: Seq2Seq, table: Table, first: int, best: int):
        super().__init__()
        if table.vocab_size != model.vocab_size:
            raise NmtError(f"the shortlist has {table.vocab_size} pieces, the model {model.vocab_size}; {_REBUILD}")
        self.model = model
        self.vocab_size = model.vocab_size
        self.rows = OutputRows(model)
        device = model.output_weight().device
        always = torch.cat([SPECIALS, torch.from_numpy(table.frequent[:first].astype(np.int64))])
        self.register_buffer("always", always.to(device), persistent=False)  # (F + 4,)
        self.register_buffer("translations", table.translations(best).to(device), persistent=False)  # (V, best)

    @property
    def max_positions(self) -> int:
        return self.model.max_positions

    def lists(self, src: torch.Tensor) -> torch.Tensor:
        """(n, V) True at the vocabulary ids of each sentence's list."""
        n = src.size(0)
        member = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=src.device)
        member[:, self.always] = True
        # Padding looks up PAD's row, all PAD (no piece translates to PAD), and PAD is listed anyway.
        member.scatter_(1, self.translations[src].view(n, -1), True)  # (n, S * best)
        return member

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> ShortlistMemory:
        inner = self.model.encode(src, src_lens)
        member = self.lists(src)  # (n, V)
        columns = member.any(0).nonzero().squeeze(1)  # (U,) ascending
        return ShortlistMemory(inner, inner.mask, columns, ~member[:, columns], self.rows(columns))

    def init_state(self, memory: ShortlistMemory, beam: int = 1) -> ShortlistState:
        return ShortlistState(self.model.init_state(memory.inner, beam), memory.blocked, memory.columns,
                              memory.layer)

    def step(self, tokens: torch.Tensor, state: ShortlistState,
             need_attention: bool = False) -> tuple[torch.Tensor, ShortlistState]:
        features, inner = self.model.step_features(state.columns[tokens], state.inner, need_attention)
        logits = state.layer(features)  # (N, U), a fresh tensor: masked and normalized in place
        n, width = state.blocked.shape
        logits.view(n, -1, width).masked_fill_(state.blocked[:, None, :], float("-inf"))  # a sentence's k rows
        log_probs = torch.log_softmax(logits, -1, out=logits)
        return log_probs, ShortlistState(inner, state.blocked, state.columns, state.layer)
