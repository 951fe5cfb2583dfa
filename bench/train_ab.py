"""Training speed of two source trees of nmt, in alternating windows on the same data.

    python bench/train_ab.py OLD_TREE RECIPE --spm runs/X/spm.model [--new-tree .]
        [--rounds 5] [--steps 10] [--warmup 3] [--set key=value]

Each window runs in a child process of its own with ``PYTHONPATH=TREE`` (an old checkout made
with ``git worktree add /tmp/old COMMIT`` runs beside the working tree): it builds the trainer of
that tree on the recipe's prepared data, makes ``--warmup`` updates, then times ``--steps``
updates of the trainer's own ``update`` on what its data side hands it (on a GPU, up to the end
of the queued work) and prints target tokens/s. The trees take turns (old, new, old, new, ...),
so that both see the same load on a shared machine; the script prints every window, the median
of each tree and the ratio of the medians. Needs the recipe's data (set NMT_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, tempfile, time
import torch
import nmt
from nmt import config, distributed
from nmt.train import Trainer

job = json.loads(sys.argv[1])
cfg = config.load_recipe(job["recipe"], job["overrides"])
with tempfile.TemporaryDirectory(prefix="nmt-ab-") as run:
    trainer = Trainer(cfg, run, progress_bar=False)
    for _ in range(job["warmup"]):
        trainer.update(next(trainer.updates))
    distributed.synchronize(trainer.device)
    start, tokens = time.perf_counter(), 0
    for _ in range(job["steps"]):
        tokens += trainer.update(next(trainer.updates))[2]
    distributed.synchronize(trainer.device)
    seconds = time.perf_counter() - start
print(json.dumps({"nmt": nmt.__file__, "tokens": tokens, "seconds": seconds}))
"""


def window(tree: Path, job: dict) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], env=env, cwd=tree, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"train_ab: the trainer of {tree} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.splitlines()[-1])
    if not Path(result["nmt"]).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"train_ab: {tree} imported nmt from {result['nmt']}, not from its own tree")
    return result["tokens"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old_tree", type=Path)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--new-tree", type=Path, default=Path("."))
    parser.add_argument("--spm", type=Path, required=True, help="SentencePiece model to reuse")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    job = {"recipe": str(args.recipe.resolve()), "warmup": args.warmup, "steps": args.steps,
           "overrides": [f"tokenizer.reuse={args.spm.resolve()}", "train.valid_every=0", *args.overrides]}
    rates: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, tree in (("old", args.old_tree), ("new", args.new_tree)):
            rates[name].append(window(tree, job))
            print(f"round {r + 1} {name}: {rates[name][-1]:,.0f} target tokens/s", flush=True)
    old, new = (statistics.median(rates[k]) for k in ("old", "new"))
    print(f"median old {old:,.0f}, new {new:,.0f} target tokens/s; new/old {new / old:.3f}")


if __name__ == "__main__":
    main()
