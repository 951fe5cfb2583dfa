"""Token-budget batches, bucketed by length, reshuffled each epoch, sharded per rank.

The budget counts padded tokens: a batch of n pairs whose longest side is L tokens
(with BOS/EOS) costs n * L. Pairs are sorted by length with a random tie-break drawn
from the seed, cut into batches, and the batch order is shuffled with ``seed + epoch``,
so the order of any epoch can be rebuilt exactly (resume needs nothing else).

Batches are made from two length arrays with numpy, so a corpus of millions of pairs
needs no Python object per pair: an epoch is three integer arrays (``BatchOrder``). The
random numbers are drawn from the same Mersenne Twister stream, in the same order, as
the earlier pure-Python batcher, so every epoch's batches are the same as before.

One batcher serves both corpora: the in-memory ``nmt.data.Parallel`` (lists of ids)
and the memory-mapped ``nmt.corpus.PreparedCorpus`` (flat id arrays); ``lengths``
gives the length arrays of either, and ``collate`` pads either.

Several training corpora (``data.train`` as a list) are joined end to end into one index
space by ``WeightedCorpora``; each epoch first draws which pairs of each corpus it holds, in
proportion to the corpus weights (``draw_epoch`` defines it), then batches that draw as above.

The trainer takes its batches from ``EpochBatches.updates``: an endless iterator of
``Update``s (the micro-batches of one optimizer step), each saying where the next one
starts, which is all a checkpoint needs to resume the order exactly.
"""

from __future__ import annotations

import math
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Union

import numpy as np
import torch

from nmt.corpus import PreparedCorpus, SideLengths, TokenArray
from nmt.data import Parallel
from nmt.tokenizer import BOS, EOS, PAD

Corpus = Union[Parallel, PreparedCorpus, "WeightedCorpora"]

# The version of the batch order (which pairs each batch of an epoch holds, and in what
# order the batches come). Checkpoints record it; raise it with any change that gives an
# epoch other batches, so that runs from before are refused at resume, not reshuffled.
ORDER_VERSION = 1


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source ids + EOS, padded
    src_lens: torch.Tensor  # (B,) on the host always: packing LSTM sequences reads them there
    tgt_in: torch.Tensor  # (B, T) BOS + target ids, padded
    tgt_out: torch.Tensor  # (B, T) target ids + EOS, padded; on the host (the loss reads rows and targets)
    ntokens: int  # target tokens that are not padding
    # The real target tokens, known when the batch is made, so that the loss picks them without
    # a boolean mask (whose size the host would have to wait for on a GPU):
    rows: torch.Tensor  # (K,) their positions in the flattened (B*T,) target, ascending
    targets: torch.Tensor  # (K,) their ids: tgt_out.reshape(-1)[rows]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """What the device computes with (``src``, ``tgt_in``, ``rows``, ``targets``) on ``device``;
        ``non_blocking`` copies from pinned memory without waiting for the copy."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """What ``to`` copies, in page-locked host memory, from which a copy to a GPU need not block the host."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Batch:
        return Batch(fn(self.src), self.src_lens, fn(self.tgt_in), self.tgt_out, self.ntokens, fn(self.rows),
                     fn(self.targets))


# --- lengths and padding, for either kind of corpus -----------------------------------------

def lengths(data: Corpus) -> tuple[np.ndarray, np.ndarray]:
    """Subword ids per pair on each side (without BOS/EOS), as two integer arrays of len(data).

    A prepared corpus gives its own memory-mapped arrays (uint16 or int32), not copies: with
    100M pairs an int64 copy would be 1.6 GB on every rank; mapped, the ranks share the pages.
    """
    if isinstance(data, (PreparedCorpus, WeightedCorpora)):
        return data.src_lens, data.tgt_lens
    return (np.fromiter(map(len, data.src), np.int64, len(data.src)),
            np.fromiter(map(len, data.tgt), np.int64, len(data.tgt)))


