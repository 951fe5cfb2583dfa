"""The machine: which device to use, how a run's log describes the hardware, and whether two
descriptions name the same machine.

A run's ``start`` and ``resume`` records carry ``hardware()``: the CPU's model name and usable
cores (``cpu``), its kind (``cpu_kind``: generation and vector instructions) and the GPU on
CUDA (``gpu``). ``nmt report`` refuses to compare training times across machines, and
``nmt hardware`` checks this machine against runs before one is added to them.

Whether a run had the machine to itself: ``cpu_sample`` reads this process's CPU seconds and the
busy and total seconds of the cores it may run on (``/proc/stat``), and ``other_load`` turns two
samples into the share of those cores' time that other processes took in between.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nmt.errors import NmtError


def pick_device() -> torch.device:
    """The GPU of this process (``LOCAL_RANK`` under torchrun) where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask where the OS has one, else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hardware(device: torch.device) -> dict[str, str]:
    """What a run trained on, for its start and resume records: the CPU's model name and usable
    cores, its kind (``cpu_kind``), and the GPU on CUDA."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    found = {"cpu": f"{name} ({usable_cores()} cores)", "cpu_kind": cpu_kind(info)}
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    return found


def cpu_kind(info: dict[str, str]) -> str:
    """The CPU's generation as /proc/cpuinfo (``info``) numbers it and the vector instructions torch
    runs on it: "family 23 model 1, AVX2". A virtual machine may show one model name ("AMD EPYC") for
    CPU generations years apart, whose speeds differ by a factor of two or more."""
    if "cpu family" in info:  # x86
        ident = f"family {info['cpu family']} model {info.get('model', '?')}"
    elif "CPU part" in info:  # ARM
        ident = f"implementer {info.get('CPU implementer', '?')} part {info['CPU part']}"
    else:
        ident = platform.machine() or "unknown"
    return f"{ident}, {torch.backends.cpu.get_cpu_capability()}"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo; empty where there is none."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


# --- the machine's load: its cores' busy time against this process's own -------------------

# Above this share of the cores' time taken by other processes, a stretch of time "had other load":
# a log window is counted as such by ``nmt report``, and ``nmt bench`` refuses to measure.
OTHER_LOAD_LIMIT = 0.10


@dataclass(frozen=True)
class CpuSample:
    """CPU clocks at one moment, in seconds since some start: what ``other_load`` compares."""

    process: float  # this process's CPU time, all its threads (``time.process_time``)
    busy: float | None  # the usable cores' busy time (None: no /proc/stat)
    total: float | None  # the usable cores' time, busy or idle: wall time x cores


# /proc/stat's columns after the cpu name: user nice system idle iowait irq softirq steal (guest and
# guest_nice are counted in user and nice already). Steal, time the hypervisor gave the core to another
# machine, counts as busy: it slows a run as another process would.
_IDLE_COLUMNS = (3, 4)
_COLUMNS = 8
PROC_STAT = Path("/proc/stat")


def cpu_sample() -> CpuSample:
    """This process's CPU seconds, and the busy and total seconds of the cores it may run on (its
    affinity mask) from ``/proc/stat``; busy and total are None where there is no such file."""
    process = time.process_time()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy = total = 0
    try:
        with PROC_STAT.open(encoding="ascii", errors="replace") as f:
            for line in f:
                name, *fields = line.split() or [""]
                if not name.startswith("cpu"):
                    if total:  # past the cores' lines, which come together at the top
                        break
                    continue
                if name == "cpu" or (cores is not None and int(name[3:]) not in cores):  # "cpu": all cores
                    continue
                ticks = [int(x) for x in fields[:_COLUMNS]]
                total += sum(ticks)
                busy += sum(ticks) - sum(ticks[i] for i in _IDLE_COLUMNS if i < len(ticks))
    except (OSError, ValueError):
        return CpuSample(process, None, None)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return CpuSample(process, busy / hz, total / hz) if total else CpuSample(process, None, None)


def other_load(before: CpuSample, after: CpuSample, own: float | None = None) -> float | None:
    """The share of the usable cores' time between two samples that other processes took: (busy - own)
    / total, where ``own`` is the CPU seconds of this job's processes (default: this process's);
    None where /proc/stat was not read."""
    if before.busy is None or after.busy is None or after.total - before.total <= 0:
        return None
    own = after.process - before.process if own is None else own
    return other_share(after.busy - before.busy, own, after.total - before.total)


def other_share(busy: float, own: float, total: float) -> float:
    """Of ``total`` seconds of the cores' time, ``busy`` of them busy, the share others took than the
    processes whose CPU seconds are ``own``: a log record's ``(machine_busy_seconds - cpu_seconds) /
    machine_core_seconds``."""
    return max(busy - own, 0.0) / total if total > 0 else 0.0


# --- describing and comparing the machines of log records -----------------------------------

def machine(record: dict) -> str:
    """The CPU (and GPU) of a start or resume record; "" for a log written before nmt recorded them."""
    return ", ".join(record[key] for key in ("cpu", "gpu") if record.get(key))


def describe_hardware(record: dict) -> str:
    """A start or resume record's hardware in one phrase: "AMD EPYC (2 cores) [family 23 model 1, AVX2]"."""
    return f"{machine(record)} [{record['cpu_kind']}]" if record.get("cpu_kind") else machine(record)


def same_machine(a: dict, b: dict) -> bool:
    """Whether two start/resume records name the same hardware; a kind not logged matches any."""
    kinds = a.get("cpu_kind"), b.get("cpu_kind")
    return machine(a) == machine(b) and (not all(kinds) or kinds[0] == kinds[1])


def check_here(runs: list[Path]) -> tuple[str, list[str]]:
    """This machine as a run's log records it, checked against the runs' start records before a run
    is added to them: raises naming the first that trained on other hardware; else returns
    (this machine, notes on runs whose log names the CPU without its kind, matched on name and cores)."""
    from nmt import rundir, runlog

    here = hardware(pick_device())
    described = describe_hardware(here)
    notes = []
    for run in runs:
        start = runlog.first(runlog.read_run(Path(run) / rundir.LOG_FILE), "start") or {}
        if not machine(start) or not start.get("cpu_kind"):
            notes.append(f"{run}: CPU kind not recorded (logged before nmt recorded it), matched on name and cores "
                         "only" if machine(start) else f"{run}: CPU not recorded, not checked")
        if machine(start) and not same_machine(start, here):
            raise NmtError(f"{run} trained on {describe_hardware(start)}, this machine is {described}: a run "
                           "made here would not compare with it; train on a machine of its kind")
    return described, notes
