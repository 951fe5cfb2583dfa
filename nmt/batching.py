"""Token-budget batches, bucketed by length, reshuffled each epoch, sharded per rank.

The budget counts padded tokens: a batch of n pairs whose longest side is L tokens
(with BOS/EOS) costs n * L. Pairs are sorted by length with a random tie-break drawn
from the seed, cut into batches, and the batch order is shuffled with ``seed + epoch``,
so the order of any epoch can be rebuilt exactly (resume needs nothing else).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from nmt.data import Parallel
from nmt.tokenizer import BOS, EOS, PAD


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source ids + EOS, padded
    src_lens: torch.Tensor  # (B,)
    tgt_in: torch.Tensor  # (B, T) BOS + target ids, padded
    tgt_out: torch.Tensor  # (B, T) target ids + EOS, padded
    ntokens: int  # target tokens that are not padding

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device), self.src_lens.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.ntokens)


def pad_batch(seqs: list[list[int]], prefix: list[int] = (), suffix: list[int] = ()) -> torch.Tensor:
    width = max(len(s) for s in seqs) + len(prefix) + len(suffix)
    out = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = [*prefix, *s, *suffix]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(data: Parallel, indices: list[int]) -> Batch:
    # Longest source first: what packed LSTM sequences want, harmless for the rest.
    indices = sorted(indices, key=lambda i: -len(data.src[i]))
    src = [data.src[i] for i in indices]
    tgt = [data.tgt[i] for i in indices]
    tgt_out = pad_batch(tgt, suffix=[EOS])
    return Batch(
        src=pad_batch(src, suffix=[EOS]),
        src_lens=torch.tensor([len(s) + 1 for s in src], dtype=torch.long),
        tgt_in=pad_batch(tgt, prefix=[BOS]),
        tgt_out=tgt_out,
        ntokens=int((tgt_out != PAD).sum()),
    )


def make_batches(src_lens: list[int], tgt_lens: list[int], max_tokens: int, seed: int,
                 epoch: int) -> list[list[int]]:
    """All batches of one epoch, in training order, as lists of pair indices.

    ``src_lens``/``tgt_lens`` count the tokens a pair takes in a batch (with EOS/BOS).
    """
    rng = random.Random(seed * 100_003 + epoch)
    cost = [max(s, t) for s, t in zip(src_lens, tgt_lens)]
    ties = [rng.random() for _ in cost]
    order = sorted(range(len(cost)), key=lambda i: (cost[i], src_lens[i], ties[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, cost[i])
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], cost[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def shard(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches; every rank gets the same number (the last few are dropped)."""
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


class EpochBatches:
    """The batches a rank trains on, epoch after epoch."""

    def __init__(self, data: Parallel, max_tokens: int, seed: int, rank: int = 0, world_size: int = 1):
        self.data = data
        self.max_tokens = max_tokens
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._src_lens = [len(s) + 1 for s in data.src]
        self._tgt_lens = [len(t) + 1 for t in data.tgt]

    def epoch(self, epoch: int) -> list[list[int]]:
        batches = make_batches(self._src_lens, self._tgt_lens, self.max_tokens, self.seed, epoch)
        return shard(batches, self.rank, self.world_size)

    def collate(self, indices: list[int]) -> Batch:
        return collate(self.data, indices)
