"""What training reports as it goes: one table of logged numbers, feeding every output.

Each number of a ``train`` or ``valid`` record is one ``Scalar`` row below: its key in
``log.jsonl``, how it is computed, its TensorBoard tag and its place on the progress bar. A
new number is one new row; ``TrainLog`` writes every row to the run's log (rank 0), to
TensorBoard (``train.tensorboard``) and to the bar (``--progress``). The record types
themselves are described in ``nmt.runlog``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nmt.errors import NmtError
from nmt.runlog import RunLog


@dataclass
class Reading:
    """A log window read off the device (losses summed over ranks): what ``train`` scalars are made of."""

    step: int
    epoch: int
    loss: float  # summed over the window's target tokens
    nll: float
    tokens: int  # target tokens over all ranks
    seconds: float  # training clock over the window
    lr: float  # the learning rate the scheduler holds after the window's last update
    oom_splits: int
    train_seconds: float  # the clocks since the run began
    valid_seconds: float
    # CPU seconds over the window, validation included (see ``nmt.runlog``): the training processes' own,
    # and the busy and total time of the cores rank 0 may run on; the last two None without /proc/stat.
    cpu_seconds: float | None = None
    machine_busy_seconds: float | None = None
    machine_core_seconds: float | None = None


@dataclass(frozen=True)
class Scalar:
    key: str  # in log.jsonl
    value: Callable[[Reading], object]
    tag: str | None = None  # TensorBoard's tag; None: not drawn
    bar: str | None = None  # the progress bar's label; None: not shown
    fmt: str = ""  # the bar's format


def _per_token(total: float, r: Reading) -> float:
    return total / max(r.tokens, 1)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# The ``train`` record, in its key order.
TRAIN_SCALARS = (
    Scalar("step", lambda r: r.step),
    Scalar("epoch", lambda r: r.epoch),
    Scalar("loss", lambda r: _per_token(r.loss, r), "train/loss", "loss", ".3f"),
    Scalar("nll", lambda r: _per_token(r.nll, r), "train/nll"),
    Scalar("lr", lambda r: r.lr, "train/lr", "lr", ".2e"),
    Scalar("tokens_per_s", lambda r: r.tokens / max(r.seconds, 1e-9), "train/tokens_per_s", "tok/s", ".0f"),
    Scalar("train_seconds", lambda r: round(r.train_seconds, 3)),
    Scalar("valid_seconds", lambda r: round(r.valid_seconds, 3)),
    Scalar("oom_splits", lambda r: r.oom_splits),
    # Whether the run had the machine to itself: other processes took (busy - cpu) / core seconds.
    Scalar("cpu_seconds", lambda r: _seconds(r.cpu_seconds)),
    Scalar("machine_busy_seconds", lambda r: _seconds(r.machine_busy_seconds)),
    Scalar("machine_core_seconds", lambda r: _seconds(r.machine_core_seconds)),
)

# The ``valid`` record's scores (``Trainer.validate``'s result) that TensorBoard draws.
VALID_TAGS = {"valid_bleu": "valid/bleu", "valid_loss": "valid/loss", "valid_ppl": "valid/ppl"}


def train_record(reading: Reading) -> dict:
    """The ``train`` record of a window, as ``log.jsonl`` holds it (without ``event``); a number that
    could not be measured here (None) is left out."""
    values = {s.key: s.value(reading) for s in TRAIN_SCALARS}
    return {key: value for key, value in values.items() if value is not None}


class TensorBoard:
    """The logged scalars as TensorBoard events, against two x axes.

    ``RUN/tb`` holds them against the update step, ``RUN/tb/train_seconds`` against seconds of
    training (the training clock: validation excluded), under the same tags (``train/loss``,
    ``valid/bleu``, ...), so TensorBoard shows them as two runs. On a resume each writer
    tells TensorBoard to drop what an earlier start wrote past the checkpoint, as the log does.
    """

    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise NmtError('train.tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"') \
                from None
        self._writer = SummaryWriter
        self.directory = directory
        self.by_step = self.by_time = None

    def open(self, step: int, train_seconds: float) -> None:
        self.by_step = self._writer(str(self.directory), purge_step=step + 1)
        self.by_time = self._writer(str(self.directory / "train_seconds"), purge_step=round(train_seconds) + 1)

    def write(self, scalars: dict[str, float], step: int, train_seconds: float) -> None:
        for tag, value in scalars.items():
            self.by_step.add_scalar(tag, value, step)
            self.by_time.add_scalar(tag, value, round(train_seconds))

    def flush(self) -> None:
        self.by_step.flush()
        self.by_time.flush()

    def close(self) -> None:
        if self.by_step is not None:
            self.by_step.close()
            self.by_time.close()
            self.by_step = self.by_time = None


class TrainLog:
    """Where a training record goes: the run's log, TensorBoard and the progress bar.

    Every rank has one; on ranks other than 0 the log writes nothing and there is no board or
    bar. ``open`` and ``close`` bracket a training session (the bar and the board's writers).
    """

    def __init__(self, runlog: RunLog, board: TensorBoard | None, progress_bar: bool, max_minutes: float):
        self.runlog, self.board = runlog, board
        self.progress_bar, self.max_minutes = progress_bar, max_minutes
        self.bar: tqdm | None = None

    def open_board(self, step: int, train_seconds: float) -> None:
        if self.board is not None:
            self.board.open(step, train_seconds)

    def close_board(self) -> None:
        if self.board is not None:
            self.board.close()

    def open_bar(self, step: int, max_steps: int) -> None:
        self.bar = tqdm(total=max_steps or None, initial=step, disable=not self.progress_bar,
                        file=sys.stderr, dynamic_ncols=True, unit="step")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train(self, reading: Reading) -> dict:
        """Write one ``train`` record from its reading; returns the record."""
        record = train_record(reading)
        self.runlog.write(event="train", **record)
        if self.board is not None:
            self.board.write({s.tag: record[s.key] for s in TRAIN_SCALARS if s.tag}, reading.step,
                             reading.train_seconds)
        if self.bar is not None:
            postfix = {s.bar: format(record[s.key], s.fmt) for s in TRAIN_SCALARS if s.bar}
            postfix["epoch"] = reading.epoch
            if self.max_minutes:  # the bar's own ETA only knows about max_steps
                left = max(self.max_minutes * 60 - reading.train_seconds, 0)
                postfix["eta"] = f"{int(left // 60)}:{int(left % 60):02d}"
            self.bar.set_postfix(postfix, refresh=False)
        return record

    def valid(self, record: dict, train_seconds: float) -> None:
        """Write one ``valid`` record (without ``event``, keys in their log order); ``train_seconds``
        unrounded, for TensorBoard's time axis."""
        self.runlog.write(event="valid", **record)
        if self.board is not None:
            self.board.write({tag: record[key] for key, tag in VALID_TAGS.items()}, record["step"], train_seconds)
            self.board.flush()
