"""Projection check: training time projected from a probe against the time a run measured, on one machine kind.

    python bench/projection_check.py RUN... --probe PROBE.json [--target 30] [--at 10,20,30,40]

``nmt report --time-from PROBE.json`` projects a run's training time onto the probed hardware: its
updates x the probe's seconds per update (validation excluded). Where the run trained on the
probe's own kind of machine, its own clock says how good that is. For each run this prints one of:

  unchecked (kind not at hand)        the run's start record names other hardware than the probe
                                      (CPU name and cores, CPU kind, GPU: nmt.hardware.same_machine).
                                      The committed Multi30k runs trained on AMD EPYC kinds: only a
                                      probe taken on such a machine checks them
  unchecked (the run shared its machine)  its log shows other processes' load, so its clock is no measure
  checked                             projected and measured minutes of the whole run and to valid BLEU
                                      --target, with the error (projected / measured - 1), and best
                                      valid BLEU by each --at mark of measured and of projected time

Probe on an idle machine of the run's kind (nmt bench RUN --out PROBE.json), then run this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's nmt, installed or not

from nmt import hardware, rundir, runlog  # noqa: E402
from nmt.errors import NmtError  # noqa: E402
from nmt.probe import machine_label, read_probe  # noqa: E402
from nmt.report import parse_minutes, summarize  # noqa: E402
from nmt.report.projection import project_run  # noqa: E402

UNCHECKED_KIND = "unchecked (kind not at hand)"
UNCHECKED_SHARED = "unchecked (the run shared its machine)"


def _error(projected: float | None, measured: float | None) -> str:
    if projected is None or measured is None:
        return "–"
    return f"{projected / measured - 1:+.1%}" if measured > 0 else "–"


def _minutes(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f} min"


def _bleu(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def check_run(run: Path, probe: dict, probe_path: str, target: float | None, at: list[float]) -> list[str]:
    """The lines this script prints for one run."""
    start = runlog.first(runlog.read_run(run / rundir.LOG_FILE), "start") or {}
    head = f"{run}: "
    if not hardware.same_machine(start, probe) or not hardware.machine(start):
        trained = hardware.describe_hardware(start) or "hardware not recorded"
        return [head + f"{UNCHECKED_KIND}: trained on {trained}, probe of {hardware.describe_hardware(probe)}"]
    row = summarize(run, target, at)
    if row.machine_use == "shared":
        return [head + f"{UNCHECKED_SHARED}: other processes loaded it in {row.loaded_windows:.0%} of its log windows"]
    projected = project_run(run, probe, probe_path, target, at)
    lines = [head + f"checked on {machine_label(probe)}" + ("" if row.machine_use else
                                                             " (its log records no CPU load: assumed alone)"),
             f"  whole run, {projected.steps:,} updates: measured {row.train_minutes:.2f} min, projected "
             f"{projected.train_minutes:.2f} min ({_error(projected.train_minutes, row.train_minutes)})"]
    if target is not None:
        lines.append(f"  to valid BLEU {target:g}: measured {_minutes(row.time_to_target_minutes)}, projected "
                     f"{_minutes(projected.time_to_target_minutes)} "
                     f"({_error(projected.time_to_target_minutes, row.time_to_target_minutes)})")
    for mark, measured in row.bleu_at.items():
        guess = projected.bleu_at[mark]
        diff = "–" if measured is None or guess is None else f"{guess - measured:+.2f}"
        lines.append(f"  best valid BLEU by {mark} min: measured {_bleu(measured)}, projected {_bleu(guess)} ({diff})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (with log.jsonl)")
    parser.add_argument("--probe", type=Path, required=True, help="a probe file of nmt bench")
    parser.add_argument("--target", type=float, help="valid BLEU whose first reaching is timed")
    parser.add_argument("--at", default="10,20,30,40", help="training minutes (default 10,20,30,40)")
    args = parser.parse_args(argv)
    try:
        probe = read_probe(args.probe)
        marks = parse_minutes(args.at)
    except NmtError as e:
        print(f"projection_check: error: {e}", file=sys.stderr)
        return 1
    print(f"probe {args.probe}: {probe['recipe']} on {machine_label(probe)}, {probe['seconds_per_update']:.4g} "
          "s/update")
    failed = 0
    for run in args.runs:
        try:
            print("\n".join(check_run(run, probe, str(args.probe), args.target, marks)))
        except NmtError as e:  # a probe of another shape, a run without updates: this run only
            print(f"{run}: error: {e}")
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
