"""BLEU, chrF and the paired bootstrap test, with sacreBLEU, on detokenized text against raw references.

Its one job is scoring: validation during training, ``nmt eval`` and ``nmt report`` call the
same functions, so the number a run reports is the number the sacrebleu command line gives on
the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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


# --- confidence intervals and paired significance ----------------------------------------------

BOOTSTRAP_SAMPLES = 1000


@dataclass
class Interval:
    """One system's score on one metric, as sacreBLEU's paired bootstrap test gives it."""
    score: float
    mean: float  # the mean over bootstrap resamples
    ci: float  # half-width of the 95% interval around ``mean``: sacreBLEU prints ``mean ± ci``
    p_value: float | None  # against the baseline (the first system); None for the baseline itself


def paired_bootstrap(systems: list[tuple[str, list[str]]], refs: list[str],
                     n_samples: int = BOOTSTRAP_SAMPLES) -> tuple[dict[str, dict[str, Interval]], dict[str, str]]:
    """sacreBLEU's paired bootstrap test of every system against the first, on BLEU and chrF.

    Returns ({system: {"BLEU": Interval, "chrF2": Interval}}, {metric: signature}). The resamples
    come from ``SACREBLEU_SEED`` (default 12345), as on sacreBLEU's command line, so
    ``sacrebleu REF -i SYS1 SYS2 -m bleu chrf --paired-bs`` prints the same numbers.
    """
    from sacrebleu.significance import PairedTest

    for name, hyps in systems:
        _check(hyps, refs, name, "the reference")
    test = PairedTest(systems, {"BLEU": BLEU(), "chrF2": CHRF()}, [refs], test_type="bs", n_samples=n_samples)
    signatures, columns = test()
    results: dict[str, dict[str, Interval]] = {name: {} for name, _ in systems}
    for metric, values in columns.items():
        if metric == "System":
            continue
        for (name, _), r in zip(systems, values):
            results[name][metric] = Interval(float(r.score), float(r.mean), float(r.ci),
                                             None if r.p_value is None else float(r.p_value))
    return results, {metric: str(sig) for metric, sig in signatures.items()}


def format_scores(scores: list[Score], as_json: bool, width: int = 1) -> str:
    """The scores as ``nmt eval --bleu/--chrf`` prints them: sacreBLEU's lines, or its JSON."""
    if as_json:
        items = [s.to_json(width) for s in scores]
        return json.dumps(items[0] if len(items) == 1 else items, indent=1, ensure_ascii=False)
    return "\n".join(s.line(width) for s in scores)