def _side_lengths(side: Sequence, idx: np.ndarray) -> np.ndarray:
    if isinstance(side, (TokenArray, Joined)):
        return side.lens[idx].astype(np.int64)
    return np.array([len(side[i]) for i in idx], dtype=np.int64)


def _padded(side: Sequence, idx: np.ndarray, lens: np.ndarray, width: int) -> np.ndarray:
    """(B, width) ids of the pairs ``idx`` on one side, PAD after each row's ``lens``."""
    if isinstance(side, Joined):  # each corpus fills its own rows
        out = np.empty((len(idx), width), dtype=np.int64)
        part, local = side.locate(idx)
        for k in np.unique(part):
            rows = part == k
            out[rows] = _padded(side.parts[k], local[rows], lens[rows], width)
        return out
    if isinstance(side, TokenArray):
        # Gather straight from the mapped flat array: only the rows' own pages are read.
        cols = np.arange(width)
        inside = cols[None, :] < lens[:, None]  # (B, width)
        where = np.where(inside, side.offsets[idx][:, None] + cols[None, :], 0)
        return np.where(inside, side.tokens[where], PAD).astype(np.int64)
    out = np.full((len(idx), width), PAD, dtype=np.int64)
    for row, i in enumerate(idx):
        out[row, : lens[row]] = side[i]
    return out


def pad_batch(seqs: list[list[int]], prefix: list[int] = (), suffix: list[int] = ()) -> torch.Tensor:
    width = max(len(s) for s in seqs) + len(prefix) + len(suffix)
    out = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = [*prefix, *s, *suffix]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(data: Corpus, indices: Sequence[int] | np.ndarray) -> Batch:
    """The padded tensors of the pairs ``indices``, longest source first."""
    idx = np.asarray(indices, dtype=np.int64)
    src_lens = _side_lengths(data.src, idx)
    # Longest source first (stable, as sorted() was): what packed LSTM sequences want.
    order = np.argsort(-src_lens, kind="stable")
    idx, src_lens = idx[order], src_lens[order]
    tgt_lens = _side_lengths(data.tgt, idx)
    rows = np.arange(len(idx))
    src = _padded(data.src, idx, src_lens, int(src_lens.max()) + 1)  # (B, S)
    src[rows, src_lens] = EOS
    tgt = _padded(data.tgt, idx, tgt_lens, int(tgt_lens.max()) + 1)  # (B, T): ids, then PAD
    tgt_in = np.concatenate([np.full((len(idx), 1), BOS), tgt[:, :-1]], axis=1)  # (B, T)
    tgt[rows, tgt_lens] = EOS
    flat = tgt.reshape(-1)
    real = np.flatnonzero(flat != PAD)  # (K,) ascending: row by row, position by position
    return Batch(
        src=torch.from_numpy(src),
        src_lens=torch.from_numpy(src_lens + 1),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt),
        ntokens=int(tgt_lens.sum()) + len(idx),
        rows=torch.from_numpy(real),
        targets=torch.from_numpy(flat[real]),
    )


# --- several corpora, drawn from with weights ------------------------------------------------

