"""Prepared corpora: a split encoded once into flat id arrays that every process maps.

``prepare`` streams two line-aligned files (never the whole corpus in memory), checks
them as it goes (alignment, UTF-8), encodes them in chunks with SentencePiece's own
threads, drops empty and over-long pairs exactly as ``nmt.data.load_parallel`` does, and
writes one directory of ``.npy`` arrays. ``nmt.corpus`` describes that directory's layout
and reads it back (``PreparedCorpus``, memory-mapped).

Where it lives: ``$NMT_CACHE/prepared/<name>``, ``NMT_CACHE`` defaulting to ``~/.cache/nmt``.
The name is a hash of the two files' real paths, the tokenizer's sha256, the length
filter and the format version. It is a shared cache rather than part of a run directory
because the readers of one corpus with one tokenizer are many: the runs of a comparison
that share a tokenizer through ``tokenizer.reuse``, every resume of a run, every rank of a
DDP job. Prepared once, the arrays cost the disk and the page cache once for all of them.
A run that trains its own tokenizer gets a name of its own, so it can never be handed
arrays made with another tokenizer (the header's tokenizer sha256 is checked as well).

Several training corpora (``data.train`` as a list) are prepared one by one, each in a
directory of its own, so that adding a corpus to the list encodes that corpus alone.

When is it stale? The header records each file's size, mtime and the sha256 of its first
and last MiB; if any of them differs, the data is rebuilt and a message says which file
changed. An edit that keeps a file's size and mtime and touches only its middle goes
unnoticed: delete the directory after such an edit. A directory that cannot be read back
(bad JSON, a missing or truncated array, sizes that disagree with the header) is one
warning and is rebuilt, never used.

Writing is atomic: a temp directory beside the final one, every file fsynced, then a
rename. Two processes preparing the same data take turns through a lock file, so the
second one reuses what the first wrote; where file locks do not hold (some network file
systems) the rename still keeps the result whole and the loser discards its copy.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nmt import config
from nmt.batching import epoch_count
from nmt.config import Config
from nmt.corpus import FORMAT, SIDES, CorruptCache, PreparedCorpus
from nmt.data import decode_lines, read_lines
from nmt.errors import NmtError
from nmt.files import fsync_dir
from nmt.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer

log = logging.getLogger("nmt")

CHUNK_PAIRS = 20_000  # pairs per SentencePiece call: enough to keep its threads busy
BLOCK_BYTES = 4 << 20  # bytes read from a file at a time
EDGE_BYTES = 1 << 20  # a source file's identity hashes this much of its head and of its tail
LOG_EVERY_S = 30.0  # progress lines when stderr is not a terminal
# SentencePiece's unigram trainer holds about 24 bytes per character of its input (measured:
# suffix arrays over the whole text), so its sample is cut to this many characters (~1 GB).
SENTENCEPIECE_CHARS = 40_000_000


@dataclass
class Timings:
    """Seconds spent in each stage of preparation; a stage that did not run stays 0."""

    read_sample: float = 0.0
    sentencepiece: float = 0.0
    read: float = 0.0  # reading and checking the files while encoding
    encode: float = 0.0
    write: float = 0.0


# --- reading: two files in step, checked while streaming -----------------------------------

def _open(path: Path):
    try:
        return open(path, "rb")
    except (FileNotFoundError, IsADirectoryError):
        read_lines(path)  # raises data.py's message for a missing file or a directory
        raise
    except OSError as e:
        raise NmtError(f"{path}: cannot be read ({e.strerror or e})") from None


def _blocks(path: Path) -> Iterator[tuple[list[str], int]]:
    """The lines of a UTF-8 file, a block at a time, each with the bytes of the file read so far."""
    with _open(path) as f:
        first_line, rest = 1, b""
        while True:
            data = f.read(BLOCK_BYTES)
            block, rest = (rest + data, b"") if not data else _whole_lines(rest + data)
            if not block:
                if not data:
                    return
                continue  # a line longer than a block: read on
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError:
                decode_lines(block, str(path), first_line=first_line)  # data.py's message, naming the line
                raise
            if first_line == 1 and text.startswith("\ufeff"):
                text = text[1:]
            lines = text.split("\n")
            if lines[-1] == "":  # the block's last line end
                lines.pop()
            if "\r" in text:
                lines = [line.rstrip("\r") for line in lines]
            yield lines, f.tell() - len(rest)
            first_line += len(lines)


def _whole_lines(data: bytes) -> tuple[bytes, bytes]:
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


class ParallelReader:
    """Pairs of lines from two line-aligned files, ``size`` pairs at a time.

    A file that ends before the other is an error naming the first line without a
    partner; ``lines`` counts the pairs given so far, ``fraction`` how much of the
    source file has been read.
    """

    def __init__(self, src: Path, tgt: Path, size: int | None = None):
        self.paths = (Path(src), Path(tgt))
        self.size = size or CHUNK_PAIRS
        self.lines = 0
        self._bytes_read = 0
        self._total_bytes = 0

    @property
    def fraction(self) -> float:
        return self._bytes_read / self._total_bytes if self._total_bytes else 0.0

    def __iter__(self) -> Iterator[tuple[list[str], list[str]]]:
        blocks = [_blocks(p) for p in self.paths]
        with _open(self.paths[0]) as f:  # a missing file is named here, as everywhere
            self._total_bytes = os.fstat(f.fileno()).st_size
        bufs: list[list[str]] = [[], []]
        ended = [False, False]
        while True:
            for side in (0, 1):
                while len(bufs[side]) < self.size and not ended[side]:
                    got = next(blocks[side], None)
                    ended[side] = got is None
                    if got is not None:
                        bufs[side] += got[0]
                        if side == 0:
                            self._bytes_read = got[1]
            n = min(self.size, *map(len, bufs))
            if n < self.size and len(bufs[0]) != len(bufs[1]):
                self._misaligned(bufs, blocks)
            if n == 0:
                return
            chunk = (bufs[0][:n], bufs[1][:n])
            del bufs[0][:n], bufs[1][:n]
            self.lines += n
            yield chunk

    def _misaligned(self, bufs: list[list[str]], blocks: list[Iterator]) -> None:
        counts = [self.lines + len(buf) + sum(len(lines) for lines, _ in rest) for buf, rest in zip(bufs, blocks)]
        short = 0 if counts[0] < counts[1] else 1
        (src, tgt), n = self.paths, counts[short]
        raise NmtError(f"{self.paths[1 - short]}:{n + 1}: no matching line in {self.paths[short]}, which "
                       f"ends after line {n}; {src} has {counts[0]} lines but {tgt} has {counts[1]}; "
                       "parallel files must be line-aligned")


class _Meter:
    """Progress of a pass over a corpus: a bar when ``bar`` (a terminal), else a log line every 30 s."""

    def __init__(self, what: str, reader: ParallelReader, bar: bool):
        self.what, self.reader = what, reader
        self.start = self.logged = time.perf_counter()
        self.bar = tqdm(desc=what, unit=" lines", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                        ) if bar else None

    def update(self, lines: int) -> None:
        done, fraction = self.reader.lines, self.reader.fraction
        if self.bar is not None:
            if fraction > 0:  # the total is estimated from the bytes read, for the ETA
                self.bar.total = max(round(done / fraction), done)
            self.bar.update(lines)
            return
        now = time.perf_counter()
        if now - self.logged >= LOG_EVERY_S and fraction > 0:
            self.logged, elapsed = now, now - self.start
            left = elapsed * (1 - fraction) / fraction
            log.info("%s: %s lines (%.0f%%), %s lines/s, ETA %d:%02d", self.what, f"{done:,}", 100 * fraction,
                     f"{done / elapsed:,.0f}", left // 60, left % 60)

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the tokenizer: trained on a uniform sample drawn while streaming ----------------------

def sample_pairs(src: Path, tgt: Path, k: int, seed: int, progress: bool = False
                 ) -> tuple[list[str], list[str], int]:
    """``k`` pairs drawn uniformly from the files (reservoir sampling), stripped; and the pair count.

    Only the sample is kept in memory. A corpus of at most ``k`` pairs gives all of them, in order.
    """
    rng = np.random.default_rng(seed)
    keep_src: list[str] = []
    keep_tgt: list[str] = []
    seen = 0
    reader = ParallelReader(src, tgt)
    with _Meter(f"reading {Path(src).name}", reader, progress) as meter:
        for s_lines, t_lines in reader:
            s = [line.strip() for line in s_lines]
            t = [line.strip() for line in t_lines]
            fill = min(max(k - seen, 0), len(s))
            keep_src += s[:fill]
            keep_tgt += t[:fill]
            if fill < len(s):
                # Algorithm R: pair number i (from 0) takes a random slot with probability k / (i + 1).
                slots = rng.integers(0, np.arange(seen + fill, seen + len(s)) + 1)
                for j in np.flatnonzero(slots < k):
                    keep_src[slots[j]], keep_tgt[slots[j]] = s[fill + j], t[fill + j]
            seen += len(s)
            meter.update(len(s))
    return keep_src, keep_tgt, seen


def count_lines(path: Path) -> int:
    """Lines in a file (a last line without a line end counts), read a block at a time."""
    lines, last = 0, b"\n"
    with _open(path) as f:
        while block := f.read(BLOCK_BYTES):
            lines, last = lines + block.count(b"\n"), block[-1:]
    return lines + (last != b"\n")


def check_sources(corpora: list[config.TrainCorpus]) -> None:
    """Every file of a ``data.train`` list can be opened: else an error naming the entry and the file.

    Run before any corpus is read, so a missing last file stops ``nmt prepare`` before it
    spends an hour on the others. A plain ``data.train`` prefix keeps the reader's own message.
    """
    if not corpora[0].listed:
        return
    for corpus in corpora:
        for path in (corpus.src, corpus.tgt):
            try:
                _open(path).close()
            except NmtError as e:
                raise NmtError(f"{corpus.name} (path {corpus.prefix}): {e}") from None


def sample_corpora(corpora: list[config.TrainCorpus], k: int, seed: int, progress: bool = False
                   ) -> tuple[list[str], list[str], int]:
    """At most ``k`` pairs drawn from the training corpora for SentencePiece, and their pairs in all.

    A plain ``data.train`` is ``sample_pairs``. A list shares ``k`` among its corpora in
    proportion to weight * lines (what each gives an epoch), each share at most the corpus's
    lines and rounded down, so the sample stays within ``k``; each corpus is then sampled as
    one (seed ``seed + its position``). Counting the lines first costs a pass over the source files.
    """
    if not corpora[0].listed:
        return sample_pairs(corpora[0].src, corpora[0].tgt, k, seed, progress)
    lines = [count_lines(c.src) for c in corpora]
    mass = sum(c.weight * n for c, n in zip(corpora, lines)) or 1.0
    src: list[str] = []
    tgt: list[str] = []
    for i, (corpus, n) in enumerate(zip(corpora, lines)):
        share = min(n, math.floor(k * corpus.weight * n / mass))
        if share:
            s, t, _ = sample_pairs(corpus.src, corpus.tgt, share, seed + i, progress)
            src += s
            tgt += t
    return src, tgt, sum(lines)


def _within_characters(src: list[str], tgt: list[str], limit: int, seed: int) -> tuple[list[str], list[str]]:
    """A uniform subset of the sampled pairs, in their order, with about ``limit`` characters at most."""
    chars = sum(map(len, src)) + sum(map(len, tgt))
    if chars <= limit:
        return src, tgt
    keep = np.sort(np.random.default_rng(seed).choice(len(src), int(len(src) * limit / chars), replace=False))
    log.info("the sample's %s characters would take SentencePiece about %.1f GB; it gets %s of its %s pairs",
             f"{chars:,}", chars * 24 / 1e9, f"{len(keep):,}", f"{len(src):,}")
    return [src[i] for i in keep], [tgt[i] for i in keep]


def run_tokenizer(cfg: Config, run_dir: Path, progress: bool = False, timings: Timings | None = None) -> Tokenizer:
    """The run's SentencePiece model, where ``nmt train`` looks for it (``run_dir/spm.model``).

    The one already there; else a copy of ``tokenizer.reuse``; else one trained now, with
    every core, on ``tokenizer.sample_sentences`` lines per side drawn uniformly from the
    training files (a corpus that small gives all its lines, as ``nmt train`` would use),
    fewer if they hold more than ``SENTENCEPIECE_CHARS`` characters.
    """
    timings = timings or Timings()
    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if path.exists():
        return Tokenizer(path)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer.reuse:
        source = Path(cfg.tokenizer.reuse)
        source = source / MODEL_FILE if source.is_dir() else source
        if not source.is_file():
            raise NmtError(f"tokenizer.reuse: {source} does not exist; name a run directory "
                           "that has an spm.model, or a .model file")
        shutil.copyfile(source, path)
        return Tokenizer(path)
    k = cfg.tokenizer.sample_sentences
    if k < 1:
        raise NmtError(f"recipe key tokenizer.sample_sentences: {k!r} is out of range; must be at least 1")
    corpora = config.train_corpora(cfg.data)
    check_sources(corpora)
    start = time.perf_counter()
    src_sample, tgt_sample, pairs = sample_corpora(corpora, k, cfg.train.seed, progress)
    src_sample, tgt_sample = _within_characters(src_sample, tgt_sample, SENTENCEPIECE_CHARS, cfg.train.seed)
    timings.read_sample = time.perf_counter() - start
    names = f"{len(corpora)} corpora" if corpora[0].listed else f"{corpora[0].src.name} and {corpora[0].tgt.name}"
    log.info("training a joint SentencePiece model (%d pieces) on %s of the %s pairs of %s",
             cfg.tokenizer.vocab_size, f"{len(src_sample):,}", f"{pairs:,}", names)
    start = time.perf_counter()
    tokenizer = train_tokenizer(src_sample + tgt_sample, run_dir, cfg.tokenizer.vocab_size,
                                cfg.tokenizer.model_type, cfg.train.seed, max_sentences=2 * k,
                                threads=os.cpu_count() or 1)
    timings.sentencepiece = time.perf_counter() - start
    return tokenizer


# --- encoding and writing -------------------------------------------------------------------

class _NpyWriter:
    """A one-dimensional ``.npy`` file written chunk by chunk; its length is set at ``close``."""

    HEADER = 128  # bytes, whatever the length: the header is rewritten in place at the end

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.file.write(self._header(0))

    def _header(self, n: int) -> bytes:
        text = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (n,)}).encode("latin1")
        body = text.ljust(self.HEADER - 11) + b"\n"  # 10 bytes of magic, version and length before it
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.file.write(memoryview(values).cast("B"))
        self.count += len(values)

    def close(self) -> None:
        self.file.seek(0)
        self.file.write(self._header(self.count))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


@dataclass
class _Chunk:
    """One chunk of pairs, encoded and filtered."""

    kept: np.ndarray  # (n,) positions in the chunk of the pairs kept
    ids: dict[str, np.ndarray] = field(default_factory=dict)  # side -> the kept pairs' ids end to end
    lens: dict[str, np.ndarray] = field(default_factory=dict)  # side -> (n,) ids per kept pair
    empty: int = 0
    too_long: int = 0


def _encode_chunk(tokenizer: Tokenizer, src: list[str], tgt: list[str], max_len: int | None,
                  dtype: np.dtype) -> _Chunk:
    """Encode a chunk as ``load_parallel`` does: stripped, empty pairs dropped, then over-long ones."""
    src = [line.strip() for line in src]
    tgt = [line.strip() for line in tgt]
    keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if s and t]
    n = len(keep)
    # One call for both sides: SentencePiece spreads the lines over its C++ threads, without the GIL.
    ids = tokenizer.sp.Encode([src[i] for i in keep] + [tgt[i] for i in keep], out_type=int,
                              num_threads=os.cpu_count() or 1)
    seqs = {"src": ids[:n], "tgt": ids[n:]}
    lens = {side: np.fromiter(map(len, seqs[side]), np.int64, n) for side in SIDES}
    ok = np.ones(n, dtype=bool)
    if max_len:
        ok = (lens["src"] <= max_len) & (lens["tgt"] <= max_len)
    chunk = _Chunk(np.asarray(keep, dtype=np.int64)[ok], empty=len(src) - n, too_long=n - int(ok.sum()))
    for side in SIDES:
        chunk.lens[side] = lens[side][ok]
        flat = itertools.chain.from_iterable(itertools.compress(seqs[side], ok))
        chunk.ids[side] = np.fromiter(flat, dtype, int(chunk.lens[side].sum()))
    return chunk


def _dtypes(vocab_size: int, max_len: int | None) -> tuple[np.dtype, np.dtype]:
    tokens = np.uint16 if vocab_size <= 1 << 16 else np.int32
    lengths = np.uint16 if max_len and max_len < 1 << 16 else np.uint32
    return np.dtype(tokens), np.dtype(lengths)


def _encode_into(out: Path, src: Path, tgt: Path, tokenizer: Tokenizer, max_len: int | None,
                 progress: bool, timings: Timings) -> dict:
    """Encode the pairs of ``src``/``tgt`` into the arrays under ``out``; returns the counts."""
    token_dtype, length_dtype = _dtypes(len(tokenizer), max_len)
    writers: dict[str, _NpyWriter] = {}
    try:
        for side in SIDES:
            writers[f"{side}.tokens"] = _NpyWriter(out / f"{side}.tokens.npy", token_dtype)
            writers[f"{side}.offsets"] = _NpyWriter(out / f"{side}.offsets.npy", np.int64)
            writers[f"{side}.lengths"] = _NpyWriter(out / f"{side}.lengths.npy", length_dtype)
            writers[f"{side}.offsets"].append(np.zeros(1, dtype=np.int64))
        writers["lines"] = _NpyWriter(out / "lines.npy", np.int64)
        counts = {"lines": 0, "pairs": 0, "empty": 0, "too_long": 0, "src_tokens": 0, "tgt_tokens": 0}
        reader = ParallelReader(src, tgt)
        started, busy = time.perf_counter(), timings.encode + timings.write
        with _Meter(f"encoding {src.name}", reader, progress) as meter:
            for src_lines, tgt_lines in reader:
                start = time.perf_counter()
                chunk = _encode_chunk(tokenizer, src_lines, tgt_lines, max_len, token_dtype)
                timings.encode += time.perf_counter() - start
                start = time.perf_counter()
                writers["lines"].append(counts["lines"] + chunk.kept)
                for side in SIDES:
                    writers[f"{side}.tokens"].append(chunk.ids[side])
                    writers[f"{side}.lengths"].append(chunk.lens[side])
                    writers[f"{side}.offsets"].append(counts[f"{side}_tokens"] + np.cumsum(chunk.lens[side]))
                    counts[f"{side}_tokens"] += len(chunk.ids[side])
                timings.write += time.perf_counter() - start
                counts["lines"] += len(src_lines)
                counts["pairs"] += len(chunk.kept)
                counts["empty"] += chunk.empty
                counts["too_long"] += chunk.too_long
                meter.update(len(src_lines))
        timings.read += time.perf_counter() - started - (timings.encode + timings.write - busy)
        start = time.perf_counter()
        for writer in writers.values():
            writer.close()
        timings.write += time.perf_counter() - start
    finally:
        for writer in writers.values():
            writer.file.close()
    return counts


# --- the cache: find, check, build atomically -----------------------------------------------

def cache_root() -> Path:
    """Where prepared data lives: ``$NMT_CACHE/prepared``, by default ``~/.cache/nmt/prepared``."""
    env = os.environ.get("NMT_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "nmt") / "prepared"


def source_identity(path: Path) -> dict:
    """What tells whether a file changed: size, mtime and the sha256 of its first and last MiB."""
    with _open(path) as f:
        st = os.fstat(f.fileno())
        head = hashlib.sha256(f.read(EDGE_BYTES)).hexdigest()
        f.seek(max(st.st_size - EDGE_BYTES, 0))
        tail = hashlib.sha256(f.read(EDGE_BYTES)).hexdigest()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_sha256": head, "tail_sha256": tail}


def cache_name(src: Path, tgt: Path, tokenizer_sha256: str, max_len: int | None) -> str:
    key = json.dumps({"format": FORMAT, "src": str(Path(src).resolve()), "tgt": str(Path(tgt).resolve()),
                      "tokenizer": tokenizer_sha256, "max_len": max_len}, sort_keys=True)
    return f"{Path(src).name}-{Path(tgt).suffix.lstrip('.')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _stale(header: dict, sources: dict, tokenizer_sha256: str, max_len: int | None) -> str | None:
    """Why a readable prepared directory does not fit the request, or None if it does."""
    if header.get("tokenizer_sha256") != tokenizer_sha256:
        return "the tokenizer changed (its sha256 differs from the one the data was prepared with)"
    if header.get("max_len") != max_len:
        return f"the length filter changed (max_len {header.get('max_len')} -> {max_len})"
    for side in SIDES:
        then, now = header.get("sources", {}).get(side, {}), sources[side]
        if any(then.get(key) != now[key] for key in ("size", "mtime_ns", "head_sha256", "tail_sha256")):
            return f"{now['path']} changed"
    return None


def _reusable(final: Path, sources: dict, tokenizer_sha256: str, max_len: int | None,
              say: bool) -> PreparedCorpus | None:
    """The prepared corpus at ``final`` if it is whole and up to date; ``say`` why not, if not."""
    if not final.exists():
        return None
    try:
        corpus = PreparedCorpus.open(final)
    except CorruptCache as e:
        if say:
            log.warning("%s: unreadable prepared data (%s): rebuilding it", final, e)
        return None
    reason = _stale(corpus.header, sources, tokenizer_sha256, max_len)
    if reason:
        if say:
            log.info("%s: rebuilding prepared data", reason)
        return None
    return corpus


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``; say so if another process holds it first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")
    except OSError as e:
        raise NmtError(f"could not create prepared data under {path.parent} ({e.strerror or e}); "
                       "set NMT_CACHE to a writable directory") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is preparing the same data (%s)", path.with_suffix(""))
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, final: Path) -> None:
    """Put a finished temp directory in place with renames only (atomic on one file system)."""
    old = None
    if final.exists():  # stale or corrupt: moved aside, then removed
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        shutil.rmtree(tmp)  # another process put the same data there first: keep theirs
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def _build(final: Path, src: Path, tgt: Path, tokenizer: Tokenizer, max_len: int | None, sources: dict,
           progress: bool, timings: Timings) -> None:
    """Encode into a temp directory beside ``final``, then rename it into place."""
    root = final.parent
    for leftover in [*root.glob(f".tmp-{final.name}-*"), *root.glob(f".old-{final.name}-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # left by a killed run; this process holds the lock
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        counts = _encode_into(tmp, src, tgt, tokenizer, max_len, progress, timings)
        log.info("%s: %d pairs kept, %d dropped as empty, %d dropped as longer than %s tokens",
                 src.name, counts["pairs"], counts["empty"], counts["too_long"], max_len)
        if not counts["pairs"]:
            raise NmtError(f"{src}: no usable sentence pairs (all empty or longer than "
                           f"data.max_len={max_len})")
        start = time.perf_counter()
        token_dtype, length_dtype = _dtypes(len(tokenizer), max_len)
        _write_json(tmp / "header.json", {
            "format": FORMAT, "sources": sources,
            "identity": "size, mtime_ns and the sha256 of the first and last MiB of each file",
            "tokenizer_sha256": tokenizer.sha256(), "vocab_size": len(tokenizer), "max_len": max_len,
            "lines": counts["lines"], "pairs": counts["pairs"], "dropped_empty": counts["empty"],
            "dropped_too_long": counts["too_long"],
            "tokens": {side: counts[f"{side}_tokens"] for side in SIDES},
            "dtypes": {"tokens": token_dtype.name, "lengths": length_dtype.name},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        fsync_dir(tmp)
        _publish(tmp, final)
        timings.write += time.perf_counter() - start
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NmtError(f"no space left on the device while writing prepared data under {root}; nothing "
                           "was kept: free some space (the arrays take up to the size of the text files) "
                           "or set NMT_CACHE to a disk with room") from None
        raise NmtError(f"could not write prepared data under {root} ({e.strerror or e}); nothing was "
                       "kept: set NMT_CACHE to a writable directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare(src: Path, tgt: Path, tokenizer: Tokenizer, max_len: int | None, *, cache: Path | None = None,
            progress: bool = False, timings: Timings | None = None) -> PreparedCorpus:
    """The prepared corpus of ``src``/``tgt`` for ``tokenizer``: reused if up to date, else built now.

    ``max_len`` drops pairs with more ids on either side (None: no limit); ``cache`` is the
    directory of prepared data (default ``cache_root()``); ``timings`` receives the seconds
    spent encoding and writing when the data is built.
    """
    src, tgt, timings = Path(src), Path(tgt), timings or Timings()
    sources = {"src": source_identity(src), "tgt": source_identity(tgt)}
    tokenizer_sha256 = tokenizer.sha256()
    root = Path(cache) if cache is not None else cache_root()
    final = root / cache_name(src, tgt, tokenizer_sha256, max_len)
    corpus = _reusable(final, sources, tokenizer_sha256, max_len, say=True)
    if corpus is not None:
        return corpus
    with _locked(root / f"{final.name}.lock"):
        # Another process may have built it while this one waited for the lock.
        corpus = _reusable(final, sources, tokenizer_sha256, max_len, say=False)
        if corpus is None:
            log.info("preparing %s and %s into %s", src, tgt.name, final)
            _build(final, src, tgt, tokenizer, max_len, sources, progress, timings)
            corpus = PreparedCorpus.open(final)
    return corpus


# --- what the trainer and the command line ask for -------------------------------------------

def split_max_len(cfg: Config, split: str) -> int:
    """The length filter of a split: ``data.max_len`` for training, what the model can take otherwise."""
    return cfg.data.max_len if split == "train" else cfg.model.max_positions - 1


def prepare_split(cfg: Config, tokenizer: Tokenizer, split: str = "train", *, cache: Path | None = None,
                  progress: bool = False, timings: Timings | None = None) -> PreparedCorpus:
    """The prepared corpus of a recipe's split (``train``, ``valid``, ...) for ``tokenizer``."""
    src, tgt = config.split_paths(cfg.data, split)
    return prepare(src, tgt, tokenizer, split_max_len(cfg, split), cache=cache, progress=progress,
                   timings=timings)


