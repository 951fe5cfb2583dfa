"""Runs -> one table of cost and quality, and a picture of valid BLEU against training time.

Everything is read from the run directories: ``config.yaml``, ``log.jsonl`` (training and
validation clocks kept apart) and ``eval/*.json`` (``nmt eval --model`` results). The test
score shown is the evaluation of the recipe's test split with the best checkpoint; where the
run has none, the table says which evaluation it shows instead. Runs are put in one table
only when they share the tokenizer, the test set and the CPU, unless asked.

The test scores come with sacreBLEU's 95% bootstrap intervals and its paired bootstrap
p-value against a baseline run, computed from the hypotheses ``nmt eval`` kept; runs of one
recipe that differ only in their seed can be summarized as one group (mean ± sd). With probes
of other hardware (``nmt bench``), each run's training time is also projected onto it; read by
updates (``--at-updates``), the curves need no clock at all.

One job per module: ``runs`` (a run directory -> ``RunSummary``; whether runs compare),
``bootstrap`` (intervals and p-values), ``seeds`` (seed groups), ``projection`` (time on
probed hardware), ``tables`` (md, csv, json) and ``plots`` (the picture); ``compare`` here puts
them together for ``nmt report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nmt.report.bootstrap import Significance, find_run, significance
from nmt.report.plots import mean_curve, plot, plot_projected
from nmt.report.projection import Projection, project
from nmt.report.runs import RunSummary, check_comparable, parse_minutes, parse_updates, summarize
from nmt.report.seeds import SeedGroup, Spread, seed_groups, summarize_group
from nmt.report.tables import render

__all__ = ["Comparison", "Projection", "RunSummary", "SeedGroup", "Significance", "Spread", "check_comparable",
           "compare", "mean_curve", "parse_minutes", "parse_updates", "plot", "plot_projected",
           "project", "render", "seed_groups",
           "significance", "summarize", "summarize_group"]


@dataclass
class Comparison:
    rows: list[RunSummary]
    groups: list[SeedGroup]  # empty unless seeds are grouped
    significance: Significance
    projections: list[Projection] = field(default_factory=list)  # each run on each probed machine (``probes``)


def compare(runs: list[Path], target: float | None = None, at: list[float] = (), baseline: str | None = None,
            group_seeds: bool = False, allow_mixed: bool = False, probes: list[Path] = (),
            at_updates: list[int] = ()) -> Comparison:
    """Everything ``nmt report`` shows: a row per run, the significance tests, the seed groups, and with
    ``probes`` (``nmt bench`` files) each run's training time projected onto the probed machines.
    ``at_updates`` reads the curves by updates as well (``--at-updates``), which no clock affects.

    With ``group_seeds`` the baseline is the first seed of the group of ``baseline`` (default:
    the first group), and each group's p-value is its first seed's.
    """
    rows = [summarize(run, target, at, at_updates) for run in runs]
    if not allow_mixed:  # with probes, runs of different machines share one clock: the projected one
        check_comparable(rows, machines=not probes)
    projections = project(runs, list(probes), target, at) if probes else []
    groups = seed_groups(runs) if group_seeds else []
    if groups:
        chosen = find_run(rows, baseline) if baseline else 0
        baseline = next(members for _, members in groups if chosen in members)[0]
    rows, tested = significance(rows, baseline)
    return Comparison(rows, [summarize_group(rows, members, recipe) for recipe, members in groups], tested,
                      projections)
