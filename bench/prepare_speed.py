"""Preparation speed: each stage's time and the peak memory of ``nmt prepare``.

    python bench/big_corpus.py                      # once: $NMT_DATA/multi30k-joined-x155
    python bench/prepare_speed.py recipes/multi30k/quick.yaml --set data.dir=multi30k-joined-x155

Prepares the recipe's train and valid splits as ``nmt prepare`` does, into a new run
directory and a new cache (so nothing is reused; give --run/--cache to reuse), and prints
the time of each stage (reading and sampling, SentencePiece training, encoding, writing),
the counts, pairs per second, and the peak resident memory of this process (getrusage:
SentencePiece trains and encodes in-process, so its memory is counted). Run it on an
idle machine: the stages use every core.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine  # noqa: E402

from nmt import config  # noqa: E402
from nmt.prepare import describe, prepare_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run", type=Path, help="run directory (default: a new temporary one)")
    parser.add_argument("--cache", type=Path, help="prepared-data directory (default: a new temporary one)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="nmt: %(message)s", stream=sys.stderr)
    cfg = config.load_recipe(args.recipe, args.overrides)
    scratch = Path(tempfile.mkdtemp(prefix="nmt-prepare-bench-"))
    try:
        src, tgt = config.split_paths(cfg.data, "train")
        print(describe_machine())
        print(f"corpus: {src} + {tgt.name}, {(src.stat().st_size + tgt.stat().st_size) / 1e9:.2f} GB; "
              f"{cfg.tokenizer.vocab_size} pieces, sample {cfg.tokenizer.sample_sentences:,} lines per side")
        start = time.perf_counter()
        tokenizer, timings, reports = prepare_run(cfg, args.run or scratch / "run", progress=sys.stderr.isatty(),
                                                  cache=args.cache or scratch / "cache")
        wall = time.perf_counter() - start
        print(describe(tokenizer, timings, reports))
        pairs = reports[0].corpus.header["lines"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"wall time {wall:.1f} s ({pairs / wall:,.0f} training lines/s overall); "
              f"peak resident memory {peak:,.0f} MiB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
