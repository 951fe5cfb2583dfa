"""Data-parallel updates of two source trees of nmt: job tokens/s and the exposed gradient all-reduce.

    python bench/ddp_overlap.py OLD_TREE RECIPE --spm runs/X/spm.model [--new-tree .]
        [--procs 2] [--rounds 3] [--steps 20] [--warmup 3] [--set key=value]

Each round runs, for each tree in turn (old, new, old, new, ...), ``--procs`` ranks under
torchrun (gloo on the CPU, NCCL on GPUs) with ``PYTHONPATH=TREE``. Every rank builds the tree's
trainer on the recipe's prepared data and makes ``--warmup`` and then ``--steps`` updates as
``nmt train`` makes them (the update's target tokens summed over ranks first); rank 0 prints:

- the job's target tokens/s over all ranks;
- the median time from the end of an update's last backward pass to the start of its optimizer
  step (``GradScaler.unscale_``): the all-reduce that nothing overlaps. Where DDP sums the
  gradients during the backward pass, the wait for its last buckets is inside that pass, so
  this figure is near zero by construction and the job's tokens/s is the figure to compare.

Then the medians per tree and their ratios. Needs the recipe's data (set NMT_DATA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_training_arguments, run_in_tree, training_job  # noqa: E402

CHILD = r"""
import json, statistics, sys, tempfile, time
import torch
import nmt
import nmt.train as training
from nmt import config, distributed

job = json.loads(sys.argv[1])
ended, exposed = [None], []
forward_backward = training.Trainer._forward_backward
unscale = torch.amp.GradScaler.unscale_

def stamped(self, *args, **kwargs):
    result = forward_backward(self, *args, **kwargs)
    ended[0] = time.perf_counter()
    return result

def timed_unscale(self, optimizer):
    if ended[0] is not None:
        exposed.append(time.perf_counter() - ended[0])
        ended[0] = None
    return unscale(self, optimizer)

training.Trainer._forward_backward = stamped
torch.amp.GradScaler.unscale_ = timed_unscale
cfg = config.load_recipe(job["recipe"], job["overrides"])
ctx = distributed.setup(cfg.train.dist_timeout_minutes)
run = job["run"]
trainer = training.Trainer(cfg, run, progress_bar=False, ctx=ctx)

def update():
    upd = next(trainer.updates)
    total = int(distributed.all_sum(ctx, [float(upd.target_tokens)])[0])
    trainer.update(upd, total)
    return total

for _ in range(job["warmup"]):
    update()
exposed.clear()
distributed.synchronize(trainer.device)
distributed.barrier(ctx)
start, tokens = time.perf_counter(), 0
for _ in range(job["steps"]):
    tokens += update()
distributed.synchronize(trainer.device)
seconds = time.perf_counter() - start
if ctx.main:
    ddp = getattr(trainer, "ddp", None) is not None
    print(json.dumps({"nmt": nmt.__file__, "tokens_per_s": tokens / seconds,
                      "exposed_ms": 1000 * statistics.median(exposed), "ddp": ddp}))
distributed.teardown()
"""


def job_run(tree: Path, job: dict, procs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="nmt-ddp-") as run:
        child = Path(run) / "child.py"
        child.write_text(CHILD, encoding="utf-8")
        return run_in_tree(tree, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={procs}", str(child), json.dumps({**job, "run": run})],
                           "ddp_overlap: the job", {"OMP_NUM_THREADS": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, rounds=3, steps=20)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()

    job = training_job(args, "train.threads=1")
    found: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, tree in (("old", args.old_tree), ("new", args.new_tree)):
            found[name].append(job_run(tree, job, args.procs))
            f = found[name][-1]
            print(f"round {r + 1} {name}: {f['tokens_per_s']:,.0f} target tokens/s, all-reduce exposed after the "
                  f"backward pass {f['exposed_ms']:.1f} ms (DDP: {f['ddp']})", flush=True)
    med = {name: {k: statistics.median(f[k] for f in runs) for k in ("tokens_per_s", "exposed_ms")}
           for name, runs in found.items()}
    for name, m in med.items():
        print(f"median {name}: {m['tokens_per_s']:,.0f} target tokens/s, exposed all-reduce {m['exposed_ms']:.1f} ms")
    print(f"new/old tokens/s {med['new']['tokens_per_s'] / med['old']['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
