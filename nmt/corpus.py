"""A prepared corpus as read back: the directory ``nmt.prepare`` writes, memory-mapped.

A prepared directory holds one split encoded into flat ``.npy`` arrays, read back with
``np.load(mmap_mode="r")``:

    header.json        format, source identities, tokenizer sha256, filter, counts
    src.tokens.npy     the kept pairs' source ids end to end (uint16 while the
                       vocabulary fits, else int32)
    src.offsets.npy    where pair i starts in src.tokens (int64, one entry more than pairs)
    src.lengths.npy    ids per pair (uint16, or uint32 when the filter allows longer)
    tgt.*.npy          the same for the target side
    lines.npy          each kept pair's line number in the files, from 0 (int64)

``FORMAT`` is the version of this layout, recorded in the header and part of the cache
name; a directory of another format, or one whose arrays disagree with its header, is a
``CorruptCache``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
SIDES = ("src", "tgt")
ARRAYS = ("src.tokens", "src.offsets", "src.lengths", "tgt.tokens", "tgt.offsets", "tgt.lengths", "lines")


class CorruptCache(Exception):
    """A prepared directory that cannot be used as it is; the message says why."""


@dataclass
class TokenArray:
    """One side of a prepared corpus: pair i's ids are ``tokens[offsets[i] : offsets[i] + lens[i]]``."""

    tokens: np.ndarray  # (total ids,) uint16 or int32, mapped
    offsets: np.ndarray  # (pairs + 1,) int64
    lens: np.ndarray  # (pairs,) uint16 or uint32

    def __len__(self) -> int:
        return len(self.lens)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return self.tokens[start : start + int(self.lens[i])]


class SideLengths:
    """``src_lens`` and ``tgt_lens``: ids per pair on each side (``src.lens``, ``tgt.lens``), the arrays
    the batcher sorts, for any corpus whose sides carry their lengths."""

    @property
    def src_lens(self) -> np.ndarray:
        return self.src.lens

    @property
    def tgt_lens(self) -> np.ndarray:
        return self.tgt.lens


class PreparedCorpus(SideLengths):
    """A prepared split, memory-mapped read-only: pages are read when a batch needs them.

    Indexed like ``nmt.data.Parallel`` (``src[i]``, ``tgt[i]``, ``index``), plus the length
    arrays the batcher sorts (``src_lens``, ``tgt_lens``: ids per pair, without BOS/EOS).
    """

    def __init__(self, directory: Path, header: dict, arrays: dict[str, np.ndarray]):
        self.directory, self.header = Path(directory), header
        self.src = TokenArray(arrays["src.tokens"], arrays["src.offsets"], arrays["src.lengths"])
        self.tgt = TokenArray(arrays["tgt.tokens"], arrays["tgt.offsets"], arrays["tgt.lengths"])
        self.index = arrays["lines"]  # (pairs,) each pair's line number in the files, from 0

    def __len__(self) -> int:
        return len(self.index)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.src[i], self.tgt[i]

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):
            return [self.pair(j) for j in range(*i.indices(len(self)))]
        return self.pair(i)

    @classmethod
    def open(cls, directory: Path) -> PreparedCorpus:
        """Map a prepared directory; raises ``CorruptCache`` if any part disagrees with the header."""
        directory = Path(directory)
        try:
            header = json.loads((directory / "header.json").read_text(encoding="utf-8"))
            if header.get("format") != FORMAT:
                raise CorruptCache(f"format {header.get('format')!r}, this nmt reads format {FORMAT}")
            n = header["pairs"]
            expected = {"lines": n}
            for side in SIDES:
                expected.update({f"{side}.tokens": header["tokens"][side], f"{side}.offsets": n + 1,
                                 f"{side}.lengths": n})
            arrays = {name: _load(directory / f"{name}.npy", expected[name]) for name in ARRAYS}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCache(str(e)) from None
        for side in SIDES:
            if int(arrays[f"{side}.offsets"][-1]) != len(arrays[f"{side}.tokens"]):
                raise CorruptCache(f"{side}.offsets.npy does not end at the length of {side}.tokens.npy")
        return cls(directory, header, arrays)


def _load(path: Path, length: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CorruptCache(f"{path.name}: {e}") from None
    if array.shape != (length,):
        raise CorruptCache(f"{path.name} holds {array.shape} entries, the header says ({length},)")
    return array
