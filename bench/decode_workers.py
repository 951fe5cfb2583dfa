"""Parallel batches: sentences/s of nmt's decoding per layout, workers x intra-op threads.

    python bench/decode_workers.py runs/multi30k-transformer [--workers 1 2] [--beams 5 1]
        [--repeats 3] [--int8] [--src FILE] [--ref FILE] [--checkpoint best] [--threads N]

Translates the run's test split (or --src) with ``nmt.translate.translate(..., workers=N)``
for each N of --workers, each worker on (threads // N) intra-op threads, where threads is
--threads or torch's default (the usable cores): the layouts ``--workers N`` gives on the
command line. The repeats go round the layouts in turn, so that a change in the machine's
load falls on all of them alike; the median sentences/s of each is printed with its output
tokens/s, its BLEU against --ref (or the run's test references) and whether its output is
the same as the first layout's (it must be: each sentence's search is independent of its
batch). The layout with the most sentences/s on an idle machine is the one to make the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, median  # noqa: E402

from nmt import config  # noqa: E402
from nmt.data import read_lines  # noqa: E402
from nmt.metrics import bleu  # noqa: E402
from nmt.rundir import load_run  # noqa: E402
from nmt.translate import translate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="layouts to time")
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="decode with the int8 copy of the model")
    parser.add_argument("--src", type=Path)
    parser.add_argument("--ref", type=Path)
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads in all (default: torch's)")
    args = parser.parse_args()
    if min(args.workers) < 1 or min(args.beams) < 1 or args.repeats < 1:
        parser.error("--workers, --beams and --repeats must be at least 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg, tokenizer, model = load_run(args.run, args.checkpoint, "cpu", int8=args.int8)
    src_path, ref_path = config.split_paths(cfg.data, "test")
    src_path, ref_path = args.src or src_path, args.ref or ref_path
    lines = read_lines(src_path)
    refs = read_lines(ref_path) if ref_path.exists() else None
    print(describe_machine())
    print(f"model: {cfg.model.kind} from {args.run} ({args.checkpoint}, {'int8' if args.int8 else 'float32'}); "
          f"{len(lines)} sentences of {src_path}; {threads} intra-op threads to share")
    for beam in args.beams:
        search = dataclasses.replace(cfg.search, beam=beam, n_best=1)
        translate(model, tokenizer, lines[:64], search)  # warm-up: the first calls allocate
        times: dict[int, list[float]] = {n: [] for n in args.workers}
        texts: dict[int, list[str]] = {}
        out_tokens: dict[int, int] = {}
        for _ in range(args.repeats):
            for n in args.workers:
                start = time.perf_counter()
                results = translate(model, tokenizer, lines, search, workers=n)
                times[n].append(time.perf_counter() - start)
                texts[n] = [r.texts[0] for r in results]
                out_tokens[n] = sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)
        reference = texts[args.workers[0]]
        for n in args.workers:
            t = median(times[n])
            quality = f", BLEU {bleu(texts[n], refs, tokenize=cfg.data.bleu_tokenize).score:.2f}" if refs else ""
            same = "same output" if texts[n] == reference else (
                f"OUTPUT DIFFERS on {sum(a != b for a, b in zip(texts[n], reference))} lines")
            print(f"beam {beam}, {count(n, 'worker')} x {count(max(1, threads // n), 'thread')}: "
                  f"{len(lines) / t:,.1f} sentences/s, {out_tokens[n] / t:,.0f} output tokens/s "
                  f"(median of {args.repeats}: {t:.2f} s{quality}; {same} as {count(args.workers[0], 'worker')})")


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


if __name__ == "__main__":
    main()
