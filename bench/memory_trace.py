"""Peak memory of a command and every process it starts (ranks of a --nproc run included).

    python bench/memory_trace.py [--every 0.2] [--series FILE] -- nmt train RECIPE --nproc 2 ...

Samples ``/proc/PID/smaps_rollup`` of the command's process tree and prints the peak of the
summed PSS (shared pages, e.g. a memory-mapped corpus or the PyTorch libraries, counted once
across the processes that map them) and of the summed anonymous memory, then each process's
share at the PSS peak, so a launcher and its ranks can be told apart. ``--series`` writes every
sample (seconds, summed PSS and anonymous MiB, then PSS/anonymous of each process).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out += tree(int(child))
    except OSError:  # the process ended meanwhile
        pass
    return out


def rollup(pid: int) -> dict:
    """PSS and anonymous memory of one process, in MiB, and its command line."""
    info: dict = {"pss": 0.0, "anon": 0.0, "cmd": ""}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, value = line.split()[:2]
                if key == "Pss:":
                    info["pss"] = int(value) / 1024
                elif key == "Anonymous:":
                    info["anon"] = int(value) / 1024
        with open(f"/proc/{pid}/cmdline") as f:
            info["cmd"] = f.read().replace("\0", " ").strip()
    except OSError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--series", help="write every sample to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    series = open(args.series, "w") if args.series else None
    start = time.time()
    proc = subprocess.Popen(command)
    peak_pss, peak_anon, at, snapshot = 0.0, 0.0, 0.0, {}
    while proc.poll() is None:
        sample = {pid: rollup(pid) for pid in tree(proc.pid)}
        pss = sum(s["pss"] for s in sample.values())
        anon = sum(s["anon"] for s in sample.values())
        if pss > peak_pss:
            peak_pss, at, snapshot = pss, time.time() - start, sample
        peak_anon = max(peak_anon, anon)
        if series:
            parts = " ".join(f"{s['pss']:.0f}/{s['anon']:.0f}" for s in sample.values())
            print(f"{time.time() - start:.1f} {pss:.0f} {anon:.0f} {parts}", file=series, flush=True)
        time.sleep(args.every)
    print(f"exit {proc.returncode} after {time.time() - start:.1f} s; peak summed PSS {peak_pss:,.0f} MiB "
          f"at {at:.1f} s; peak summed anonymous {peak_anon:,.0f} MiB", file=sys.stderr)
    for pid, s in snapshot.items():
        print(f"  pid {pid}: PSS {s['pss']:,.0f} MiB, anonymous {s['anon']:,.0f} MiB  {s['cmd'][:90]}", file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
