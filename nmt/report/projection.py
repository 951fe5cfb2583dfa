"""Training time projected onto other hardware: a run's updates times a probe's seconds per update.

A probe (``nmt bench``, ``nmt.probe``) times updates of a recipe's model and batches on one
machine. A run's valid BLEU curve is a function of its updates; projected onto that machine,
validation ``k`` (at step ``s_k``) lands at ``s_k x seconds per update`` of training
(validation excluded, as in the measured times). Probes of several machines give one column or
curve each; each run takes, from each machine, the probe of its own shape (``nmt.probe.
shape_differences``), and a run no probe of a machine fits is refused, naming the key.

The projection keeps the run's batch: a GPU-sized batch would change quality per update,
which no probe can project (``CAVEAT``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nmt import rundir, runlog
from nmt.errors import NmtError
from nmt.hardware import OTHER_LOAD_LIMIT
from nmt.probe import machine_label, read_probe, shape_differences
from nmt.report.runs import AT_SLACK, read_config

CAVEAT = ("Projected times keep each run's batch (its tokens per update): a batch sized for the probed device "
          "would change the quality each update buys, which no probe can project. On a GPU a small shape such as "
          "Multi30k's (d256, 4,096 tokens per update) is bound by kernel launches, not arithmetic, so its projected "
          "time is no measure of what the GPU could do with a larger batch.")


@dataclass
class Projection:
    """One run projected onto one probed machine."""

    run: str
    machine: str  # the probe's hardware and settings (``nmt.probe.machine_label``)
    probe: str  # the probe file
    seconds_per_update: float
    steps: int  # updates the run made
    train_minutes: float  # projected: steps x seconds per update
    time_to_target_minutes: float | None  # projected, at the first validation that reached the target
    bleu_at: dict[str, float | None] = field(default_factory=dict)  # best valid BLEU by projected minutes
    curve: list[tuple[float, float]] = field(default_factory=list)  # (projected minutes, valid BLEU)


@dataclass
class _Run:
    """What a projection reads of a run directory: its log, its recipe and its tokens per update."""

    path: Path
    records: list[dict]
    cfg: dict
    batch: int | None

    @classmethod
    def read(cls, path: Path) -> _Run:
        path = Path(path)
        records = runlog.read_run(path / rundir.LOG_FILE)
        cfg = read_config(path)
        start, train = runlog.first(records, "start") or {}, cfg.get("train") or {}
        batch = start.get("effective_batch_tokens")
        if batch is None and "max_tokens" in train:
            batch = start.get("world_size", 1) * train["max_tokens"] * train.get("update_freq", 1)
        return cls(path, records, cfg, batch)

    def differences(self, probe: dict) -> list[tuple[str, object, object]]:
        return shape_differences(probe, self.cfg, self.batch)


def project_run(run: Path | _Run, probe: dict, probe_path: str, target: float | None = None,
                at: list[float] = ()) -> Projection:
    """``run`` projected onto the machine of ``probe`` (``nmt.probe.read_probe``); refused with one line where
    the probe is of another shape or the run made no update."""
    run = run if isinstance(run, _Run) else _Run.read(run)
    differences = run.differences(probe)
    if differences:
        key, probed, trained = differences[0]
        raise NmtError(f"{probe_path}: a probe of recipe {probe.get('recipe', '?')} with {key}={probed!r}, but "
                       f"{run.path} has {trained!r}; probe that run's recipe on that machine "
                       f"(nmt bench {run.path} --synthetic)")
    steps = max((r.get("step", 0) for r in run.records), default=0)
    if steps < 1:
        raise NmtError(f"{run.path}: no update logged (step 0), so there is no training time to project; "
                       "train it first")
    per_update = probe["seconds_per_update"]
    curve = [(r["step"] * per_update / 60, r["valid_bleu"]) for r in run.records if r["event"] == "valid"]
    total = steps * per_update / 60
    reached = next((minutes for minutes, bleu in curve if target is not None and bleu >= target), None)
    return Projection(run=run.path.name, machine=machine_label(probe), probe=probe_path,
                      seconds_per_update=per_update, steps=steps, train_minutes=total, time_to_target_minutes=reached,
                      bleu_at={f"{m:g}": _bleu_by(curve, total, m) for m in at}, curve=curve)


def _bleu_by(curve: list[tuple[float, float]], total: float, minutes: float) -> float | None:
    """Best valid BLEU by ``minutes`` of projected training; None where the run did not train that long
    (with the slack of ``nmt.report.runs.bleu_at``)."""
    if total < minutes / AT_SLACK:
        return None
    return max((bleu for t, bleu in curve if t <= minutes * AT_SLACK), default=None)


def project(runs: list[Path], probe_paths: list[Path], target: float | None = None,
            at: list[float] = ()) -> list[Projection]:
    """Every run projected onto every probed machine, in the order of the runs, then of the machines.

    The probes are grouped by machine (``machine_label``); each run takes its machine's probe of its
    own shape. Refused with one line: a machine of which no probe fits a run (naming the first key that
    differs), two probes of one machine that both fit, a run with no update.
    """
    probes: dict[str, list[tuple[str, dict]]] = {}
    for path in probe_paths:
        record = read_probe(path)
        probes.setdefault(machine_label(record), []).append((str(path), record))
    found = []
    for path in runs:
        run = _Run.read(path)
        for machine, candidates in probes.items():
            fitting = [(where, p) for where, p in candidates if not run.differences(p)]
            if len(fitting) > 1:
                raise NmtError(f"{fitting[0][0]} and {fitting[1][0]} are both probes of {run.path.name}'s shape on "
                               f"{machine}: give one of them")
            where, record = fitting[0] if fitting else candidates[0]  # a misfit: its error names what differs
            found.append(project_run(run, record, where, target, at))
    return found


def probe_notes(projections: list[Projection]) -> list[str]:
    """One line per probe used: where it came from, its batches and the load it was measured under."""
    notes, seen = [], set()
    for p in projections:
        if p.probe in seen:
            continue
        seen.add(p.probe)
        record = read_probe(p.probe)
        load = record.get("load") or {}
        loaded = [f"{k} {load[k]:.0%}" for k in ("before", "during") if load.get(k) is not None]
        heavy = any(load.get(k) is not None and load[k] > OTHER_LOAD_LIMIT for k in ("before", "during"))
        notes.append(f"{p.probe}: {record.get('recipe', '?')} on {p.machine}, {p.seconds_per_update:.4g} s/update, "
                     f"batches from {record.get('batches', '?')}, measured {record.get('measured_at', '?')}; other "
                     f"processes' load {', '.join(loaded) or 'not measured'}"
                     + (" (forced past the limit: not this hardware's speed alone)" if heavy else ""))
    return notes
