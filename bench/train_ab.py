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
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_training_arguments, run_in_tree, training_job  # noqa: E402

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
    result = run_in_tree(tree, [sys.executable, "-c", CHILD, json.dumps(job)], "train_ab: the trainer")
    return result["tokens"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, rounds=5, steps=10)
    args = parser.parse_args()

    job = training_job(args)
    rates: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, tree in (("old", args.old_tree), ("new", args.new_tree)):
            rates[name].append(window(tree, job))
            print(f"round {r + 1} {name}: {rates[name][-1]:,.0f} target tokens/s", flush=True)
    old, new = (statistics.median(rates[k]) for k in ("old", "new"))
    print(f"median old {old:,.0f}, new {new:,.0f} target tokens/s; new/old {new / old:.3f}")


if __name__ == "__main__":
    main()
