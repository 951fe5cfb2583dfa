"""Line-aligned parallel text: reading with checks, encoding, length filtering."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nmt.errors import NmtError
from nmt.tokenizer import Tokenizer

log = logging.getLogger("nmt")


# What to do with a line that is not valid UTF-8: stop (the default), replace the bad bytes
# with U+FFFD, or read the line as empty. The last two warn with the line's number.
ON_BAD_LINE = ("error", "replace", "skip-empty")


class InvalidUtf8(NmtError):
    """Input that is not UTF-8, raised with ``on_bad_line="error"``."""


def read_lines(path: Path, on_bad_line: str = "error") -> list[str]:
    """All lines of a UTF-8 file, without line ends; an invalid byte is an error naming the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NmtError(f"{path}: no such file; check data.dir and the language codes, "
                       "or set NMT_DATA (nmt data multi30k downloads Multi30k)") from None
    except IsADirectoryError:
        raise NmtError(f"{path}: is a directory, expected a text file") from None
    return decode_lines(data, str(path), on_bad_line)


def decode_lines(data: bytes, name: str, on_bad_line: str = "error", first_line: int = 1) -> list[str]:
    """Split UTF-8 bytes into lines; ``name`` is what an error or warning calls the input.

    ``on_bad_line`` (one of ``ON_BAD_LINE``) says what becomes of a line that is not UTF-8;
    whatever it is, N lines in give N lines out. ``first_line`` is the number of the first
    line in the whole input (for a piece of it read in chunks): messages name lines by it,
    and a byte order mark is only dropped at the input's start.
    """
    if on_bad_line not in ON_BAD_LINE:
        raise NmtError(f"--on-bad-line {on_bad_line}: choose one of {', '.join(ON_BAD_LINE)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_bad_line == "error":
            line = data.count(b"\n", 0, e.start) + first_line
            raise InvalidUtf8(f"{name}:{line}: {_describe(e)}; convert the input to UTF-8, "
                              "e.g. iconv -f latin1 -t utf-8") from None
        text = "\n".join(_decode_line(raw, f"{name}:{n}", on_bad_line)
                         for n, raw in enumerate(data.split(b"\n"), first_line))
    if first_line == 1 and text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _describe(e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 ({e.reason}, byte 0x{e.object[e.start]:02x})"


def _decode_line(raw: bytes, where: str, on_bad_line: str) -> str:
    """One line's text; a line that is not UTF-8 is repaired or emptied, with a warning."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_bad_line == "replace":
            log.warning("%s: %s; bad bytes replaced with U+FFFD", where, _describe(e))
            return raw.decode("utf-8", errors="replace")
        log.warning("%s: %s; read as an empty line", where, _describe(e))
        return ""


def read_parallel(src_path: Path, tgt_path: Path) -> tuple[list[str], list[str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise NmtError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                       "parallel files must be line-aligned")
    return src, tgt


@dataclass
class Parallel:
    """Encoded pairs, without BOS/EOS; ``index`` is each pair's line number (0-based)."""

    src: list[list[int]]
    tgt: list[list[int]]
    index: list[int]

    def __len__(self) -> int:
        return len(self.src)


def load_parallel(src_path: Path, tgt_path: Path, tokenizer: Tokenizer,
                  max_len: int | None = None) -> Parallel:
    """Read, encode and filter a training corpus; dropped pairs are counted and logged.

    Pairs with an empty side are dropped (they teach nothing); pairs longer than
    ``max_len`` subword tokens on either side are dropped when a limit is given.
    """
    src_lines, tgt_lines = read_parallel(src_path, tgt_path)
    keep = [i for i, (s, t) in enumerate(zip(src_lines, tgt_lines)) if s.strip() and t.strip()]
    empty = len(src_lines) - len(keep)
    src = tokenizer.encode([src_lines[i].strip() for i in keep])
    tgt = tokenizer.encode([tgt_lines[i].strip() for i in keep])
    too_long = 0
    if max_len:
        kept = [j for j in range(len(keep)) if len(src[j]) <= max_len and len(tgt[j]) <= max_len]
        too_long = len(keep) - len(kept)
        src, tgt, keep = [src[j] for j in kept], [tgt[j] for j in kept], [keep[j] for j in kept]
    log.info("%s: %d pairs kept, %d dropped as empty, %d dropped as longer than %s tokens",
             src_path.name, len(keep), empty, too_long, max_len)
    if not keep:
        raise NmtError(f"{src_path}: no usable sentence pairs (all empty or longer than "
                       f"data.max_len={max_len})")
    return Parallel(src, tgt, keep)
