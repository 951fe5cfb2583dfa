"""Decoding speed: sentences/s and output tokens/s at beam 5 and greedy.

    python bench/decode_speed.py runs/multi30k-transformer [--src FILE] [--ref FILE]
        [--checkpoint best] [--beams 5 1] [--repeats 3] [--int8] [--stop standard exact]

Translates the run's test split (or --src) several times per beam size and prints the
median sentences/s and output subword tokens/s, with BLEU against --ref (or the run's
test references), so a speed figure always comes with the quality it was measured at.
Beside each figure: the machine's float32 matmul rate at the shapes of a decoding step
(rows = sentences per batch x beam), and, in float32, the FLOPs the decoding took
(counted by torch.utils.flop_counter) and the utilisation of that rate they amount to.
With --stop, each beam size runs under each stopping rule, and the decoder steps (calls of
the model's ``step``) and the rows they decoded are printed: the cost of the exact rule.
With --ctranslate2 float32 int8, the run is also exported to CTranslate2 (a temporary
directory) and the same lines are decoded by it, in each compute type, at each beam size.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, decoder_matmul_shapes, describe_machine, matmul_rates_at, median  # noqa: E402

from nmt import config  # noqa: E402
from nmt.data import read_lines  # noqa: E402
from nmt.metrics import bleu  # noqa: E402
from nmt.rundir import load_run  # noqa: E402
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
    parser.add_argument("--stop", nargs="+", choices=["standard", "exact"],
                        help="beam search stopping rules to compare (default: the run's)")
    parser.add_argument("--ctranslate2", nargs="+", choices=["float32", "int8"],
                        help="also decode with the run exported to CTranslate2, in these compute types")
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
    calls = [0, 0]  # decoder steps, rows decoded
    step = model.step

    def counted_step(tokens, *rest, **kwargs):
        calls[0], calls[1] = calls[0] + 1, calls[1] + len(tokens)
        return step(tokens, *rest, **kwargs)

    model.step = counted_step
    stops = args.stop or [cfg.search.stop]
    for beam, stop in itertools.product(args.beams, stops):
        if beam == 1 and stop != stops[0]:
            continue  # greedy search has no stopping rule
        search = dataclasses.replace(cfg.search, beam=beam, n_best=1, stop=stop)
        times, out_tokens, hyps = [], 0, []
        calls[:] = [0, 0]
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = translate(model, tokenizer, lines, search)
            times.append(time.perf_counter() - start)
            out_tokens = sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)
            hyps = [r.texts[0] for r in results]
        t = median(times)
        quality = f", BLEU {bleu(hyps, refs, tokenize=cfg.data.bleu_tokenize).score:.2f}" if refs else ""
        steps = f", {calls[0] / args.repeats:,.0f} decoder steps of {calls[1] / max(calls[0], 1):,.1f} rows"
        label = f"beam {beam}" + (f" ({stop} stop)" if beam > 1 else "")
        print(f"{label}: {len(lines) / t:,.1f} sentences/s, {out_tokens / t:,.0f} output tokens/s "
              f"(median of {args.repeats}: {t:.2f} s{quality}{steps})")
        print("  " + matmul_line(model, tokenizer, cfg, search, lines, t, args.int8))
    if args.ctranslate2:
        ctranslate2_rows(args, cfg.search, lines, refs, cfg.data.bleu_tokenize)


def matmul_line(model, tokenizer, cfg: config.Config, search: config.SearchConfig, lines: list[str],
                seconds: float, int8: bool) -> str:
    """The float32 matmul rate at a decoding step's shapes and, for float32 models, the
    decoding's FLOPs and utilisation of the median of those rates."""
    sentences = min(search.max_sentences, len(lines))
    rows = sentences * search.beam
    rates = matmul_rates_at(decoder_matmul_shapes(cfg.model, model.embed.num_embeddings, rows))
    text = (f"matmul GFLOP/s at a step's shapes ({rows} rows = {sentences} sentences x beam {search.beam}): "
            + " | ".join(f"{shape} {rate:,.0f}" for shape, rate in rates.items()))
    if int8:
        return text + "; FLOPs not counted for int8 (the counter does not see quantized kernels)"
    flops = count_flops(lambda: translate(model, tokenizer, lines, search))
    achieved = flops / seconds / 1e9
    return (text + f"; decoding {flops / len(lines) / 1e9:.2f} GFLOP per sentence, {achieved:,.1f} GFLOP/s, "
            f"{achieved / median(list(rates.values())):.0%} of the median rate")


def ctranslate2_rows(args: argparse.Namespace, search: config.SearchConfig, lines: list[str],
                     refs: list[str] | None, tokenize: str) -> None:
    """The same lines decoded by the run exported to CTranslate2, per compute type and beam."""
    from nmt.export import ExportedModel, export_ctranslate2

    with tempfile.TemporaryDirectory() as tmp:
        export_ctranslate2(args.run, Path(tmp) / "ct2", args.checkpoint)
        for compute_type in args.ctranslate2:
            engine = ExportedModel(Path(tmp) / "ct2", device="cpu", compute_type=compute_type)
            for beam in args.beams:
                cfg = dataclasses.replace(search, beam=beam, n_best=1, stop="standard")
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    results = engine.translate(lines, cfg)
                    times.append(time.perf_counter() - start)
                t = median(times)
                out_tokens = sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)
                texts = [r.texts[0] for r in results]
                quality = f", BLEU {bleu(texts, refs, tokenize=tokenize).score:.2f}" if refs else ""
                print(f"ctranslate2 {compute_type} beam {beam}: {len(lines) / t:,.1f} sentences/s, "
                      f"{out_tokens / t:,.0f} output tokens/s (median of {args.repeats}: {t:.2f} s{quality})")


if __name__ == "__main__":
    main()
