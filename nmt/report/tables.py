"""The report as text: a markdown table (with the significance, seed-group, note and hardware
lines under it), or one flat row per run (and per seed group) as csv or json.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict

from nmt.errors import NmtError
from nmt.hardware import OTHER_LOAD_LIMIT
from nmt.metrics import BOOTSTRAP_SAMPLES
from nmt.report.bootstrap import Significance
from nmt.report.projection import CAVEAT, Projection, probe_notes
from nmt.report.runs import SHARED_WINDOWS, RunSummary, machine_of
from nmt.report.seeds import SeedGroup, Spread

SHARED = " †"  # marks a wall-clock figure of a run that shared its machine


def _flat(row: RunSummary, projections: list[Projection] = ()) -> dict:
    """The row as one level of named values: bleu_at becomes valid_bleu_at_<m>min columns, and each projection
    of the run projected_<value>[<machine>] columns."""
    values = asdict(row)
    for minutes, score in values.pop("bleu_at").items():
        values[f"valid_bleu_at_{minutes}min"] = score
    for updates, score in values.pop("bleu_at_updates").items():
        values[f"valid_bleu_at_{updates}updates"] = score
    for p in projections:
        if p.run == row.run:
            values.update({f"projected_seconds_per_update[{p.machine}]": p.seconds_per_update,
                           f"projected_train_minutes[{p.machine}]": p.train_minutes,
                           f"projected_time_to_target_minutes[{p.machine}]": p.time_to_target_minutes})
            values.update({f"projected_valid_bleu_at_{m}min[{p.machine}]": v for m, v in p.bleu_at.items()})
    return values


def _flat_group(group: SeedGroup) -> dict:
    """A seed group as one level of named values: <value>_seed_mean, <value>_seed_sd, <value>_seed_n."""
    values: dict = {"recipe": group.recipe, "model": group.model, "runs": " ".join(group.runs),
                    "seeds": " ".join(str(s) for s in group.seeds), "n": len(group.runs)}
    spreads = {name: getattr(group, name) for name in ("best_valid_bleu", "test_bleu", "test_chrf",
                                                       "time_to_target_minutes")}
    spreads.update({f"valid_bleu_at_{m}min": spread for m, spread in group.bleu_at.items()})
    if group.bleu_at_updates:
        spreads["updates_to_target"] = group.updates_to_target
        spreads.update({f"valid_bleu_at_{n}updates": spread for n, spread in group.bleu_at_updates.items()})
    for name, spread in spreads.items():
        values.update({f"{name}_seed_mean": spread.mean, f"{name}_seed_sd": spread.sd, f"{name}_seed_n": spread.n})
    values.update(p_run=group.p_run, p_bleu=group.p_bleu, p_chrf=group.p_chrf, p_note=group.p_note)
    return values


def render(rows: list[RunSummary], fmt: str, groups: list[SeedGroup] = (),
           tested: Significance | None = None, projections: list[Projection] = ()) -> str:
    """The report as md, csv or json. With seed groups, csv and json list the runs ("row": "run")
    and then the groups ("row": "group") with their own columns. Projections (``--time-from``) add
    tables in md, columns named ``projected_...[machine]`` in csv and json."""
    flat = [_flat(r, projections) for r in rows]
    if groups:
        flat = [{"row": "run", **values} for values in flat] + [{"row": "group", **_flat_group(g)} for g in groups]
    if fmt == "json":
        return json.dumps(flat, indent=1)
    if fmt == "csv":
        columns = list(dict.fromkeys(key for values in flat for key in values))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        for values in flat:
            writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
        return out.getvalue()
    if fmt == "md":
        return _markdown(rows, groups, tested, projections)
    raise NmtError(f"--format {fmt}: choose md, csv or json")


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _p(value: float | None) -> str:
    """A p-value as sacreBLEU prints it: four decimals, ``*`` where it is at most 0.05."""
    return "–" if value is None else f"{value:.4f}" + ("*" if value <= 0.05 else "")


def _machine_use(r: RunSummary) -> str:
    if r.machine_use == "shared":
        return f"shared ({r.loaded_windows:.0%} of windows){SHARED}"
    return r.machine_use or "–"


def _markdown(rows: list[RunSummary], groups: list[SeedGroup] = (), tested: Significance | None = None,
              projections: list[Projection] = ()) -> str:
    num = _num
    head = ["run", "model", "params", "device × ranks", "precision", "batch", "steps", "epochs",
            "train min", "valid min", "tok/s", "best valid BLEU", "test BLEU", "test chrF",
            _to_target(rows), "beam-5 sent/s", "machine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flags = (" (fine-tuned)" if r.init_from else "") + ("" if r.status == "finished" else " (unfinished)")
        wall = SHARED if r.machine_use == "shared" else ""  # its wall-clock figures are not usable
        cells = [r.run + flags, r.model, num(r.params, ","),
                 f"{r.device} × {r.ranks}", r.precision, num(r.effective_batch, ","), str(r.steps),
                 str(r.epochs), f"{r.train_minutes:.1f}{wall}", f"{r.valid_minutes:.1f}",
                 num(r.tokens_per_s, ",.0f") + wall,
                 num(r.best_valid_bleu, ".2f"), num(r.test_bleu, ".2f") + (" *" if r.test_note else ""),
                 num(r.test_chrf, ".2f"),
                 num(r.time_to_target_minutes, ".1f") + wall, num(r.decode_sent_per_s, ".1f"), _machine_use(r)]
        lines.append("| " + " | ".join(cells) + " |")
    marks = list(rows[0].bleu_at) if rows else []
    if marks:
        lines += ["", "Best valid BLEU by training time:", "",
                  "| run | model | " + " | ".join(f"{m} min" for m in marks) + " |",
                  "|---|---|" + "---|" * len(marks)]
        for r in rows:
            wall = SHARED if r.machine_use == "shared" else ""
            lines.append(f"| {r.run} | {r.model} | " + " | ".join(num(r.bleu_at[m], ".2f") + wall for m in marks)
                         + " |")
    lines += _shared_lines(rows)
    if rows and rows[0].bleu_at_updates:
        lines += _updates_lines(rows, groups)
    if projections:
        lines += _projection_lines(rows, projections, marks)
    if tested is not None and any(r.test_bleu is not None for r in rows):
        lines += _significance_lines(rows, tested, bool(groups))
    if groups:
        lines += _group_lines(groups, marks, _to_target(rows))
    notes = [f"{r.run}: test BLEU of {r.test_note}" for r in rows if r.test_note]
    if notes:
        lines += ["", "\\* not the recipe's test split with the best checkpoint:", ""] + [f"- {n}" for n in notes]
    origins = [f"- {r.run}: from {r.init_from}" for r in rows if r.init_from]
    if origins:  # their training time and steps count from that checkpoint, not from scratch
        lines += ["", "Fine-tuned (time and steps counted from the starting checkpoint):", "", *origins]
    lines += _hardware_lines(rows)
    signatures = sorted({r.test_signature for r in rows if r.test_signature})
    if signatures:
        lines.append("")
        lines.append("Test BLEU signature: " + "; ".join(signatures))
    return "\n".join(lines) + "\n"


def _significance_lines(rows: list[RunSummary], tested: Significance, grouped: bool) -> list[str]:
    against = f"p-values against {tested.baseline}" if tested.baseline else "no p-values"
    lines = ["", f"Test scores with 95% confidence intervals (sacreBLEU paired bootstrap, {BOOTSTRAP_SAMPLES} "
             f"resamples); {against}:", "",
             "| run | test BLEU (μ ± 95% CI) | p (BLEU) | test chrF (μ ± 95% CI) | p (chrF) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r.test_bleu_mean is None:
            lines.append(f"| {r.run} | {r.significance_note} | | | |")
            continue
        bleu = f"{r.test_bleu:.2f} ({r.test_bleu_mean:.2f} ± {r.test_bleu_ci:.2f})"
        chrf = f"{r.test_chrf:.2f} ({r.test_chrf_mean:.2f} ± {r.test_chrf_ci:.2f})"
        p_bleu = r.significance_note if r.p_bleu is None and r.significance_note else _p(r.p_bleu)
        p_chrf = r.significance_note if r.p_chrf is None and r.significance_note else _p(r.p_chrf)
        lines.append(f"| {r.run} | {bleu} | {p_bleu} | {chrf} | {p_chrf} |")
    if any(r.test_bleu_mean is not None for r in rows):
        lines += ["", "μ ± CI: mean and half-width of the middle 95% of the scores on test sets resampled "
                  "from this one. p: how often resampling gives a difference from the baseline at least this "
                  "large by chance alone; * marks p ≤ 0.05, a difference unlikely to be chance."]
    if grouped:
        lines.append("Seed groups: the baseline is its group's first seed, and each group's p-value is its "
                     "first seed's against it.")
    lines += [f"- {note}" for note in tested.notes]
    if tested.signatures:
        lines.append("Signatures: " + "; ".join(f"{m} {sig}" for m, sig in tested.signatures.items()))
    return lines


def _spread(spread: Spread, of: int, spec: str = ".2f") -> str:
    if spread.mean is None:
        return "–"
    text = format(spread.mean, spec) + (f" ± {format(spread.sd, spec)}" if spread.sd is not None else "")
    return text + (f" (n={spread.n})" if spread.n < of else "")


def _to_target(rows: list[RunSummary]) -> str:
    """The time-to-target column's heading, naming the target ("to valid BLEU 28 (min)")."""
    target = rows[0].target if rows else None
    return "to target (min)" if target is None else f"to valid BLEU {target:g} (min)"