class Joined(Sequence):
    """One side of several corpora as one sequence: pair ``starts[k] + i`` is pair ``i`` of part ``k``."""

    def __init__(self, parts: list[Sequence], starts: np.ndarray, lens: np.ndarray):
        self.parts, self.starts, self.lens = parts, starts, lens  # lens: (pairs,) int64, ids per pair

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The part each pair ``idx`` is in, and its index there."""
        part = np.searchsorted(self.starts, idx, side="right") - 1
        return part, idx - self.starts[part]

    def __getitem__(self, i: int):
        (part,), (local,) = self.locate(np.array([i], dtype=np.int64))
        return self.parts[part][int(local)]


def epoch_count(weight: float, pairs: int) -> int:
    """Pairs a corpus of ``pairs`` pairs gives each epoch at ``weight``: round(weight * pairs), halves up."""
    return math.floor(weight * pairs + 0.5)


def draw_epoch(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> np.ndarray:
    """The pairs of one epoch, as indices into the corpora joined end to end.

    Corpus k, of n pairs and weight w, gives c = round(w * n) pairs (``epoch_count``): every pair
    q = c // n times, and r = c - q * n pairs once more, drawn uniformly without replacement (the
    first r of a permutation from numpy's legacy Mersenne Twister, seeded with ``seed``, ``epoch``
    and k). So w = 1 takes each pair once and draws nothing, w = 0.5 takes another half every
    epoch, w = 2.5 each pair twice and a random half a third time. The result holds corpus after
    corpus, each in pair order, a repeated pair's copies side by side; the batcher then sorts
    them by length, so one epoch is a single length-bucketed shuffle of them all.
    """
    drawn, start = [], 0
    for k, (n, w) in enumerate(zip(sizes, weights)):
        c = epoch_count(w, n)
        q = c // n if n else 0
        r = c - q * n
        times = np.full(n, q, dtype=np.int64)
        if r:
            key = np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch & 0xFFFFFFFF, k], dtype=np.uint32)
            times[np.random.RandomState(key).permutation(n)[:r]] += 1
        drawn.append(start + np.repeat(np.arange(n, dtype=np.int64), times))
        start += n
    return np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)


class WeightedCorpora(SideLengths):
    """Several training corpora, indexed as one (corpus after corpus), each with a sampling weight.

    ``src``/``tgt`` and the length arrays cover every pair once; ``draw(seed, epoch)`` gives the
    pairs an epoch trains on (``draw_epoch``), ``per_epoch`` how many of them come from each corpus.
    """

    def __init__(self, parts: Sequence[Corpus], weights: Sequence[float]):
        if len(parts) != len(weights) or not parts:
            raise ValueError("one weight per corpus, and at least one corpus")
        self.parts, self.weights = list(parts), [float(w) for w in weights]
        self.sizes = [len(p) for p in self.parts]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        src, tgt = zip(*map(lengths, self.parts))
        self.src = Joined([p.src for p in self.parts], self.starts, np.concatenate(src))
        self.tgt = Joined([p.tgt for p in self.parts], self.starts, np.concatenate(tgt))

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def per_epoch(self) -> list[int]:
        return [epoch_count(w, n) for w, n in zip(self.weights, self.sizes)]

    def draw(self, seed: int, epoch: int) -> np.ndarray:
        return draw_epoch(self.sizes, self.weights, seed, epoch)


# --- one epoch's batches ---------------------------------------------------------------------

class BatchOrder(Sequence):
    """Batches in training order, each an int64 array of pair indices.

    ``pairs`` holds every pair sorted by length, ``starts`` where each batch begins in it
    (one more entry than there are batches), and ``order`` the batch numbers in training
    order. Slicing gives another ``BatchOrder``, so sharding and taking a group of
    micro-batches cost no copy of the pairs.
    """

    def __init__(self, pairs: np.ndarray, starts: np.ndarray, order: np.ndarray):
        self.pairs, self.starts, self.order = pairs, starts, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return BatchOrder(self.pairs, self.starts, self.order[k])
        b = self.order[k]
        return self.pairs[self.starts[b] : self.starts[b + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))

    def tolist(self) -> list[list[int]]:
        return [batch.tolist() for batch in self]


def _mersenne(seed: int) -> np.random.RandomState:
    """numpy's view of ``random.Random(seed)``: the same generator state, so the same draws."""
    state = random.Random(seed).getstate()[1]
    rs = np.random.RandomState()
    rs.set_state(("MT19937", np.array(state[:-1], dtype=np.uint32), state[-1]))
    return rs


def _python_random(rs: np.random.RandomState) -> random.Random:
    """The reverse of ``_mersenne``: a ``random.Random`` that continues ``rs``'s stream."""
    _, key, pos, *_ = rs.get_state()
    rng = random.Random()
    rng.setstate((3, (*(int(x) for x in key), int(pos)), None))
    return rng


