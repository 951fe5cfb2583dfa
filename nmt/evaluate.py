"""BLEU and chrF with sacreBLEU, on detokenized text against raw references.

Validation during training and ``nmt eval`` call the same functions, so the number a run
reports is the number the sacrebleu command line gives on the same files.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from nmt.errors import NmtError


@dataclass
class Score:
    metric: str  # "BLEU" or "chrF2"
    score: float
    signature: str
    verbose: str  # sacreBLEU's detail: n-gram precisions, brevity penalty, lengths

    def line(self, width: int = 1) -> str:
        """The line ``sacrebleu -f text -w WIDTH`` prints."""
        return f"{self.metric}|{self.signature} = {self.score:.{width}f} {self.verbose}".rstrip()

    def to_json(self, width: int = 1) -> dict:
        """The object ``sacrebleu -w WIDTH`` prints as JSON."""
        out = {"name": self.metric, "score": round(self.score, width), "signature": self.signature}
        if self.verbose:
            out["verbose_score"] = self.verbose
        out.update(part.split(":", 1) for part in self.signature.split("|"))
        return out


def _check(hyps: list[str], refs: list[str], hyp_name: str, ref_name: str) -> None:
    if len(hyps) != len(refs):
        raise NmtError(f"{hyp_name} has {len(hyps)} lines but {ref_name} has {len(refs)}; "
                       "hypotheses and references must be line-aligned")
    if not refs:  # sacreBLEU has no score for an empty corpus (as its command line says)
        raise NmtError(f"{hyp_name} and {ref_name} have no lines: there is nothing to score")


def bleu(hyps: list[str], refs: list[str], hyp_name: str = "hypotheses",
         ref_name: str = "references") -> Score:
    _check(hyps, refs, hyp_name, ref_name)
    metric = BLEU()
    result = metric.corpus_score(hyps, [refs])
    verbose = str(result)[len(f"BLEU = {result.score:.2f} "):]
    return Score("BLEU", result.score, str(metric.get_signature()), verbose)


def chrf(hyps: list[str], refs: list[str], hyp_name: str = "hypotheses",
         ref_name: str = "references") -> Score:
    _check(hyps, refs, hyp_name, ref_name)
    metric = CHRF()
    result = metric.corpus_score(hyps, [refs])
    return Score("chrF2", result.score, str(metric.get_signature()), "")


def report(scores: list[Score], as_json: bool, width: int = 1) -> str:
    if as_json:
        items = [s.to_json(width) for s in scores]
        return json.dumps(items[0] if len(items) == 1 else items, indent=1, ensure_ascii=False)
    return "\n".join(s.line(width) for s in scores)


def evaluate_run(run_dir: Path, src: Path, ref: Path, checkpoint: str = "best", beam: int | None = None,
                 device: str = "cpu", int8: bool | None = None) -> dict:
    """Translate ``src`` with a run's model, score against ``ref``, save both in ``run_dir/eval``.

    ``int8``: decode with the int8 model (None: the run's ``search.int8``), see ``load_run``.
    """
    from nmt.checkpoint import fingerprint, load_run, resolve
    from nmt.config import SearchConfig
    from nmt.data import read_parallel
    from nmt.tokenizer import file_sha256
    from nmt.translate import translate_text

    if beam is not None and beam < 1:
        raise NmtError(f"--beam {beam}: the beam size must be at least 1 (1 is greedy search)")
    cfg, tokenizer, net = load_run(run_dir, checkpoint, device, int8)
    used = fingerprint(resolve(run_dir, checkpoint))  # which weights, should best.pt change later
    search = SearchConfig(**{**vars(cfg.search), "n_best": 1, **({"beam": beam} if beam is not None else {})})
    lines, refs = read_parallel(src, ref)
    start = time.perf_counter()
    hyps = translate_text(net, tokenizer, lines, search)
    seconds = time.perf_counter() - start
    scores = [bleu(hyps, refs, "translations", str(ref)), chrf(hyps, refs, "translations", str(ref))]
    result = {s.metric: {"score": s.score, "signature": s.signature, "line": s.line()} for s in scores}
    result.update(src=str(src), src_sha256=file_sha256(src), ref=str(ref), ref_sha256=file_sha256(ref),
                  checkpoint=checkpoint, checkpoint_step=used["step"], checkpoint_sha256=used["sha256"],
                  beam=search.beam, int8=cfg.search.int8, sentences=len(lines), decode_seconds=seconds,
                  sentences_per_s=len(lines) / max(seconds, 1e-9))
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(exist_ok=True)
    tag = checkpoint if checkpoint in ("best", "last", "averaged") else "ckpt"
    stem = f"{Path(src).name}.{tag}.beam{search.beam}{'.int8' if cfg.search.int8 else ''}"
    (out_dir / f"{stem}.hyp").write_text("".join(f"{h}\n" for h in hyps), encoding="utf-8")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result