def prepare_train(cfg: Config, tokenizer: Tokenizer, *, cache: Path | None = None, progress: bool = False,
                  timings: Timings | None = None) -> list[PreparedCorpus]:
    """Each corpus of ``data.train``, prepared on its own (a cache entry each), in the recipe's order.

    A corpus added to the list is encoded alone; the others are found prepared.
    """
    corpora = config.train_corpora(cfg.data)
    check_sources(corpora)
    return [prepare(c.src, c.tgt, tokenizer, split_max_len(cfg, "train"), cache=cache, progress=progress,
                    timings=timings) for c in corpora]


@dataclass
class SplitReport:
    split: str
    corpus: PreparedCorpus
    timings: Timings
    seconds: float
    weight: float | None = None  # a corpus of a data.train list: its sampling weight


def prepare_recipe(cfg: Config, run_dir: Path, progress: bool = False, cache: Path | None = None
                ) -> tuple[Tokenizer, Timings, list[SplitReport]]:
    """``nmt prepare``: the run's tokenizer, then each training corpus and the valid split."""
    tokenizer_timings = Timings()
    tokenizer = run_tokenizer(cfg, run_dir, progress, tokenizer_timings)
    corpora = config.train_corpora(cfg.data)
    check_sources(corpora)
    reports = []
    for corpus in corpora:
        listed = corpus.listed
        timings, start = Timings(), time.perf_counter()
        prepared = prepare(corpus.src, corpus.tgt, tokenizer, split_max_len(cfg, "train"), cache=cache,
                           progress=progress, timings=timings)
        reports.append(SplitReport(f"{corpus.name.removeprefix('data.')} {corpus.prefix}" if listed else "train",
                                   prepared, timings, time.perf_counter() - start, corpus.weight if listed else None))
    timings, start = Timings(), time.perf_counter()
    valid = prepare_split(cfg, tokenizer, "valid", cache=cache, progress=progress, timings=timings)
    reports.append(SplitReport("valid", valid, timings, time.perf_counter() - start))
    return tokenizer, tokenizer_timings, reports


