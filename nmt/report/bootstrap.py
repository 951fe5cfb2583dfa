"""sacreBLEU's 95% bootstrap intervals and paired bootstrap p-values for the runs of one report,
computed from the test hypotheses ``nmt eval`` kept (checked by sha256) against a baseline run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from nmt.errors import NmtError
from nmt.metrics import BOOTSTRAP_SAMPLES, paired_bootstrap, signature_tokenize
from nmt.report.runs import RunSummary, cached_sha256

NO_HYPOTHESES = "no significance: re-run nmt eval"


@dataclass
class Significance:
    baseline: str  # the run every p-value compares with; "" where it has no kept hypotheses
    signatures: dict[str, str]  # sacreBLEU's, per metric (with bs:1000 and the seed)
    notes: list[str]  # one line each: runs that were not compared, and why


def kept_hypotheses(row: RunSummary) -> list[str] | str:
    """The test hypotheses a run's evaluation kept, checked by sha256, or why there are none to use."""
    if row.test_bleu is None:
        return "no test evaluation"
    if not row.test_hyp or not row.test_hyp_sha256:
        return "its record keeps no hypotheses"
    path = Path(row.test_hyp)
    if not path.is_file():
        return f"{path} is missing"
    if cached_sha256(path, path.stat().st_mtime_ns) != row.test_hyp_sha256:
        return f"{path} changed since it was scored"
    return path.read_text(encoding="utf-8").splitlines()


def _reference(rows: list[RunSummary]) -> list[str] | str:
    """The reference lines the rows were scored against (all share ``test_set``), checked by sha256."""
    for row in rows:
        path = Path(row.test_ref)
        if path.is_file() and row.test_set in (cached_sha256(path, path.stat().st_mtime_ns), path.name):
            return path.read_text(encoding="utf-8").splitlines()
    return f"no significance: the reference {rows[0].test_ref or '?'} is missing or changed since scoring"


def same_resamples(a, b) -> bool:
    """Whether two systems' bootstrap results are equal: their sentence statistics are the same."""
    return (a.score, a.mean, a.ci) == (b.score, b.mean, b.ci)


def find_run(rows: list[RunSummary], name: str) -> int:
    for i, row in enumerate(rows):
        if row.run in (name, Path(name).name):
            return i
    raise NmtError(f"--baseline {name}: not one of the reported runs ({', '.join(r.run for r in rows)})")


def significance(rows: list[RunSummary], baseline: str | int | None = None,
                 n_samples: int = BOOTSTRAP_SAMPLES) -> tuple[list[RunSummary], Significance]:
    """Each run's test BLEU/chrF with its 95% interval, and the paired bootstrap p-value against the baseline.

    The numbers are sacreBLEU's (``sacrebleu.significance.PairedTest``, paired bootstrap, seed from
    ``SACREBLEU_SEED``), computed from the hypotheses ``nmt eval`` kept. Only runs scored against the
    baseline's reference get a p-value. Output identical to the baseline's is said so: sacreBLEU
    would give it the smallest p-value, 1/(n+1), as if the difference were significant.
    """
    if not rows:
        return rows, Significance("", {}, [])
    base = baseline if isinstance(baseline, int) else find_run(rows, baseline) if baseline else 0
    updates: dict[int, dict] = {}
    hyps: dict[int, list[str]] = {}
    for i, row in enumerate(rows):
        found = kept_hypotheses(row)
        if isinstance(found, str):
            updates[i] = {"significance_note": "no significance: no test evaluation (nmt eval --model RUN --src ... "
                                               "--ref ...)" if row.test_bleu is None else f"{NO_HYPOTHESES} ({found})"}
        else:
            hyps[i] = found
    # Runs compare on one test set under one BLEU tokenization (data.bleu_tokenize, as the signature says).
    by_test_set: dict[tuple[str, str], list[int]] = {}
    for i in hyps:
        by_test_set.setdefault((rows[i].test_set, signature_tokenize(rows[i].test_signature)), []).append(i)
    notes, signatures = [], {}
    base_name = rows[base].run if base in hyps else ""
    if not base_name:
        notes.append(f"no p-values: the baseline {rows[base].run} has no kept test hypotheses; re-run nmt eval "
                     "for it, or choose another with --baseline")
    for (test_set, tokenize), members in by_test_set.items():
        other_set = test_set != rows[base].test_set
        what = "another test set" if other_set else "another BLEU tokenization"
        detail = test_set[:12] if other_set else f"tok:{tokenize}"
        refs = _reference([rows[i] for i in members])
        if isinstance(refs, str):
            updates.update({i: {"significance_note": refs} for i in members})
            continue
        short = [i for i in members if len(hyps[i]) != len(refs)]
        for i in short:
            updates[i] = {"significance_note": f"no significance: {len(hyps[i])} hypotheses against "
                                               f"{len(refs)} references; re-run nmt eval"}
        members = sorted((i for i in members if i not in short), key=lambda i: i != base)  # baseline first
        if not members:
            continue
        compared = base in members
        results, signatures = paired_bootstrap([(str(i), hyps[i]) for i in members], refs, n_samples, tokenize)
        for i in members:
            bleu, chrf = results[str(i)]["BLEU"], results[str(i)]["chrF2"]
            values = {"test_bleu_mean": bleu.mean, "test_bleu_ci": bleu.ci, "test_chrf_mean": chrf.mean,
                      "test_chrf_ci": chrf.ci}
            if i == base:
                values["significance_note"] = "baseline"
            elif compared and hyps[i] == hyps[base]:
                values.update(p_baseline=base_name, significance_note="identical to the baseline's output")
            elif compared:
                # Equal scores on every resample (outputs that differ only where neither scores)
                # also get sacreBLEU's smallest p-value; say so instead.
                same = [m for m, r in results[str(i)].items() if same_resamples(r, results[str(base)][m])]
                values.update(p_bleu=None if "BLEU" in same else bleu.p_value,
                              p_chrf=None if "chrF2" in same else chrf.p_value, p_baseline=base_name)
                if same:
                    values["significance_note"] = f"same {' and '.join(same)} as the baseline on every resample"
            elif base_name:
                values["significance_note"] = f"not compared: {what} than {base_name}'s"
            updates[i] = values
        if not compared and base_name:
            notes.append(f"not compared with {base_name} (scored on {what}, {detail}): "
                         + ", ".join(rows[i].run for i in members))
    rows = [dataclasses.replace(row, **updates.get(i, {})) for i, row in enumerate(rows)]
    return rows, Significance(base_name, signatures, notes)
