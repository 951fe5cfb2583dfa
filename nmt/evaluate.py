"""Translate a run's test set and score it, and choose its search settings on a validation set.

``evaluate_run`` is ``nmt eval --model``: it translates with a run (or an ensemble of runs),
scores the output with ``nmt.metrics`` and keeps scores and translations in the run's
``eval/``, where ``nmt report`` reads them. ``sweep_run`` is ``nmt eval --sweep``: it
translates once per combination of search settings and can save the best in ``search.yaml``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nmt import files, rundir
from nmt.errors import NmtError
from nmt.metrics import bleu, bleu_metric, chrf


def evaluate_run(run_dir: Path | list[Path], src: Path, ref: Path, checkpoint: str = "best",
                 beam: int | None = None, device: str = "cpu", int8: bool | None = None,
                 stop: str | None = None, shortlist: str | None = None, workers: int = 1) -> dict:
    """Translate ``src`` with a run's model, score against ``ref``, save both in ``run_dir/eval``.

    BLEU is tokenized as the run's ``data.bleu_tokenize`` says (an ensemble: the first run's).

    ``int8``: decode with the int8 model (None: the run's ``search.int8``), see ``load_run``.
    ``shortlist``: "FIRST,BEST" or "none" (None: the run's ``search.shortlist``), see ``load_ensemble``.
    ``workers``: batches decoded at once (``nmt.translate.in_parallel``); the output is the same.
    A list of runs decodes with their ensemble (``nmt.ensemble``), saved in the first run's
    ``eval`` under a name that lists the other runs.
    """
    from nmt.checkpoint import fingerprint
    from nmt.data import read_parallel
    from nmt.ensemble import load_ensemble
    from nmt.translate import translate_text

    if beam is not None and beam < 1:
        raise NmtError(f"--beam {beam}: the beam size must be at least 1 (1 is greedy search)")
    runs = [Path(r) for r in run_dir] if isinstance(run_dir, list | tuple) else [Path(run_dir)]
    run_dir = runs[0]
    cfg, tokenizer, net = load_ensemble(runs, checkpoint, device, int8, shortlist)
    used = fingerprint(rundir.checkpoint_path(run_dir, checkpoint))  # which weights, should best.pt change later
    search = dataclasses.replace(cfg.search, n_best=1, **{k: v for k, v in [("beam", beam), ("stop", stop)]
                                                         if v is not None})
    lines, refs = read_parallel(src, ref)
    start = time.perf_counter()
    hyps = translate_text(net, tokenizer, lines, search, workers)
    seconds = time.perf_counter() - start
    scores = [bleu(hyps, refs, "translations", str(ref), cfg.data.bleu_tokenize),
              chrf(hyps, refs, "translations", str(ref))]
    result = {s.metric: {"score": s.score, "signature": s.signature, "line": s.line()} for s in scores}
    result.update(src=str(src), src_sha256=files.sha256(src), ref=str(ref), ref_sha256=files.sha256(ref),
                  checkpoint=checkpoint, checkpoint_step=used["step"], checkpoint_sha256=used["sha256"],
                  beam=search.beam, int8=cfg.search.int8, sentences=len(lines), decode_seconds=seconds,
                  sentences_per_s=len(lines) / max(seconds, 1e-9))
    result["search"] = dataclasses.asdict(search)  # the settings used, search.yaml included
    result["workers"] = workers  # decode_seconds depends on it
    if len(runs) > 1:
        result["ensemble"] = [{"run": str(r), **fingerprint(rundir.checkpoint_path(r, checkpoint))} for r in runs]
    out_dir = Path(run_dir) / rundir.EVAL_DIR
    out_dir.mkdir(exist_ok=True)
    tag = checkpoint if checkpoint in rundir.NAMED_CHECKPOINTS else "ckpt"
    stem = f"{Path(src).name}.{tag}.beam{search.beam}{'.int8' if cfg.search.int8 else ''}"
    stem += ".exact" if search.stop == "exact" else ""
    sizes = search.shortlist_sizes()
    stem += f".shortlist{sizes[0]}-{sizes[1]}" if sizes else ""
    stem += "".join(f"+{r.name}" for r in runs[1:])
    hyp_path = out_dir / f"{stem}.hyp"
    hyp_path.write_text("".join(f"{h}\n" for h in hyps), encoding="utf-8")
    # Kept with their hash, so that nmt report can run the paired significance test later.
    result.update(hyp=hyp_path.name, hyp_sha256=files.sha256(hyp_path))
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


# --- choosing search settings on a validation set ----------------------------------------------

# Search keys a sweep may vary: those only the search reads (not batching, not the n-best size).
SWEEP_KEYS = ("beam", "length_penalty", "coverage_penalty", "max_len_a", "max_len_b", "min_len", "stop")


def parse_sweep(items: list[str]) -> dict[str, list[Any]]:
    """``["length_penalty=0.6,1.0", "coverage_penalty=0,0.2"]`` -> {key: [values]}, in order."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("search.")
        if not sep or not text.strip():
            raise NmtError(f"--sweep {item!r}: expected KEY=V1,V2,... (e.g. length_penalty=0.6,1.0,1.4)")
        if key not in SWEEP_KEYS:
            raise NmtError(f"--sweep {item!r}: {key} is not a search key to sweep; "
                           f"choose from {', '.join(SWEEP_KEYS)}")
        if key in grid:
            raise NmtError(f"--sweep {key} is given twice; list all its values in one --sweep")
        values = [yaml.safe_load(v) for v in text.split(",")]
        grid[key] = [_float_or(v) for v in values]
    return grid


def _float_or(value: Any) -> Any:
    # YAML 1.1 reads 1e-4 as a string; a sweep means the number.
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


@dataclass
class SweepRow:
    setting: dict[str, Any]  # the swept keys and their values
    bleu: float
    bp: float  # BLEU's brevity penalty
    length_ratio: float  # hypothesis length / reference length (sacreBLEU's tokens)
    seconds: float  # spent searching; the encoder runs once for all settings


def sweep_run(run_dir: Path, grid: dict[str, list[Any]], src: Path | None = None, ref: Path | None = None,
              checkpoint: str = "best", device: str = "cpu", fixed: dict[str, Any] | None = None,
              save: bool = False, int8: bool | None = None, workers: int = 1) -> list[SweepRow]:
    """Translate ``src`` once per combination of ``grid`` values and score each against ``ref``.

    ``src``/``ref`` default to the run's valid split; ``fixed`` search keys (say, a beam
    given on the command line) hold for every setting. The encoder output of each batch is
    computed once and searched under every setting; ``workers`` batches at a time. With
    ``save``, the best setting (highest BLEU, the first among equals) and ``fixed`` go into
    ``run_dir/search.yaml``, which ``load_run`` applies from then on.
    """
    from nmt import config
    from nmt.data import read_parallel
    from nmt.ensemble import load_ensemble
    from nmt.translate import translate_each

    # A shortlist among the fixed keys is how the model decodes: it is applied as the model is loaded.
    cfg, tokenizer, net = load_ensemble([run_dir], checkpoint, device, int8, (fixed or {}).get("shortlist"))
    if src is None or ref is None:
        valid_src, valid_ref = config.split_paths(cfg.data, "valid")
        src, ref = src or valid_src, ref or valid_ref
    fixed = fixed or {}
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    cfgs = []
    for setting in settings:
        try:
            cfgs.append(config.with_search(cfg, {**fixed, **setting, "n_best": 1}).search)
        except NmtError as e:
            raise NmtError(f"--sweep {_describe(setting)}: {e}") from None
    settings = [{key: getattr(c, key) for key in s} for s, c in zip(settings, cfgs)]  # typed: 0 -> 0.0
    lines, refs = read_parallel(src, ref)
    metric = bleu_metric(cfg.data.bleu_tokenize)  # as the run's validation scored
    rows = []
    decodings = translate_each(net, tokenizer, lines, cfgs, source_name=str(src), workers=workers)
    for setting, decoding in zip(settings, decodings):
        result = metric.corpus_score([t.texts[0] for t in decoding.translations], [refs])
        rows.append(SweepRow(setting, result.score, result.bp, result.sys_len / max(result.ref_len, 1),
                             decoding.seconds))
    if save:
        best = max(rows, key=lambda r: r.bleu)
        values = {**rundir.read_search_file(run_dir), **fixed, **best.setting}
        header = (f"# Chosen by nmt eval --sweep on {src} ({len(lines)} sentences, checkpoint {checkpoint}): "
                  f"BLEU {best.bleu:.2f}, BP {best.bp:.3f}\n")
        text = header + yaml.safe_dump(values, sort_keys=False)
        (Path(run_dir) / rundir.SEARCH_FILE).write_text(text, encoding="utf-8")
    return rows


def _describe(setting: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def sweep_table(rows: list[SweepRow]) -> str:
    """One line per setting: its values, BLEU, brevity penalty, length ratio and search time."""
    keys = list(rows[0].setting)
    head = [*keys, "BLEU", "BP", "hyp/ref", "search_s"]
    body = [[*(str(r.setting[k]) for k in keys), f"{r.bleu:.2f}", f"{r.bp:.3f}", f"{r.length_ratio:.3f}",
             f"{r.seconds:.1f}"] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [head, *body])
