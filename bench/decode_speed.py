"""Decoding speed: sentences/s and output tokens/s at beam 5 and greedy, nmt beside CTranslate2.

    python bench/decode_speed.py runs/multi30k-transformer [--src FILE] [--ref FILE]
        [--checkpoint best] [--beams 5 1] [--repeats 3] [--threads N] [--workers N] [--int8]
        [--coverage-penalty X] [--shortlist FIRST,BEST] [--stop standard exact]
        [--ctranslate2 [TYPE ...]] [--ct2-mkl 0 1] [--ct2-isa AVX512 AVX2 ...]
        [--ct2-layouts 2x1 1x2] [--ct2-batch N] [--ct2-batch-type examples|tokens]

Translates the run's test split (or --src) several times per beam size and prints the
median sentences/s and output subword tokens/s, with BLEU against --ref (or the run's
test references), so a speed figure always comes with the quality it was measured at.
Beside each figure: the machine's float32 matmul rate at the shapes of a decoding step
(rows = sentences per batch x beam), and, in float32, the FLOPs the decoding took
(counted by torch.utils.flop_counter, with one worker) and the utilisation of that rate
they amount to. --workers N times nmt with N batches decoded at once (bench/decode_workers.py
compares the layouts). With --stop, each beam size runs under each stopping rule, and the
decoder steps (calls of the model's ``step``) and the rows they decoded are printed: the
cost of the exact rule.

With --ctranslate2, the run is exported to CTranslate2 (a temporary directory) and the same
lines are decoded by it at its best, to compare nmt with the fastest setting found:

- the engine: CTranslate2's own ``translate_batch`` on the whole input at once, split into
  batches by CTranslate2 (``max_batch_size``: --ct2-batch, default the run's
  ``search.max_sentences``, counted in --ct2-batch-type), so that with inter_threads > 1 it
  decodes batches in parallel. Beam, length limit (one per call: the longest of nmt's
  per-sentence limits) and the rules on <unk>, <s>, <pad> and min_len are nmt's export's;
  the length penalty is CTranslate2's own, log P / L^alpha with the run's alpha, and there is
  no coverage penalty. Tried in every compute type listed (default: all that
  ``ctranslate2.get_supported_compute_types("cpu")`` gives, a type counted once under the
  name CTranslate2 resolves it to), every thread layout intra_threads x inter_threads of
  --ct2-layouts (default: all that use exactly the cores) and every backend: one process per
  CT2_USE_MKL (--ct2-mkl) x CT2_FORCE_CPU_ISA (--ct2-isa, default the CPU's widest and AVX2)
  setting, since CTranslate2 reads them when it loads. Each backend's line says what
  CTranslate2 reported it selected (ISA, GEMM libraries).
- nmt's wrapper: ``nmt.export.ExportedModel.translate``, what ``nmt translate --engine
  ctranslate2 --workers N`` runs (nmt's batches, nmt's length penalty by re-ranking, the
  re-decoding at each sentence's own limit), in each compute type and layout (workers =
  inter_threads), with CTranslate2's default backend.

With --shortlist FIRST,BEST nmt decodes over the run's shortlist table (``nmt shortlist RUN``)
and the export carries the same table as CTranslate2's vocabulary map, decoded with use_vmap.

Every row says which of the two it is; the last lines set nmt beside the fastest engine row.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, decoder_matmul_shapes, describe_machine, matmul_rates_at, median  # noqa: E402

from nmt import config  # noqa: E402
from nmt.data import read_lines  # noqa: E402
from nmt.ensemble import load_ensemble  # noqa: E402
from nmt.metrics import bleu  # noqa: E402
from nmt.translate import translate  # noqa: E402

CHILD = "--ct2-child"  # argv[1] of the process that times CTranslate2 under one backend setting
BACKEND_ENV = ("CT2_USE_MKL", "CT2_FORCE_CPU_ISA")
# What CTranslate2 logs at load with CT2_VERBOSE=1 about the backend it selected.
BACKEND_LOG = re.compile(r"(Selected ISA|Use Intel MKL|SGEMM backend|GEMM_S16 backend|GEMM_S8 backend): (\S+)")


def main() -> None:
    if sys.argv[1:2] == [CHILD]:
        ctranslate2_child(Path(sys.argv[2]))
        return
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, tokenizer, model = load_ensemble([args.run], args.checkpoint, int8=args.int8, shortlist=args.shortlist)
    src_path, ref_path = config.split_paths(cfg.data, "test")
    src_path, ref_path = args.src or src_path, args.ref or ref_path
    lines = read_lines(src_path)
    refs = read_lines(ref_path) if ref_path.exists() else None
    print(describe_machine())
    precision = "int8" if args.int8 else "float32"
    shortlist = f", shortlist {cfg.search.shortlist}" if cfg.search.shortlist_sizes() else ""
    print(f"model: {cfg.model.kind} from {args.run} ({args.checkpoint}, {precision}{shortlist}); "
          f"{len(lines)} sentences of {src_path}")
    if args.coverage_penalty is not None:
        cfg.search = dataclasses.replace(cfg.search, coverage_penalty=args.coverage_penalty)
    nmt_rows = nmt_speed(args, cfg, tokenizer, model, lines, refs)
    if args.ctranslate2 is not None:
        if cfg.search.coverage_penalty:
            print(f"note: nmt decoded with coverage penalty {cfg.search.coverage_penalty}, which CTranslate2 "
                  "lacks; --coverage-penalty 0 compares like with like")
        engine_rows = ctranslate2_rows(args, cfg.search, lines, refs, cfg.data.bleu_tokenize)
        compare(nmt_rows, engine_rows, precision)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--src", type=Path)
    parser.add_argument("--ref", type=Path)
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads in all (default: torch's)")
    parser.add_argument("--workers", type=int, default=1, help="nmt: batches decoded at once (nmt translate --workers)")
    parser.add_argument("--int8", action="store_true", help="decode with the int8 copy of the model (CPU)")
    parser.add_argument("--coverage-penalty", type=float, help="nmt's coverage penalty (default: the run's)")
    parser.add_argument("--shortlist", default="none", metavar="FIRST,BEST",
                        help="decode over a vocabulary shortlist (nmt shortlist RUN first); CTranslate2 then "
                             "decodes with the same table as its vocabulary map (use_vmap)")
    parser.add_argument("--stop", nargs="+", choices=["standard", "exact"],
                        help="beam search stopping rules to compare (default: the run's)")
    parser.add_argument("--ctranslate2", nargs="*", metavar="TYPE",
                        help="also decode with the run exported to CTranslate2, in these compute types "
                             "(none given: every type CTranslate2 supports on this CPU)")
    parser.add_argument("--ct2-mkl", nargs="+", choices=["0", "1"], default=["0", "1"],
                        help="CT2_USE_MKL settings to try")
    parser.add_argument("--ct2-isa", nargs="+", choices=["AVX512", "AVX2", "AVX", "GENERIC"],
                        help="CT2_FORCE_CPU_ISA settings to try (default: the CPU's widest, and AVX2)")
    parser.add_argument("--ct2-layouts", nargs="+", metavar="INTRAxINTER",
                        help="thread layouts to try (default: every one that uses exactly the cores)")
    parser.add_argument("--ct2-batch", type=int, help="CTranslate2's max_batch_size (default: search.max_sentences)")
    parser.add_argument("--ct2-batch-type", choices=["examples", "tokens"], default="examples")
    args = parser.parse_args()
    if min(args.beams) < 1 or args.repeats < 1 or args.workers < 1:
        parser.error("--beams, --repeats and --workers must be at least 1")
    try:
        args.ct2_layouts = [tuple(int(n) for n in text.lower().split("x")) for text in args.ct2_layouts or []]
    except ValueError:
        parser.error("--ct2-layouts: give INTRAxINTER, e.g. 2x1 1x2")
    if any(len(layout) != 2 or min(layout) < 1 for layout in args.ct2_layouts):
        parser.error("--ct2-layouts: give INTRAxINTER with both at least 1, e.g. 2x1 1x2")
    return args


# --- nmt ------------------------------------------------------------------------------------------

def nmt_speed(args: argparse.Namespace, cfg: config.Config, tokenizer, model, lines: list[str],
              refs: list[str] | None) -> dict[int, tuple[float, str]]:
    """Time nmt at each beam (and stopping rule); returns {beam: (sentences/s, BLEU text)} of the first rule."""
    steps: list[int] = []  # rows of each decoder step; list.append is safe from several workers
    step = model.step

    def counted_step(tokens, *rest, **kwargs):
        steps.append(len(tokens))
        return step(tokens, *rest, **kwargs)

    model.step = counted_step
    stops = args.stop or [cfg.search.stop]
    rows: dict[int, tuple[float, str]] = {}
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    for beam, stop in itertools.product(args.beams, stops):
        if beam == 1 and stop != stops[0]:
            continue  # greedy search has no stopping rule
        search = dataclasses.replace(cfg.search, beam=beam, n_best=1, stop=stop)
        times, out_tokens, hyps = [], 0, []
        steps.clear()
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = translate(model, tokenizer, lines, search, workers=args.workers)
            times.append(time.perf_counter() - start)
            out_tokens = sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)
            hyps = [r.texts[0] for r in results]
        t = median(times)
        quality = f"BLEU {bleu(hyps, refs, tokenize=cfg.data.bleu_tokenize).score:.2f}" if refs else "no BLEU"
        counts = f", {len(steps) / args.repeats:,.0f} decoder steps of {sum(steps) / max(len(steps), 1):,.1f} rows"
        label = f"beam {beam}" + (f" ({stop} stop)" if beam > 1 else "")
        print(f"nmt {label}: {len(lines) / t:,.1f} sentences/s, {out_tokens / t:,.0f} output tokens/s "
              f"(median of {args.repeats}: {t:.2f} s, {quality}{counts}{workers})")
        print("  " + matmul_line(model, tokenizer, cfg, search, lines, t, args.int8))
        rows.setdefault(beam, (len(lines) / t, quality))
    model.step = step
    return rows


def matmul_line(model, tokenizer, cfg: config.Config, search: config.SearchConfig, lines: list[str],
                seconds: float, int8: bool) -> str:
    """The float32 matmul rate at a decoding step's shapes and, for float32 models, the
    decoding's FLOPs and utilisation of the median of those rates."""
    sentences = min(search.max_sentences, len(lines))
    rows = sentences * search.beam
    rates = matmul_rates_at(decoder_matmul_shapes(cfg.model, len(tokenizer), rows))
    text = (f"matmul GFLOP/s at a step's shapes ({rows} rows = {sentences} sentences x beam {search.beam}): "
            + " | ".join(f"{shape} {rate:,.0f}" for shape, rate in rates.items()))
    if int8:
        return text + "; FLOPs not counted for int8 (the counter does not see quantized kernels)"
    flops = count_flops(lambda: translate(model, tokenizer, lines, search))  # one worker: the counter is per thread
    achieved = flops / seconds / 1e9
    return (text + f"; decoding {flops / len(lines) / 1e9:.2f} GFLOP per sentence, {achieved:,.1f} GFLOP/s, "
            f"{achieved / median(list(rates.values())):.0%} of the median rate")


