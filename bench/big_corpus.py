"""A corpus of WMT14's size built from Multi30k, reproducibly and without holding it in memory.

    python bench/big_corpus.py [--out DIR] [--copies 155] [--seed 1] [--equal-lengths]

Multi30k's 29,000 training pairs are written ``--copies`` times (155: 4,495,000 pairs, about
1.2 GB, the size of WMT14 en-de). In copy c, pair k is joined with pair (k + offset_c) mod
29,000 by a space, with the same offset on both sides so the joined pair is still a
translation; the offsets come from a seeded RNG and are never 0, so no pair meets itself
and the copies differ. valid and test2016 are copied as they are.

``--equal-lengths`` writes only the first copies (5 unless ``--copies`` says otherwise):
the same joined pairs, as long as the big corpus's, in a corpus small enough to train on in
memory, for comparing training tokens/s like with like. Both are prefixes of one
sequence: the first n copies of the big corpus are the n-copy corpus.

Train on it with ``--set data.dir=DIR`` (an absolute path, or a name under $NMT_DATA).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

from nmt.data import read_parallel
from nmt.download import data_root


def offsets(copies: int, pairs: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, pairs) for _ in range(copies)]


def write_joined(out: Path, src: list[str], tgt: list[str], langs: tuple[str, str], copies: int,
                 seed: int) -> int:
    """Write train.{src,tgt} one copy at a time (one copy's text in memory); returns the bytes written."""
    n = len(src)
    paths = [out / f"train.{lang}" for lang in langs]
    tmp = [path.with_name(path.name + ".tmp") for path in paths]
    files = [open(path, "w", encoding="utf-8", newline="\n") for path in tmp]
    try:
        for c, offset in enumerate(offsets(copies, n, seed)):
            for f, lines in zip(files, (src, tgt)):
                f.write("".join(f"{lines[k]} {lines[(k + offset) % n]}\n" for k in range(n)))
            if sys.stderr.isatty():
                print(f"\rcopy {c + 1}/{copies}", end="" if c + 1 < copies else "\n", file=sys.stderr, flush=True)
    finally:
        for f in files:
            f.close()
    for t, path in zip(tmp, paths):
        os.replace(t, path)
    return sum(path.stat().st_size for path in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="Multi30k directory (default: $NMT_DATA/multi30k)")
    parser.add_argument("--out", type=Path, help="output directory (default: $NMT_DATA/multi30k-joined-xCOPIES)")
    parser.add_argument("--copies", type=int, help="copies of Multi30k train (default 155, or 5 with --equal-lengths)")
    parser.add_argument("--equal-lengths", action="store_true",
                        help="a small corpus of the same joined pairs, to train on in memory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--langs", default="en,de", help="source and target language codes")
    args = parser.parse_args()

    copies = args.copies or (5 if args.equal_lengths else 155)
    source = args.source or data_root() / "multi30k"
    out = args.out or data_root() / f"multi30k-joined-x{copies}"
    langs = tuple(args.langs.split(","))
    src, tgt = read_parallel(source / f"train.{langs[0]}", source / f"train.{langs[1]}")
    src, tgt = [s.strip() for s in src], [t.strip() for t in tgt]
    out.mkdir(parents=True, exist_ok=True)
    size = write_joined(out, src, tgt, langs, copies, args.seed)
    for split in ("valid", "test2016"):
        for lang in langs:
            if (source / f"{split}.{lang}").exists():
                shutil.copyfile(source / f"{split}.{lang}", out / f"{split}.{lang}")
    print(f"{out}: {copies * len(src):,} training pairs ({copies} x {len(src):,}, joined), "
          f"{size / 1e9:.2f} GB; valid and test2016 copied from {source}")


if __name__ == "__main__":
    main()