def describe(tokenizer: Tokenizer, tokenizer_timings: Timings, reports: list[SplitReport]) -> str:
    """What ``nmt prepare`` prints: the stages' times and the counts."""
    t = tokenizer_timings
    if t.sentencepiece:
        lines = [f"tokenizer: {tokenizer.path} trained (read+sample {t.read_sample:.1f} s, "
                 f"SentencePiece {t.sentencepiece:.1f} s)"]
    else:
        lines = [f"tokenizer: {tokenizer.path}"]
    for r in reports:
        h = r.corpus.header
        lines.append(f"{r.split}: {h['lines']:,} lines, {h['pairs']:,} pairs kept, {h['dropped_empty']:,} "
                     f"dropped as empty, {h['dropped_too_long']:,} longer than {h['max_len']} tokens; "
                     f"{h['tokens']['src']:,} + {h['tokens']['tgt']:,} ids")
        if r.weight is not None:
            lines.append(f"  weight {r.weight:g}: {epoch_count(r.weight, h['pairs']):,} pairs per epoch")
        rt = r.timings
        done = f"read {rt.read:.1f} s, encode {rt.encode:.1f} s, write {rt.write:.1f} s" if rt.encode else "reused"
        lines.append(f"  {done} ({r.seconds:.1f} s in all): {r.corpus.directory}")
    total = t.read_sample + t.sentencepiece + sum(r.seconds for r in reports)
    lines.append(f"total {total:.1f} s")
    return "\n".join(lines)