# --- CTranslate2: the parent -----------------------------------------------------------------------

def cpu_isas() -> list[str]:
    """The default CT2_FORCE_CPU_ISA settings: the CPU's widest vector ISA, and AVX2 where it has it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    isas = [isa for flag, isa in (("avx512f", "AVX512"), ("avx2", "AVX2")) if flag in flags]
    return isas or ["AVX" if "avx" in flags else "GENERIC"]


def default_layouts(cores: int) -> list[tuple[int, int]]:
    """Every intra_threads x inter_threads that uses exactly ``cores``, one batch at a time first."""
    return [(cores // inter, inter) for inter in range(1, cores + 1) if cores % inter == 0]


def ctranslate2_rows(args: argparse.Namespace, search: config.SearchConfig, lines: list[str],
                     refs: list[str] | None, tokenize: str) -> list[dict]:
    """Export the run, time CTranslate2 under each backend setting (a process each) and nmt's
    wrapper under the default one; print a line per measurement and return the engine's rows."""
    from nmt.export import export_ctranslate2

    cores = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "ct2"
        export_ctranslate2(args.run, model_dir, args.checkpoint,
                           shortlist=search.shortlist if search.shortlist_sizes() else False)
        (Path(tmp) / "src.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        spec = {"model": str(model_dir), "src": str(Path(tmp) / "src.txt"), "refs": refs, "tokenize": tokenize,
                "search": dataclasses.asdict(dataclasses.replace(search, n_best=1, coverage_penalty=0.0,
                                                                 stop="standard")),
                "beams": args.beams, "repeats": args.repeats, "compute_types": args.ctranslate2 or None,
                "layouts": args.ct2_layouts or default_layouts(cores),
                "batch": args.ct2_batch or search.max_sentences, "batch_type": args.ct2_batch_type}
        settings = [{"CT2_USE_MKL": mkl, "CT2_FORCE_CPU_ISA": isa}
                    for mkl, isa in itertools.product(args.ct2_mkl, args.ct2_isa or cpu_isas())]
        engine_rows = []
        for env in settings:
            engine_rows += run_child(Path(tmp), spec, env, wrapper=False)
        run_child(Path(tmp), spec, {}, wrapper=True)
    return engine_rows


