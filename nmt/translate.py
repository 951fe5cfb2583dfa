"""Lines in, lines out: encode, sort into batches, search, restore the input order, decode.

N lines in give N lines out, always: an empty line gives an empty line and a line longer
than the model accepts is truncated (with a warning naming it), never dropped. Lines are
sorted by length so batches hold similar lengths, and every sentence's search is
independent of the others in its batch, so the output does not depend on batch size.
``translate_each`` searches every batch under several settings after encoding it once
(choosing search settings on a validation set).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from nmt.config import SearchConfig
from nmt.models.base import Seq2Seq
from nmt.search import Hypothesis, search
from nmt.tokenizer import EOS, PAD, Tokenizer

log = logging.getLogger("nmt")


@dataclass
class Translation:
    line: int  # 0-based input line
    texts: list[str]  # n-best, best first
    hypotheses: list[Hypothesis]


@dataclass
class Decoding:
    cfg: SearchConfig
    translations: list[Translation]
    seconds: float  # spent searching under this config (the encoder, shared by all, excluded)


def _batches(lengths: list[int], order: list[int], max_tokens: int,
             max_sentences: int) -> Iterable[list[int]]:
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


def _source_ids(tokenizer: Tokenizer, lines: list[str], limit: int, source_name: str) -> list[list[int]]:
    ids = tokenizer.encode([line.strip() for line in lines])
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            log.warning("%s:%d: %d subword tokens, truncated to the model's limit of %d",
                        source_name, i + 1, len(seq), limit)
            ids[i] = seq[:limit]
    return ids


def translate(model: Seq2Seq, tokenizer: Tokenizer, lines: list[str], cfg: SearchConfig,
              on_batch: Callable[[int], None] | None = None, keep_attention: bool = False,
              source_name: str = "<stdin>") -> list[Translation]:
    """Translate ``lines``; ``on_batch(n)`` is told after each batch of n sentences."""
    (decoding,) = translate_each(model, tokenizer, lines, [cfg], on_batch, keep_attention, source_name)
    return decoding.translations


def translate_each(model: Seq2Seq, tokenizer: Tokenizer, lines: list[str], cfgs: list[SearchConfig],
                   on_batch: Callable[[int], None] | None = None, keep_attention: bool = False,
                   source_name: str = "<stdin>") -> list[Decoding]:
    """Translate ``lines`` once under each of ``cfgs``, running the encoder once per batch.

    The configs must batch alike (``max_tokens``, ``max_sentences``); they may differ in
    anything the search alone uses (beam, penalties, length limits, stopping rule).
    """
    first = cfgs[0]
    if any((c.max_tokens, c.max_sentences) != (first.max_tokens, first.max_sentences) for c in cfgs):
        raise ValueError("translate_each: the configs must have the same max_tokens and max_sentences")
    device = next(model.parameters()).device
    ids = _source_ids(tokenizer, lines, model.max_positions - 1, source_name)  # room for EOS
    results: list[list[Translation | None]] = [[None] * len(lines) for _ in cfgs]
    todo = [i for i, seq in enumerate(ids) if seq]
    for out, cfg in zip(results, cfgs):
        for i in set(range(len(lines))) - set(todo):
            out[i] = Translation(i, [""] * cfg.n_best, [])
    seconds = [0.0] * len(cfgs)
    lengths = [len(s) + 1 for s in ids]
    order = sorted(todo, key=lambda i: (lengths[i], i))
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(lengths, order, first.max_tokens, first.max_sentences):
            src = torch.full((len(batch), max(lengths[i] for i in batch)), PAD, dtype=torch.long)
            for row, i in enumerate(batch):
                src[row, : lengths[i]] = torch.tensor(ids[i] + [EOS])
            src, src_lens = src.to(device), torch.tensor([lengths[i] for i in batch]).to(device)
            with torch.no_grad():
                memory = model.encode(src, src_lens)
            for c, (out, cfg) in enumerate(zip(results, cfgs)):
                start = time.perf_counter()
                hyps = search(model, src, src_lens, cfg, keep_attention, memory)
                seconds[c] += time.perf_counter() - start
                for i, nbest in zip(batch, hyps):
                    texts = tokenizer.decode([h.tokens for h in nbest])
                    texts += [""] * (cfg.n_best - len(texts))
                    out[i] = Translation(i, [t.replace("\n", " ") for t in texts], nbest)
            if on_batch:
                on_batch(len(batch))
    finally:
        model.train(was_training)
    return [Decoding(cfg, out, s) for cfg, out, s in zip(cfgs, results, seconds)]  # type: ignore[arg-type]


def translate_text(model: Seq2Seq, tokenizer: Tokenizer, lines: list[str],
                   cfg: SearchConfig) -> list[str]:
    """The best translation of each line."""
    return [t.texts[0] for t in translate(model, tokenizer, lines, cfg)]
