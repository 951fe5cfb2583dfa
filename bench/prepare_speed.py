"""Preparation speed: each stage's time and the peak memory of ``nmt prepare``.

    python bench/big_corpus.py                      # once: $NMT_DATA/multi30k-joined-x155
    python bench/prepare_speed.py recipes/multi30k/quick.yaml --set data.dir=multi30k-joined-x155

Runs ``nmt prepare`` on the recipe (train and valid splits) as a user would, in a child
process, with a new run directory and a new cache so that nothing is reused (give --run
and --cache to reuse), and prints its output (the time of each stage: reading and
sampling, SentencePiece training, reading, encoding and writing), the wall time, and the
child's peak resident memory (getrusage of the child: SentencePiece trains and encodes
inside it, so its memory is counted, and nothing this script imports is). Run it on an
idle machine: every stage uses all the cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run", type=Path, help="run directory (default: a new temporary one)")
    parser.add_argument("--cache", type=Path, help="NMT_CACHE for the run (default: a new temporary one)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="nmt-prepare-bench-"))
    try:
        env = {**os.environ, "NMT_CACHE": str(args.cache or scratch / "cache")}
        command = [sys.executable, "-m", "nmt", "prepare", str(args.recipe), "--run", str(args.run or scratch / "run"),
                   "--no-progress", *(f"--set={o}" for o in args.overrides)]
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"load average {os.getloadavg()[0]:.1f}")
        start = time.perf_counter()
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        print(done.stdout, end="")
        if done.returncode:
            sys.exit(done.returncode)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"wall time {wall:.1f} s; peak resident memory of nmt prepare {peak:,.0f} MiB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
