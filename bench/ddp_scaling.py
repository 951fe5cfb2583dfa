"""Data-parallel overhead on the CPU: 1 process x T threads against T processes x 1 thread.

    python bench/ddp_scaling.py recipes/multi30k/transformer.yaml --spm runs/X/spm.model
        [--procs 2] [--steps 30] [--set key=value]

Trains the recipe for ``--steps`` updates both ways through ``nmt train`` (the second with
``--nproc``, i.e. torchrun and gloo) and reads target tokens/s from each run's log.jsonl:
the median over logged windows after the first. Scaling efficiency is the multi-process
figure over the single-process one; on a CPU both use the same cores, so this measures
the overhead of gradient all-reduce and of duplicated work, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine  # noqa: E402


def run(recipe: Path, run_dir: Path, overrides: list[str], nproc: int, threads: int) -> float:
    args = [sys.executable, "-m", "nmt", "-q", "train", str(recipe), "--run", str(run_dir), "--no-test",
            "--no-progress", "--nproc", str(nproc), "--set", f"train.threads={threads}"]
    for item in overrides:
        args += ["--set", item]
    subprocess.run(args, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    rates = [json.loads(line)["tokens_per_s"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if '"event": "train"' in line]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--spm", type=Path, required=True, help="SentencePiece model to reuse")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    overrides = [f"tokenizer.reuse={args.spm.resolve()}", f"train.max_steps={args.steps}",
                 "train.valid_every=0", f"train.log_every={max(args.steps // 6, 1)}", *args.overrides]
    print(describe_machine())
    with tempfile.TemporaryDirectory(prefix="nmt-ddp-") as tmp:
        single = run(args.recipe, Path(tmp) / "single", overrides, 1, args.procs)
        multi = run(args.recipe, Path(tmp) / "multi", overrides, args.procs, 1)
    print(f"1 process x {args.procs} threads: {single:,.0f} target tokens/s")
    print(f"{args.procs} processes x 1 thread (gloo): {multi:,.0f} target tokens/s "
          f"(global batch {args.procs}x larger per update)")
    print(f"scaling efficiency: {multi / single:.0%}")


if __name__ == "__main__":
    main()