def run_child(tmp: Path, spec: dict, env: dict[str, str], wrapper: bool) -> list[dict]:
    """Time CTranslate2 in a fresh process under ``env`` (the backend), print its lines, return its rows."""
    path = tmp / "spec.json"
    path.write_text(json.dumps({**spec, "wrapper": wrapper}), encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if k not in BACKEND_ENV}
    proc = subprocess.run([sys.executable, __file__, CHILD, str(path)], env={**base, **env, "CT2_VERBOSE": "1"},
                          capture_output=True, text=True, check=False)
    backend = " ".join(f"{k}={v}" for k, v in env.items()) or "default backend"
    selected = dict(BACKEND_LOG.findall(proc.stderr))
    print(f"ctranslate2, {backend}: " + (", ".join(f"{k} {v}" for k, v in selected.items()) or "nothing reported"))
    if proc.returncode != 0:
        print(f"  failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        return []
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        row["backend"] = backend
        print("  " + describe_row(row))
    return [row for row in rows if "seconds" in row]


def describe_row(row: dict) -> str:
    if "note" in row:
        return f"{row['compute_type']}: {row['note']}"
    what = ("nmt's wrapper (ExportedModel.translate)" if row["wrapper"]
            else "CTranslate2 engine (translate_batch)")
    t = median(row["seconds"])
    quality = bleu_text(row["bleu"])
    return (f"{what}, {row['compute_type']}, intra {row['intra']} x inter {row['inter']}, beam {row['beam']}: "
            f"{row['sentences'] / t:,.1f} sentences/s, {row['out_tokens'] / t:,.0f} output tokens/s "
            f"(median of {len(row['seconds'])}: {t:.2f} s, {quality})")


def bleu_text(score: float | None) -> str:
    return "no BLEU" if score is None else f"BLEU {score:.2f}"


def compare(nmt_rows: dict[int, tuple[float, str]], engine_rows: list[dict], precision: str) -> None:
    """nmt beside the fastest engine row per beam, of any compute type and in nmt's precision."""
    for beam, (speed, quality) in nmt_rows.items():
        at_beam = [r for r in engine_rows if r["beam"] == beam]
        print(f"beam {beam}: nmt ({precision}) {speed:,.1f} sentences/s ({quality})")
        same = [r for r in at_beam if r["compute_type"].split("_")[0] == precision]
        for what, rows in (("fastest CTranslate2 engine", at_beam), (f"fastest at {precision}", same)):
            if rows:
                best = min(rows, key=lambda r: median(r["seconds"]))
                best_speed = best["sentences"] / median(best["seconds"])
                print(f"  {what}: {best_speed:,.1f} sentences/s, {best['backend']}, {best['compute_type']}, "
                      f"intra {best['intra']} x inter {best['inter']} ({bleu_text(best['bleu'])}); "
                      f"nmt at {speed / best_speed:.2f}x")


# --- CTranslate2: the child (one backend setting) ----------------------------------------------------

def ctranslate2_child(spec_path: Path) -> None:
    """Print a JSON line per (compute type, layout, beam) timed, as ``spec_path`` asks."""
    import ctranslate2

    from nmt.export import ExportedModel

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    lines = read_lines(Path(spec["src"]))
    search = config.SearchConfig(**spec["search"])
    supported = sorted(ctranslate2.get_supported_compute_types("cpu"))
    asked = spec["compute_types"] or supported
    done = set()
    for compute_type, (intra, inter) in itertools.product(asked, spec["layouts"]):
        try:
            engine = ExportedModel(Path(spec["model"]), "cpu", compute_type, threads=intra * inter, workers=inter)
        except Exception as e:  # an unsupported type or backend: say so and go on with the others
            print(json.dumps({"compute_type": compute_type, "note": f"{type(e).__name__}: {e}"}), flush=True)
            continue
        resolved = engine.translator.compute_type  # "int8" is "int8_float32" here, say
        if (resolved, intra, inter) in done:
            if (intra, inter) == tuple(spec["layouts"][0]):
                print(json.dumps({"compute_type": compute_type, "note": f"runs as {resolved} here, timed once"}),
                      flush=True)
            continue
        done.add((resolved, intra, inter))
        for beam in spec["beams"]:
            cfg = dataclasses.replace(search, beam=beam)
            decode = wrapper_call(engine, lines, cfg) if spec["wrapper"] else engine_call(engine, lines, cfg, spec)
            decode(min(64, len(lines)))  # warm-up: the first calls allocate
            seconds = []
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                texts, out_tokens = decode(len(lines))
                seconds.append(time.perf_counter() - start)
            score = bleu(texts, spec["refs"], tokenize=spec["tokenize"]).score if spec["refs"] else None
            print(json.dumps({"wrapper": spec["wrapper"], "compute_type": resolved, "intra": intra, "inter": inter,
                              "beam": beam, "seconds": seconds, "sentences": len(lines), "out_tokens": out_tokens,
                              "bleu": score}), flush=True)


def wrapper_call(engine, lines: list[str], cfg: config.SearchConfig):
    """nmt's wrapper on the first n lines: (texts, output tokens)."""
    def decode(n: int) -> tuple[list[str], int]:
        results = engine.translate(lines[:n], cfg)
        return [r.texts[0] for r in results], sum(len(r.hypotheses[0].tokens) + 1 for r in results if r.hypotheses)
    return decode


def engine_call(engine, lines: list[str], cfg: config.SearchConfig, spec: dict):
    """CTranslate2's own translate_batch on the first n lines in one call: (texts, output tokens)."""
    from nmt.export import BOS_PIECE, EOS_PIECE, PAD_PIECE
    from nmt.search import max_lengths
    from nmt.translate import source_ids

    tokenizer = engine.tokenizer
    ids = source_ids(tokenizer, lines, engine.max_positions - 1, "src")  # room for EOS, as nmt's export
    limit = int(max_lengths(torch.tensor([len(s) + 1 for s in ids]), cfg, engine.max_positions).max())
    options = {"beam_size": cfg.beam, "length_penalty": cfg.length_penalty, "max_decoding_length": max(limit - 1, 1),
               "min_decoding_length": cfg.min_len, "disable_unk": True, "max_input_length": 0,
               "suppress_sequences": [[BOS_PIECE], [PAD_PIECE]], "use_vmap": cfg.shortlist_sizes() is not None,
               "max_batch_size": spec["batch"], "batch_type": spec["batch_type"]}
    pieces = [[tokenizer.sp.IdToPiece(i) for i in seq] + [EOS_PIECE] for seq in ids]

    def decode(n: int) -> tuple[list[str], int]:
        todo = [i for i in range(n) if ids[i]]  # an empty line stays empty, as in nmt
        results = engine.translator.translate_batch([pieces[i] for i in todo], **options)
        best = [[]] * n
        for i, result in zip(todo, results):
            best[i] = [tokenizer.sp.PieceToId(p) for p in result.hypotheses[0]]
        return tokenizer.decode(best), sum(len(tokens) + 1 for tokens in best if tokens)
    return decode


if __name__ == "__main__":
    main()