def _group_lines(groups: list[SeedGroup], marks: list[str], to_target: str) -> list[str]:
    head = ["recipe", "model", "seeds", "best valid BLEU", "test BLEU", "test chrF", to_target,
            "p (BLEU), first seeds", "p (chrF), first seeds"]
    lines = ["", "Seed groups: mean ± sd over the seeds (sample sd; n where fewer seeds have the value):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        n = len(g.runs)
        seeds = f"{', '.join(str(s) for s in g.seeds)} (n={n})"
        p_bleu, p_chrf = (_p(g.p_bleu), _p(g.p_chrf)) if g.p_bleu is not None else (g.p_note or "–",) * 2
        wall = SHARED if g.shared else ""
        lines.append(f"| {g.recipe} | {g.model} | {seeds} | {_spread(g.best_valid_bleu, n)} | "
                     f"{_spread(g.test_bleu, n)} | {_spread(g.test_chrf, n)} | "
                     f"{_spread(g.time_to_target_minutes, n, '.1f')}{wall} | {p_bleu} | {p_chrf} |")
    if marks:
        lines += ["", "Seed groups, best valid BLEU by training time (mean ± sd):", "",
                  "| recipe | model | " + " | ".join(f"{m} min" for m in marks) + " |",
                  "|---|---|" + "---|" * len(marks)]
        for g in groups:
            wall = SHARED if g.shared else ""
            cells = " | ".join(_spread(g.bleu_at[m], len(g.runs)) + wall for m in marks)
            lines.append(f"| {g.recipe} | {g.model} | {cells} |")
    return lines


def ending(r: RunSummary) -> str:
    """How a run's training ended, in the words a reader of a convergence table needs."""
    if not r.ended:
        return f"unfinished at {r.steps:,} updates"
    if "patience" in r.ended:
        return f"converged: {r.ended}, at {r.steps:,} updates"
    return f"at {r.steps:,} updates, not converged: {r.ended}"


def _updates_lines(rows: list[RunSummary], groups: list[SeedGroup]) -> list[str]:
    """Valid BLEU read by updates (``--at-updates``): a clock-free reading, per run and per seed group."""
    marks = list(rows[0].bleu_at_updates)
    target = rows[0].target
    to_target = [f"updates to valid BLEU {target:g}"] if target is not None else []
    head = ["run", "model", "best valid BLEU (at update)", *to_target, *(f"{m} updates" for m in marks), "ended"]
    lines = ["", "Best valid BLEU by updates (no clock involved: runs of any machine, alone or not, compare):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        best = f"{_num(r.best_valid_bleu, '.2f')} ({_num(r.best_step, ',')})"
        reached = [_num(r.updates_to_target, ",")] if target is not None else []
        cells = [r.run, r.model, best, *reached, *(_num(r.bleu_at_updates[m], ".2f") for m in marks), ending(r)]
        lines.append("| " + " | ".join(cells) + " |")
    if groups:
        head = ["recipe", "model", "seeds", *to_target, *(f"{m} updates" for m in marks)]
        lines += ["", "Seed groups by updates (mean ± sd):", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for g in groups:
            n = len(g.runs)
            reached = [_spread(g.updates_to_target, n, ",.0f")] if target is not None else []
            cells = [g.recipe, g.model, ", ".join(str(s) for s in g.seeds), *reached,
                     *(_spread(g.bleu_at_updates[m], n) for m in marks)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _shared_lines(rows: list[RunSummary]) -> list[str]:
    """What † means, where a run shared its machine."""
    shared = [f"{r.run} ({r.loaded_windows:.0%} of windows)" for r in rows if r.machine_use == "shared"]
    if not shared:
        return []
    return ["", f"{SHARED.strip()} shared the machine with other work: {', '.join(shared)}. Its wall-clock figures "
            "(train min, tok/s, time to target, BLEU by training time) are not usable; its steps and BLEU are, and "
            "--time-from PROBE.json projects its time from its updates. Rule: in a log window other processes "
            f"took more than {OTHER_LOAD_LIMIT:.0%} of the cores' time (machine_busy_seconds - cpu_seconds over "
            f"machine_core_seconds), in more than {SHARED_WINDOWS:.0%} of the run's windows."]


def _projection_lines(rows: list[RunSummary], projections: list[Projection], marks: list[str]) -> list[str]:
    """The projected times: a column per probed machine, then BLEU by projected minutes per machine."""
    machines = list(dict.fromkeys(p.machine for p in projections))
    by = {(p.run, p.machine): p for p in projections}
    models = {r.run: r.model for r in rows}
    lines = ["", "Projected training time in minutes (the run's updates × the probe's seconds per update, validation "
             "excluded; projected, not measured):", "",
             "| run | model | updates | " + " | ".join(f"projected min on {m}" for m in machines) + " |",
             "|---|---|---|" + "---|" * len(machines)]
    for r in rows:
        cells = [f"{by[r.run, m].train_minutes:.1f} ({by[r.run, m].seconds_per_update:.4g} s/update)" for m in machines]
        lines.append(f"| {r.run} | {r.model} | {r.steps:,} | " + " | ".join(cells) + " |")
    target = rows[0].target if rows else None
    if target is not None:
        lines += ["", f"Projected minutes to valid BLEU {target:g} (first validation that reached it):", "",
                  "| run | model | " + " | ".join(f"projected min on {m}" for m in machines) + " |",
                  "|---|---|" + "---|" * len(machines)]
        for r in rows:
            cells = [_num(by[r.run, m].time_to_target_minutes, ".1f") for m in machines]
            lines.append(f"| {r.run} | {models[r.run]} | " + " | ".join(cells) + " |")
    for m in machines if marks else []:
        lines += ["", f"Best valid BLEU by projected training time on {m}:", "",
                  "| run | model | " + " | ".join(f"{mark} projected min" for mark in marks) + " |",
                  "|---|---|" + "---|" * len(marks)]
        for r in rows:
            cells = [_num(by[r.run, m].bleu_at.get(mark), ".2f") for mark in marks]
            lines.append(f"| {r.run} | {r.model} | " + " | ".join(cells) + " |")
    return lines + ["", CAVEAT, "", "Probes:", *[f"- {note}" for note in probe_notes(projections)]]


def _hardware_lines(rows: list[RunSummary]) -> list[str]:
    known = sorted({machine_of(r) for r in rows if r.cpu})
    unknown = [r.run for r in rows if not r.cpu]
    lines = ["", "Trained on: " + "; ".join(known)] if known else []
    if unknown and len(rows) > 1:
        lines += ["", f"CPU not recorded (logged before nmt recorded it), compared as if alike: {', '.join(unknown)}"]
    unkinded = [r.run for r in rows if r.cpu and not r.cpu_kind]
    if unkinded and len(rows) > 1:
        lines += ["", "CPU kind not recorded (logged before nmt recorded the CPU generation and instruction set), "
                  f"matched on model name and cores only: {', '.join(unkinded)}"]
    moved = [f"{r.run} (resumed on {r.moved_to})" for r in rows if r.moved_to]
    if moved:
        lines += ["", "Trained on more than one machine: " + "; ".join(moved)]
    return lines
