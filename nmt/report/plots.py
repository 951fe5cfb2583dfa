"""The report as a picture: valid BLEU against training time, a line per run or per seed group, or
against training time projected onto probed hardware, a line per run and machine."""

from __future__ import annotations

from pathlib import Path

from nmt import rundir, runlog
from nmt.report.projection import CAVEAT, Projection
from nmt.report.runs import machine_use, model_kind
from nmt.report.seeds import SeedGroup


def mean_curve(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float],
                                                                       list[float]]:
    """(times, mean, min, max) of several (times, values) curves, linearly interpolated at every
    time any of them was measured, over the span all of them cover."""
    import numpy as np

    start = max(times[0] for times, _ in curves)
    stop = min(times[-1] for times, _ in curves)
    grid = sorted({t for times, _ in curves for t in times if start <= t <= stop}) or [stop]
    values = np.array([np.interp(grid, times, ys) for times, ys in curves])  # (runs, len(grid))
    return grid, values.mean(0).tolist(), values.min(0).tolist(), values.max(0).tolist()


def plot(runs: list[Path], out: Path, target: float | None = None, speed: bool = False,
         groups: list[SeedGroup] = (), by_updates: bool = False) -> None:
    """Valid BLEU against training minutes (``by_updates``: against updates), a line per run; tokens/s
    below it if ``speed``.

    With seed groups: a line per group, the mean over its seeds, in a band from the lowest to the
    highest seed (over the training time all its seeds reached).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if speed else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 4 * rows), squeeze=False)
    ax = axes[0][0]
    curves, speeds, colors = [], [], {}

    def clock(r: dict) -> float:
        return r["step"] if by_updates else r["train_seconds"] / 60

    for run in runs:
        records = runlog.read_run(Path(run) / rundir.LOG_FILE)
        valid = [r for r in records if r["event"] == "valid"]
        train = [r for r in records if r["event"] == "train"]
        curves.append(([clock(r) for r in valid], [r["valid_bleu"] for r in valid]))
        speeds.append(([clock(r) for r in train], [r["tokens_per_s"] for r in train]))
        if not groups:  # a run that shared its machine says so: its time axis is not usable
            shared = " – shared machine: time not usable" \
                if machine_use(records)[0] == "shared" and not by_updates else ""
            ax.plot(*curves[-1], marker="o", markersize=3, label=f"{Path(run).name} ({model_kind(Path(run))}){shared}")
    for g in groups:
        members = [curves[i] for i in g.members if curves[i][0]]
        if len(members) == 1:
            line, = ax.plot(*members[0], marker="o", markersize=3, label=f"{g.recipe} ({g.model}), 1 seed")
        elif members:
            grid, mean, low, high = mean_curve(members)
            line, = ax.plot(grid, mean, label=f"{g.recipe} ({g.model}): mean of {len(members)} seeds, band min–max")
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        colors.update({i: line.get_color() for i in g.members} if members else {})
    if speed:  # a line per run, in its group's colour
        for i, run in enumerate(runs):
            axes[1][0].plot(*speeds[i], color=colors.get(i), label=f"{Path(run).name} ({model_kind(Path(run))})")
    if target is not None:
        ax.axhline(target, linestyle="--", color="grey", label=f"target {target:g}")
    ax.set_xlabel("updates" if by_updates else "training time (minutes, validation excluded)")
    ax.set_ylabel("valid BLEU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if speed:
        axes[1][0].set_xlabel("updates" if by_updates else "training time (minutes)")
        axes[1][0].set_ylabel("target tokens/s")
        axes[1][0].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_projected(projections: list[Projection], out: Path, target: float | None = None) -> None:
    """Valid BLEU against projected training minutes (``--time-from``): a line per run and probed machine,
    dashed, every label saying "projected"; the caveat under the axes."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for p in projections:
        if p.curve:
            ax.plot(*zip(*p.curve), linestyle="--", marker="o", markersize=3,
                    label=f"{p.run} on {p.machine} (projected)")
    if target is not None:
        ax.axhline(target, linestyle=":", color="grey", label=f"target {target:g}")
    ax.set_xlabel("projected training time (minutes, validation excluded): updates × the probe's s/update")
    ax.set_ylabel("valid BLEU")
    ax.set_title("Valid BLEU against projected training time", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.text(0.01, 0.01, textwrap.fill(CAVEAT, 150), fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
