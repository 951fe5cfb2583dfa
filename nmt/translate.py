"""Lines in, lines out: encode, sort into batches, search, restore the input order, decode.

N lines in give N lines out, always: an empty line gives an empty line and a line longer
than the model accepts is truncated (with a warning naming it), never dropped. Lines are
sorted by length so batches hold similar lengths, and every sentence's search is
independent of the others in its batch, so the output does not depend on batch size.
"""

from __future__ import annotations

import logging
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


def translate(model: Seq2Seq, tokenizer: Tokenizer, lines: list[str], cfg: SearchConfig,
              on_batch: Callable[[int], None] | None = None, keep_attention: bool = False,
              source_name: str = "<stdin>") -> list[Translation]:
    """Translate ``lines``; ``on_batch(n)`` is told after each batch of n sentences."""
    device = next(model.parameters()).device
    limit = model.max_positions - 1  # room for EOS
    ids = tokenizer.encode([line.strip() for line in lines])
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            log.warning("%s:%d: %d subword tokens, truncated to the model's limit of %d",
                        source_name, i + 1, len(seq), limit)
            ids[i] = seq[:limit]
    results: list[Translation | None] = [None] * len(lines)
    todo = [i for i, seq in enumerate(ids) if seq]
    for i in set(range(len(lines))) - set(todo):
        results[i] = Translation(i, [""] * cfg.n_best, [])
    lengths = [len(s) + 1 for s in ids]
    order = sorted(todo, key=lambda i: (lengths[i], i))
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(lengths, order, cfg.max_tokens, cfg.max_sentences):
            src = torch.full((len(batch), max(lengths[i] for i in batch)), PAD, dtype=torch.long)
            for row, i in enumerate(batch):
                src[row, : lengths[i]] = torch.tensor(ids[i] + [EOS])
            src_lens = torch.tensor([lengths[i] for i in batch])
            hyps = search(model, src.to(device), src_lens.to(device), beam=cfg.beam,
                          length_alpha=cfg.length_penalty, coverage_beta=cfg.coverage_penalty,
                          max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b, n_best=cfg.n_best,
                          keep_attention=keep_attention)
            for i, nbest in zip(batch, hyps):
                texts = tokenizer.decode([h.tokens for h in nbest])
                texts += [""] * (cfg.n_best - len(texts))
                results[i] = Translation(i, [t.replace("\n", " ") for t in texts], nbest)
            if on_batch:
                on_batch(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def translate_text(model: Seq2Seq, tokenizer: Tokenizer, lines: list[str],
                   cfg: SearchConfig) -> list[str]:
    """The best translation of each line."""
    return [t.texts[0] for t in translate(model, tokenizer, lines, cfg)]