def _cut(cost: np.ndarray, max_tokens: int) -> np.ndarray:
    """Where each batch starts in ``cost`` (ascending): greedy, while n * longest <= budget.

    Since the costs only grow, the batch from ``s`` ends at the largest ``e`` with
    ``cost[e - 1] * (e - s) <= max_tokens``: a binary search, on Python ints (numpy calls
    would cost more than the arithmetic). A pair over the budget makes a batch alone.
    """
    c = cost.tolist()
    n, s = len(c), 0
    starts = [0]
    while s < n:
        lo, hi = s + 1, min(n, s + max(1, max_tokens // c[s]))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if c[mid - 1] * (mid - s) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        starts.append(lo)
        s = lo
    return np.array(starts, dtype=np.int64)


def _length_order(cost: np.ndarray, src: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Pair indices sorted by cost, then source length, then tie (as a stable sort would)."""
    order = np.argsort(ties)
    if (ties[order[1:]] == ties[order[:-1]]).any():  # equal draws: keep them in index order
        order = np.argsort(ties, kind="stable")
    # Two stable passes on small integers (radix sorts), least significant key first.
    small = np.uint16 if max(int(cost.max(initial=0)), 1) < 1 << 16 else np.int64
    order = order[np.argsort(src[order].astype(small), kind="stable")]
    return order[np.argsort(cost[order].astype(small), kind="stable")]


def make_batches(src_lens: Sequence[int] | np.ndarray, tgt_lens: Sequence[int] | np.ndarray,
                 max_tokens: int, seed: int, epoch: int) -> BatchOrder:
    """All batches of one epoch, in training order.

    ``src_lens``/``tgt_lens`` count the tokens a pair takes in a batch (with EOS/BOS).
    """
    src = np.asarray(src_lens, dtype=np.int64)
    cost = np.maximum(src, np.asarray(tgt_lens, dtype=np.int64))
    rs = _mersenne(seed * 100_003 + epoch)
    ties = rs.random_sample(len(cost))
    pairs = _length_order(cost, src, ties)
    starts = _cut(cost[pairs], max_tokens)
    order = list(range(len(starts) - 1))
    _python_random(rs).shuffle(order)  # Python's shuffle: the same order the list batcher had
    return BatchOrder(pairs, starts, np.array(order, dtype=np.int64))


def length_histogram(data: Corpus, seed: int = 1) -> list[list[int]]:
    """[source ids, target ids, pairs] for every pair of lengths (without EOS/BOS) among the pairs an epoch
    trains on (of weighted corpora, the first epoch's draw), sorted: what batches of the corpus look like,
    without the corpus (``nmt bench --synthetic``)."""
    src, tgt = (side.astype(np.int64) for side in lengths(data))
    if isinstance(data, WeightedCorpora):
        drawn = data.draw(seed, 1)
        src, tgt = src[drawn], tgt[drawn]
    width = int(max(src.max(initial=0), tgt.max(initial=0))) + 1
    keys, counts = np.unique(src * width + tgt, return_counts=True)  # (bins,) one per pair of lengths
    return np.stack([keys // width, keys % width, counts], axis=1).tolist()


def shard(batches: BatchOrder | list, rank: int, world_size: int, drop_last: bool = True) -> BatchOrder | list:
    """This rank's batches: every rank the same number (the last few dropped), or all with ``drop_last=False``.

    Training needs the same number on every rank (each update is one collective);
    validation needs every batch once.
    """
    usable = len(batches) - len(batches) % world_size if drop_last else len(batches)
    return batches[rank:usable:world_size]


@dataclass
class Update:
    """The micro-batches of one optimizer update on this rank, and where the next update starts."""

    batches: BatchOrder  # up to update_freq micro-batches, each an int64 array of pair indices
    target_tokens: int  # this rank's target tokens in them (with EOS)
    epoch: int  # the epoch they belong to
    next_position: tuple[int, int]  # (epoch, batches taken from it) once this update is made
    collated: list[Batch] | None = None  # the micro-batches collated ahead (prefetch), else None


def _in_batch(lens: np.ndarray) -> np.ndarray:
    """Tokens a pair's side takes in a batch, with its EOS (source) or BOS/EOS (target): int64."""
    return np.add(lens, 1, dtype=np.int64)


class EpochBatches:
    """The batches a rank trains on, epoch after epoch, from either kind of corpus."""

    def __init__(self, data: Corpus, max_tokens: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        self.data = data
        self.max_tokens = max_tokens
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last  # False: every batch once over all ranks (validation)
        self._src_lens, self._tgt_lens = lengths(data)  # without EOS / BOS: see _in_batch
        self._last: tuple[int, BatchOrder] | None = None  # the epoch built last (seconds on a big corpus)

    def epoch(self, epoch: int) -> BatchOrder:
        if self._last is None or self._last[0] != epoch:
            self._last = (epoch, shard(self._all_batches(epoch), self.rank, self.world_size, self.drop_last))
        return self._last[1]

    def _all_batches(self, epoch: int) -> BatchOrder:
        """Every rank's batches of ``epoch``; of weighted corpora, the batches of that epoch's draw."""
        if not isinstance(self.data, WeightedCorpora):
            return make_batches(_in_batch(self._src_lens), _in_batch(self._tgt_lens), self.max_tokens, self.seed,
                                epoch)
        drawn = self.data.draw(self.seed, epoch)  # (pairs this epoch,) indices into the joined corpora
        batches = make_batches(_in_batch(self._src_lens[drawn]), _in_batch(self._tgt_lens[drawn]), self.max_tokens,
                               self.seed, epoch)
        return BatchOrder(drawn[batches.pairs], batches.starts, batches.order)

    def collate(self, indices: Sequence[int] | np.ndarray) -> Batch:
        return collate(self.data, indices)

    def target_tokens(self, batches: Sequence[Sequence[int] | np.ndarray]) -> int:
        """Target tokens (with EOS) of these batches: what the loss of an update is divided by."""
        return sum(int(self._tgt_lens[np.asarray(idx, dtype=np.int64)].sum(dtype=np.int64)) + len(idx)
                   for idx in batches)

    def updates(self, update_freq: int, epoch: int = 1, taken: int = 0) -> Iterator[Update]:
        """Update after update, without end, from ``taken`` batches into ``epoch``.

        Each update holds the next ``update_freq`` batches of the epoch (fewer at its end:
        an update never spans two epochs). Each epoch's order is built once, when reached.
        """
        while True:
            order = self.epoch(epoch)
            if not len(order):
                raise ValueError(f"epoch {epoch} has no batch for rank {self.rank} of {self.world_size}")
            while taken < len(order):
                group = order[taken : taken + update_freq]
                taken += len(group)
                after = (epoch, taken) if taken < len(order) else (epoch + 1, 0)
                yield Update(group, self.target_tokens(group), epoch, after)
            epoch, taken = epoch + 1, 0


class Prefetch:
    """Updates with their micro-batches collated ahead, on a thread: each comes with ``collated`` filled.

    The thread takes the updates from ``updates`` in their order and stays ``ahead`` of the
    trainer, so the batch order, the sharding over ranks and the position a checkpoint records
    are the plain iterator's. ``close()`` stops the thread; what it had taken ahead is dropped
    (the trainer rebuilds its iterator from the position it reached).
    """

    def __init__(self, updates: Iterator[Update], collate: Callable[[np.ndarray], Batch], ahead: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(updates, collate), daemon=True,
                                        name="nmt-prefetch")
        self._thread.start()

    def _run(self, updates: Iterator[Update], collate: Callable[[np.ndarray], Batch]) -> None:
        try:
            for upd in updates:
                if not self._put(replace(upd, collated=[collate(idx) for idx in upd.batches])):
                    return
            self._put(StopIteration())  # a finite iterator's end, as a plain one would give it
        except BaseException as e:  # handed to the trainer, raised where it asks for the next update
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Update:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # let a put in progress finish
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
