"""``log.jsonl``: a run's log, one JSON object per line, written by rank 0 as training goes.

Every record has ``event`` and ``step`` (updates made when it was written). The events:

``start``  (step 0, once) what the run trains on: ``params``, ``device``, ``world_size``,
           ``threads``, ``precision``, ``tf32`` (TF32 matmuls: fp32 on CUDA), ``max_tokens``,
           ``update_freq``, ``effective_batch_tokens`` (tokens per update over all ranks and
           micro-batches), ``overlap`` (DDP summing gradients during the backward pass),
           ``loss_chunk_rows`` (target tokens per chunk of the fused output layer and loss),
           ``train_pairs``, ``corpora`` (per training corpus: ``corpus``, ``files``, ``weight``,
           ``lines``, ``pairs``, ``dropped_empty``, ``dropped_too_long``, ``pairs_per_epoch``),
           and the hardware (``cpu``, ``cpu_kind``, ``gpu`` on CUDA; see ``nmt.hardware``).
``resume`` (each time a run continues from ``last.pt``) the hardware it continues on.
``train``  (every ``train.log_every`` updates) sums over the updates since the last one:
           ``epoch``, ``loss`` and ``nll`` (per target token), ``lr`` (of the last update),
           ``tokens_per_s`` (target tokens over all ranks, per second of training),
           ``train_seconds`` and ``valid_seconds`` (the two clocks so far), ``oom_splits``
           (micro-batches run in halves after running out of memory), and whether the run had
           the machine to itself: ``cpu_seconds`` (CPU time of the training processes, every
           thread, summed over the ranks on rank 0's machine), ``machine_busy_seconds`` and
           ``machine_core_seconds`` (from ``/proc/stat``, of the cores rank 0 may run on: their
           busy time, the hypervisor's steal included, and all their time, busy or idle: wall
           time x cores). These three span the whole time since the last ``train`` record,
           validation included, so that they compare: other processes took (busy - cpu) / core
           seconds of the machine (``nmt.hardware.other_load``); the last two are absent where
           there is no ``/proc/stat``. ``nmt.trainlog`` lists the keys.
``valid``  (every ``train.valid_every`` updates and at the end) ``epoch``, ``valid_loss``,
           ``valid_ppl``, ``valid_bleu``, ``valid_bleu_signature``, ``best_bleu`` (so far), and
           the two clocks.
``end``    (when training stops: a limit, early stopping) ``reason``, ``best_bleu``,
           ``best_step`` and the two clocks. A resumed run drops its ``end`` and writes a new one.

One rule for a damaged log, for every reader: a last line cut off by a crash is passed over
(the records before it stand); any other line that is not a record is an error naming the
file and line, and nothing rewrites the log past it (a resume refuses rather than deleting it).
"""

from __future__ import annotations

import json
from pathlib import Path

from nmt.errors import NmtError


def read(path: Path) -> list[dict]:
    """The records of a log, in order; [] where there is no log yet."""
    return [record for _, record in _lines(Path(path))]


def read_run(path: Path) -> list[dict]:
    """The records of a finished or running run's log: a missing or empty log is an error."""
    path = Path(path)
    if not path.is_file():
        raise NmtError(f"{path}: missing; is {path.parent} a run directory written by nmt train?")
    records = read(path)
    if not records:
        raise NmtError(f"{path}: empty; the run has not started training")
    return records


def first(records: list[dict], event: str) -> dict | None:
    """The first record of this ``event``, if any."""
    return next((r for r in records if r.get("event") == event), None)


def last(records: list[dict], event: str) -> dict | None:
    """The last record of this ``event``, if any."""
    return next((r for r in reversed(records) if r.get("event") == event), None)


def _lines(path: Path) -> list[tuple[str, dict]]:
    """(line as written, record) for every record of the log."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    found = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write: the lines before it stand
                break
            raise NmtError(f"{path}:{n}: not a JSON record; the log is corrupt: repair or remove that line "
                           "(nmt never deletes it)") from None
        if not isinstance(record, dict) or "event" not in record:
            raise NmtError(f"{path}:{n}: not an nmt log record (no 'event'): repair or remove that line "
                           "(nmt never deletes it)")
        found.append((line, record))
    return found


class RunLog:
    """The writer of one run's log; ``enabled`` is False on every rank but 0, which then writes nothing."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._dropped_end: str | None = None

    def records(self) -> list[dict]:
        return read(self.path)

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records written after the checkpoint a run resumes from, and any ``end`` record.

        A resumed run is running again: an old ``end`` left in place would have it reported
        finished even if it then crashed; the run writes a new ``end`` when it stops. A cut-off
        last line goes too; a damaged line elsewhere stops the resume with an error (``read``).
        """
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line, record in _lines(self.path):
            if record.get("step", 0) > step:
                continue
            if record.get("event") == "end":
                self._dropped_end = line
            else:
                kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def restore_end(self) -> None:
        """Put back the ``end`` record dropped on resuming, for a run that had nothing left to train."""
        if self.enabled and self._dropped_end is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(self._dropped_end + "\n")
            self._dropped_end = None
