"""Vocabulary shortlist sizes: BLEU and speed of each against the whole vocabulary, to choose one on valid.

    python bench/shortlist_sizes.py RUN [--sizes 50,50 100,100 200,100] [--split valid]
        [--beams 5 1] [--repeats 3] [--int8] [--checkpoint best]

Needs the run's table (``nmt shortlist RUN``). Translates the run's split (valid by
default: choose the size there, report on test) with the whole vocabulary and then with
each FIRST,BEST shortlist, at each beam size, and prints for each: BLEU, the median
sentences/s of --repeats rounds (every setting once per round; model loading excluded,
encoder included), the share of lines identical to the whole vocabulary's output, the mean
number of output-layer columns per batch (the union of the batch's lists) and the time spent
selecting and packing the output layer's rows per batch (with --int8, the int8 rows are
packed anew for every batch), in ms and as a share of the decoding time. A size whose BLEU matches the whole
vocabulary's at a higher speed is the one to put in search.shortlist.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine  # noqa: E402

from nmt import config  # noqa: E402
from nmt.data import read_parallel  # noqa: E402
from nmt.ensemble import load_ensemble  # noqa: E402
from nmt.metrics import bleu  # noqa: E402
from nmt.shortlist import FILE, Shortlisted, load_table  # noqa: E402
from nmt.translate import translate_text  # noqa: E402


class Timed:
    """Wraps a ``Shortlisted`` model's row selection (``OutputRows``) to count and time its calls."""

    def __init__(self, rows):
        self.rows, self.calls, self.seconds, self.columns = rows, 0, 0.0, 0

    def __call__(self, columns: torch.Tensor):
        start = time.perf_counter()
        layer = self.rows(columns)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.columns += len(columns)
        return layer


def sizes_arg(text: str) -> tuple[int, int]:
    sizes = config.SearchConfig(shortlist=text).shortlist_sizes()
    if sizes is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give FIRST,BEST")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--sizes", type=sizes_arg, nargs="+", default=[(50, 50), (100, 100), (200, 100)],
                        help="FIRST,BEST shortlists to compare (each at most what the table holds)")
    parser.add_argument("--split", default="valid", help="the recipe's split to translate (default valid)")
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--int8", action="store_true", help="decode with the int8 copy of the model (CPU)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, tokenizer, model = load_ensemble([args.run], args.checkpoint, int8=args.int8, shortlist="none")
    table = load_table(args.run)
    for first, best in args.sizes:
        table.check_sizes(first, best, args.run / FILE)
    src, ref = config.split_paths(cfg.data, args.split)
    lines, refs = read_parallel(src, ref)
    print(describe_machine())
    print(f"{args.run}: {len(lines)} sentences of {src}; {'int8' if args.int8 else 'float32'}; "
          f"median of {args.repeats}; table {args.run / FILE} ({table.pairs:,} pairs, {len(table.targets):,} entries)")
    print("| beam | shortlist | BLEU | sentences/s | speed-up | same lines | columns/batch | selection ms/batch |"
          "\n|---|---|---|---|---|---|---|---|")
    for beam in args.beams:
        search = dataclasses.replace(cfg.search, beam=beam, n_best=1, shortlist="")
        nets: list[tuple[tuple[int, int] | None, torch.nn.Module, Timed | None]] = [(None, model, None)]
        for sizes in args.sizes:
            net = Shortlisted(model, table, *sizes).eval()
            net.rows = Timed(net.rows)
            nets.append((sizes, net, net.rows))
        # Round after round, every setting once per round, so that a slow spell of a shared
        # machine falls on all of them rather than on one.
        speeds: list[list[float]] = [[] for _ in nets]
        hyps: list[list[str]] = [[] for _ in nets]
        for _ in range(args.repeats):
            for i, (_, net, _) in enumerate(nets):
                start = time.perf_counter()
                hyps[i] = translate_text(net, tokenizer, lines, search)
                speeds[i].append(len(lines) / (time.perf_counter() - start))
        base_speed = statistics.median(speeds[0])
        for (sizes, _, timed), out, runs in zip(nets, hyps, speeds):
            score = bleu(out, refs, "translations", str(ref), cfg.data.bleu_tokenize).score
            speed = statistics.median(runs)
            if sizes is None:
                print(f"| {beam} | none | {score:.2f} | {speed:.1f} | 1.00 | 100% | {len(tokenizer)} | - |")
                continue
            same = sum(a == b for a, b in zip(out, hyps[0])) / len(lines)
            per_batch = timed.seconds / timed.calls * 1000
            share = timed.seconds / (args.repeats * len(lines) / speed) * 100  # of the whole decoding time
            print(f"| {beam} | {sizes[0]},{sizes[1]} | {score:.2f} | {speed:.1f} | {speed / base_speed:.2f} | "
                  f"{same:.0%} | {timed.columns / timed.calls:.0f} | {per_batch:.2f} ({share:.1f}%) |")

if __name__ == "__main__":
    main()
