"""Decoding speed: sentences/s and output tokens/s at beam 5 and greedy.

    python bench/decode_speed.py runs/multi30k-transformer [--src FILE] [--ref FILE]
        [--checkpoint best] [--beams 5 1] [--repeats 3] [--int8]

Translates the run's test split (or --src) several times per beam size and prints the
median sentences/s and output subword tokens/s, with BLEU against --ref (or the run's
test references), so a speed figure always comes with the quality it was measured at.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, median  # noqa: E402

from nmt import config  # noqa: E402
from nmt.checkpoint import load_run  # noqa: E402
from nmt.data import read_lines  # noqa: E402
from nmt.evaluate import bleu  # noqa: E402
from nmt.translate import translate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--src", type=Path)
    parser.add_argument("--ref", type=Path)
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--int8", action="store_true", help="decode with the int8 copy of the model (CPU)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, tokenizer, model = load_run(args.run, args.checkpoint, int8=args.int8)
    src_path, ref_path = config.split_paths(cfg.data, "test")
    src_path, ref_path = args.src or src_path, args.ref or ref_path
    lines = read_lines(src_path)
    refs = read_lines(ref_path) if ref_path.exists() else None
    print(describe_machine())
    precision = "int8" if args.int8 else "float32"
    print(f"model: {cfg.model.kind} from {args.run} ({args.checkpoint}, {precision}); "
          f"{len(lines)} sentences of {src_path}")
    for beam in args.beams:
        search = config.SearchConfig(**{**vars(cfg.search), "beam": beam, "n_best": 1})
        times, out_tokens, hyps = [], 0, []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = translate(model, tokenizer, lines, search)
            times.append(time.perf_counter() - start)
            out_tokens = sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)
            hyps = [r.texts[0] for r in results]
        t = median(times)
        quality = f", BLEU {bleu(hyps, refs).score:.2f}" if refs else ""
        print(f"beam {beam}: {len(lines) / t:,.1f} sentences/s, {out_tokens / t:,.0f} output tokens/s "
              f"(median of {args.repeats}: {t:.2f} s{quality})")


if __name__ == "__main__":
    main()
