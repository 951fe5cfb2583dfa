"""Translations and decoding time of two source trees of nmt, on the same run and lines.

    python bench/compare_outputs.py OLD_TREE RUN [--new-tree .] [--src FILE] [--lines 300]
        [--beams 5 1] [--alphas 0.6 1.0] [--betas 0 0.2] [--rounds 2] [--threads 1]

Each tree decodes in a child process of its own (``PYTHONPATH=TREE``), so an old checkout
(``git worktree add /tmp/old COMMIT``) runs beside the working tree. For every search
setting the script prints how many lines differ and, for each differing line, both
hypotheses with the scores each tree gave them, so a changed line can be explained (a near
tie between two hypotheses, say). With ``--rounds N`` the trees decode alternately (old,
new, old, new, ...) N times each and the ratios of the median times are printed, wall clock
and the process's CPU time: on a shared machine, alternating keeps the load the two see
alike, and the CPU time leaves out the time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_tree_arguments, run_in_tree  # noqa: E402

CHILD = r"""
import dataclasses, json, sys, time
import torch
import nmt
try:
    from nmt.rundir import load_run
except ImportError:  # a tree from before nmt.rundir, whose checkpoint module loaded runs
    from nmt.checkpoint import load_run
from nmt.translate import translate

job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
cfg, tokenizer, model = load_run(job["run"], job["checkpoint"])
lines = open(job["src"], encoding="utf-8").read().splitlines()[: job["lines"]]
out = {"nmt": nmt.__file__, "settings": []}
for beam, alpha, beta in job["settings"]:
    search = dataclasses.replace(cfg.search, beam=beam, n_best=1, length_penalty=alpha, coverage_penalty=beta)
    start, cpu = time.perf_counter(), time.process_time()
    results = translate(model, tokenizer, lines, search)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    hyps = [[r.texts[0], r.hypotheses[0].score, r.hypotheses[0].log_prob] if r.hypotheses else [r.texts[0], None, None]
            for r in results]
    out["settings"].append({"seconds": seconds, "cpu": cpu, "hyps": hyps})
print(json.dumps(out))
"""


def decode(tree: Path, job: dict) -> dict:
    return run_in_tree(tree, [sys.executable, "-c", CHILD, json.dumps(job)], "compare_outputs: the decoder",
                       {"OMP_NUM_THREADS": str(job["threads"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tree_arguments(parser, "run", "the run directory both trees decode with")
    parser.add_argument("--src", type=Path, help="source lines (default: the run's test split)")
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.6, 1.0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--rounds", type=int, default=1, help="decodings per tree, alternating, for timing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    src = args.src
    if src is None:
        sys.path.insert(0, str(args.new_tree.resolve()))
        from nmt import config

        src, _ = config.split_paths(config.load_recipe(args.run / "config.yaml").data, "test")
    settings = [(b, a, c) for b in args.beams for a in args.alphas for c in args.betas
                if b > 1 or c == args.betas[0]]  # greedy has no coverage penalty
    job = {"run": str(args.run.resolve()), "checkpoint": args.checkpoint, "src": str(Path(src).resolve()),
           "lines": args.lines, "threads": args.threads, "settings": settings}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(max(args.rounds, 1)):
        runs["old"].append(decode(args.old_tree, job))
        runs["new"].append(decode(args.new_tree, job))

    print(f"{args.run} ({args.checkpoint}), {args.lines} lines of {src}, {args.threads} thread(s); "
          f"old {args.old_tree}, new {args.new_tree}")
    for i, (beam, alpha, beta) in enumerate(settings):
        old = runs["old"][0]["settings"][i]["hyps"]
        new = runs["new"][0]["settings"][i]["hyps"]
        differ = [j for j, (o, n) in enumerate(zip(old, new, strict=True)) if o[0] != n[0]]
        t_old, t_new = (statistics.median(r["settings"][i]["seconds"] for r in runs[tree]) for tree in ("old", "new"))
        c_old, c_new = (statistics.median(r["settings"][i]["cpu"] for r in runs[tree]) for tree in ("old", "new"))
        label = f"beam {beam}, alpha {alpha}, beta {beta}" if beam > 1 else f"greedy, alpha {alpha}"
        print(f"{label}: {len(differ)} of {len(old)} lines differ; median of {args.rounds}: wall old {t_old:.2f} s, "
              f"new {t_new:.2f} s ({t_old / t_new:.2f}x); process CPU old {c_old:.2f} s, new {c_new:.2f} s "
              f"({c_old / c_new:.2f}x)")
        for j in differ:
            print(f"  line {j + 1}: old score {old[j][1]:.6f} log P {old[j][2]:.6f}: {old[j][0]}")
            print(f"  {' ' * len(str(j + 1))}       new score {new[j][1]:.6f} log P {new[j][2]:.6f}: {new[j][0]}")


if __name__ == "__main__":
    main()
