"""Forced decoding: the log-probability a model gives to given translations.

Each pair is scored by teacher forcing (``model.forward`` on BOS + target pieces) with a
plain log-softmax, no label smoothing: the log-probability of the target pieces and EOS,
their count (EOS included) and the mean per token. Pairs are batched by length, and each
pair's score is its own, so the output does not depend on the batch size; it comes back in
input order. An empty target scores EOS alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from nmt.batching import pad_batch
from nmt.data import read_parallel
from nmt.errors import NmtError
from nmt.models.base import Seq2Seq
from nmt.tokenizer import BOS, EOS, PAD, Tokenizer
from nmt.translate import length_batches, source_ids

log = logging.getLogger("nmt")


@dataclass
class PairScore:
    log_prob: float  # log P(target + EOS | source)
    tokens: int  # target pieces + EOS

    @property
    def mean(self) -> float:
        return self.log_prob / self.tokens


@torch.no_grad()
def score_batch(model: Seq2Seq, src: list[list[int]], tgt: list[list[int]]) -> list[PairScore]:
    """Scores of pairs of id lists (without BOS/EOS), in the order given."""
    device = next(model.parameters()).device
    src_t = pad_batch(src, suffix=[EOS]).to(device)  # (B, S)
    src_lens = torch.tensor([len(s) + 1 for s in src], device=device)
    tgt_in = pad_batch(tgt, prefix=[BOS]).to(device)  # (B, T)
    tgt_out = pad_batch(tgt, suffix=[EOS]).to(device)  # (B, T)
    lprobs = model(src_t, src_lens, tgt_in).float().log_softmax(-1)  # (B, T, V)
    gold = lprobs.gather(2, tgt_out[:, :, None]).squeeze(2)  # (B, T)
    totals = torch.where(tgt_out != PAD, gold, 0.0).sum(-1)  # (B,)
    return [PairScore(total, len(t) + 1) for total, t in zip(totals.tolist(), tgt)]


def score_lines(model: Seq2Seq, tokenizer: Tokenizer, src_lines: list[str], tgt_lines: list[str],
                max_tokens: int = 6000, max_sentences: int = 128, source_name: str = "<source>",
                target_name: str = "<target>") -> list[PairScore]:
    """One score per line pair, in input order. A source longer than the model accepts is
    truncated with a warning, as ``nmt translate`` does; a target that long is an error."""
    if len(src_lines) != len(tgt_lines):
        raise NmtError(f"{source_name} has {len(src_lines)} lines but {target_name} has {len(tgt_lines)}; "
                       "the pairs to score must be line-aligned")
    limit = model.max_positions - 1  # room for EOS (source) and BOS (target)
    src = source_ids(tokenizer, src_lines, limit, source_name)
    tgt = tokenizer.encode([line.strip() for line in tgt_lines])
    for i, seq in enumerate(tgt):
        if len(seq) > limit:
            raise NmtError(f"{target_name}:{i + 1}: {len(seq)} subword tokens, more than the model's limit of "
                           f"{limit}; shorten or drop that pair")
    lengths = [max(len(s), len(t)) + 1 for s, t in zip(src, tgt)]
    order = sorted(range(len(src)), key=lambda i: (lengths[i], i))
    scores: list[PairScore | None] = [None] * len(src)
    was_training = model.training
    model.eval()
    try:
        for batch in length_batches(lengths, order, max_tokens, max_sentences):
            for i, score in zip(batch, score_batch(model, [src[i] for i in batch], [tgt[i] for i in batch])):
                scores[i] = score
    finally:
        model.train(was_training)
    return scores  # type: ignore[return-value]


def score_files(model: Seq2Seq, tokenizer: Tokenizer, src_path: Path, tgt_path: Path,
                max_tokens: int = 6000, max_sentences: int = 128) -> list[PairScore]:
    """``score_lines`` of two line-aligned UTF-8 files."""
    for path, option in ((src_path, "--src"), (tgt_path, "--tgt")):
        if not Path(path).is_file():
            raise NmtError(f"{path}: no such file; check the {option} path")
    src_lines, tgt_lines = read_parallel(src_path, tgt_path)
    return score_lines(model, tokenizer, src_lines, tgt_lines, max_tokens, max_sentences, str(src_path),
                       str(tgt_path))
