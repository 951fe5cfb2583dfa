"""Runs of one recipe that differ only in their seed, summarized as one group: mean ± sd."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from nmt.errors import NmtError
from nmt.report.runs import RunSummary, read_config

# What the runs of one recipe may differ in and still count as seeds of it.
SEED_KEYS = ("name", "train.seed", "tokenizer.reuse")


@dataclass
class Spread:
    """Mean and sample standard deviation over the seeds that have the value (n of them)."""
    mean: float | None
    sd: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Spread:
        known = [v for v in values if v is not None]
        return cls(statistics.mean(known) if known else None,
                   statistics.stdev(known) if len(known) > 1 else None, len(known))


@dataclass
class SeedGroup:
    recipe: str  # the recipe's name
    model: str
    runs: list[str]  # by seed
    seeds: list[int | None]
    best_valid_bleu: Spread
    test_bleu: Spread
    test_chrf: Spread
    time_to_target_minutes: Spread
    bleu_at: dict[str, Spread]
    # The p-values of the group's first seed against the baseline group's first seed.
    p_run: str
    p_bleu: float | None
    p_chrf: float | None
    p_note: str
    members: list[int] = field(default_factory=list)  # indices of the runs in the report
    updates_to_target: Spread | None = None
    bleu_at_updates: dict[str, Spread] = field(default_factory=dict)
    shared: bool = False  # a member shared its machine: the group's wall-clock figures are not usable


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def seed_groups(runs: list[Path]) -> list[tuple[str, list[int]]]:
    """(recipe name, indices of its ``runs``) in order of appearance, each sorted by ``train.seed``.

    Refuses runs of one recipe that differ in anything but the seed, the name and
    ``tokenizer.reuse``, naming the key.
    """
    configs = [_flatten(read_config(Path(run))) for run in runs]
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(str(cfg.get("name", Path(runs[i]).name)), []).append(i)
    for recipe, members in groups.items():
        first = configs[members[0]]
        for i in members[1:]:
            keys = sorted(k for k in first.keys() | configs[i].keys()
                          if k not in SEED_KEYS and first.get(k) != configs[i].get(k))
            if keys:
                a, b = Path(runs[members[0]]).name, Path(runs[i]).name
                raise NmtError(f"--group-seeds: runs {a} and {b} of recipe {recipe} differ in {keys[0]} "
                               f"({first.get(keys[0])!r} against {configs[i].get(keys[0])!r}), not only in "
                               "train.seed; report them without --group-seeds")
    order = {i: (configs[i].get("train.seed") is None, configs[i].get("train.seed") or 0) for i in range(len(runs))}
    return [(recipe, sorted(members, key=order.__getitem__)) for recipe, members in groups.items()]


def summarize_group(rows: list[RunSummary], members: list[int], recipe: str) -> SeedGroup:
    group = [rows[i] for i in members]
    first = group[0]
    return SeedGroup(
        recipe=recipe, model=first.model, runs=[r.run for r in group], seeds=[r.seed for r in group],
        best_valid_bleu=Spread.of([r.best_valid_bleu for r in group]),
        test_bleu=Spread.of([r.test_bleu for r in group]),
        test_chrf=Spread.of([r.test_chrf for r in group]),
        time_to_target_minutes=Spread.of([r.time_to_target_minutes for r in group]),
        bleu_at={m: Spread.of([r.bleu_at.get(m) for r in group]) for m in first.bleu_at},
        p_run=first.run, p_bleu=first.p_bleu, p_chrf=first.p_chrf, p_note=first.significance_note,
        updates_to_target=Spread.of([r.updates_to_target for r in group]),
        bleu_at_updates={n: Spread.of([r.bleu_at_updates.get(n) for r in group]) for n in first.bleu_at_updates},
        members=list(members), shared=any(r.machine_use == "shared" for r in group))
