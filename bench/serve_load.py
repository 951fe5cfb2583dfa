"""Load on nmt serve: concurrent clients on localhost, against nmt translate on the same lines.

    python bench/serve_load.py -m RUN [--src FILE] [--clients 1 8 64] [--seconds 20] [--rounds 3]
        [--batch-requests 64 1] [--threads 2] [--engine nmt|ctranslate2] [--int8] [--same-output]

For each ``--max-batch-requests`` setting a server is started (``nmt serve``, beam and
penalties of the run), and for each client count N, N threads of this process (a separate
process from the server, sharing its cores: its CPU use is printed) send the lines one per
request over keep-alive connections, for ``--seconds``. Printed per setting: requests/s,
sentences/s, p50/p95/p99 latency, errors, and sentences/s as a share of the pipe's: the
same lines through ``nmt.translate.translate`` in a child process with the same threads
(what ``nmt translate`` runs, model loading excluded). Medians over ``--rounds``; the
settings alternate within a round, so noise on a shared machine hits them alike.

``--same-output``: each line sent alone (one client, one request at a time) and again by 64
clients at once; prints how many translations differ (fp32 on nmt's engine: none; int8's
activation scales are per batch, and CTranslate2 pads batches, so those may differ).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine  # noqa: E402
from serving import free_port  # noqa: E402

PIPE = """
import sys, time, dataclasses, torch
torch.set_num_threads(int(sys.argv[2]))
from nmt.rundir import load_run
from nmt.translate import translate
lines = open(sys.argv[3], encoding="utf-8").read().splitlines()
cfg, tok, model = load_run(sys.argv[1], int8=sys.argv[4] == "1")
search = dataclasses.replace(cfg.search, sampling="none")
translate(model, tok, lines[:64], search)  # warm-up
start = time.perf_counter()
translate(model, tok, lines, search)
print(len(lines) / (time.perf_counter() - start))
"""


def pipe_rate(run: Path, threads: int, src: Path, int8: bool) -> float:
    out = subprocess.run([sys.executable, "-c", PIPE, str(run), str(threads), str(src), "1" if int8 else "0"],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


class Server:
    def __init__(self, args, batch_requests: int):
        self.port = free_port()
        cmd = [sys.executable, "-m", "nmt", "serve", "-m", str(args.model), "--port", str(self.port),
               "--threads", str(args.threads), "--max-batch-requests", str(batch_requests), "--engine", args.engine,
               "--max-queue", "4096", "--timeout", "120", "--batch-limit", "0", "--char-limit", "0"]
        if args.int8:
            cmd.append("--int8")
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def post(conn: http.client.HTTPConnection, text) -> tuple[int, dict]:
    conn.request("POST", "/translate", json.dumps({"q": text, "source": "auto", "target": TARGET}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


TARGET = "de"


def load(port: int, lines: list[str], clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending lines one per request until ``seconds`` have passed."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = c
        mine = []
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                status, _ = post(conn, lines[i % len(lines)])
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            if status == 200:
                mine.append(time.perf_counter() - start)
            else:
                with lock:
                    errors[0] += 1
            i += clients
        conn.close()
        with lock:
            latencies.extend(mine)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    latencies.sort()

    def pct(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else float("nan")

    return {"requests_s": len(latencies) / wall, "p50": pct(50), "p95": pct(95), "p99": pct(99),
            "errors": errors[0], "client_cpu": cpu / wall}


def same_output(args, lines: list[str]) -> None:
    server = Server(args, 64)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        alone = [post(conn, line)[1]["translatedText"] for line in lines]

        def one(line: str) -> str:
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            try:
                return post(c, line)[1]["translatedText"]
            finally:
                c.close()

        with ThreadPoolExecutor(64) as pool:
            together = list(pool.map(one, lines))
    finally:
        server.stop()
    differ = sum(a != b for a, b in zip(alone, together))
    print(f"same output: {len(lines)} lines alone and among 64 concurrent clients: {differ} differ "
          f"({args.engine}{' int8' if args.int8 else ''})")


def pair_of(model: Path) -> tuple[str, str, str]:
    """(source, target, data dir) of a run, or of an export's run."""
    from nmt import config

    settings = model / "search.json"
    run = Path(json.loads(settings.read_text())["run"]) if settings.is_file() else model
    data = config.load_recipe(run / "config.yaml").data
    return data.src_lang, data.tgt_lang, data.dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", type=Path, required=True, help="run directory (or export, --engine)")
    parser.add_argument("--src", type=Path, help="lines to send (default: the run's test2016 source)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--batch-requests", type=int, nargs="+", default=[64, 1],
                        help="--max-batch-requests settings to compare (1: no batching across requests)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", default="nmt")
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--same-output", type=int, metavar="N", default=0,
                        help="check N lines alone against 64 concurrent clients, then stop")
    args = parser.parse_args()

    global TARGET
    source, TARGET, data_dir = pair_of(args.model)
    src = args.src
    if src is None:
        from nmt.download import data_root

        src = data_root() / data_dir / f"test2016.{source}"
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(describe_machine())
    print(f"lines: {src} ({len(lines)}), server threads {args.threads}, engine {args.engine}"
          f"{' int8' if args.int8 else ''}, {args.seconds:g} s per measurement, {args.rounds} rounds")
    if args.same_output:
        same_output(args, lines[: args.same_output])
        return
    results: dict[tuple[int, int], list[dict]] = {}
    pipes = []
    for r in range(args.rounds):
        pipes.append(pipe_rate(args.model, args.threads, src, args.int8))
        for batch_requests in args.batch_requests:
            server = Server(args, batch_requests)
            try:
                load(server.port, lines, 8, 3)  # warm-up
                for clients in args.clients:
                    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
                    found = load(server.port, lines, clients, args.seconds)
                    found["server_cpu"] = (server.cpu_seconds() - cpu0) / (time.perf_counter() - t0)
                    results.setdefault((batch_requests, clients), []).append(found)
            finally:
                server.stop()
        print(f"round {r + 1}: pipe {pipes[-1]:.1f} sent/s", file=sys.stderr)
    pipe = statistics.median(pipes)
    print(f"\nnmt translate (translate(), {args.threads} threads): {pipe:.1f} sentences/s "
          f"(median of {len(pipes)}: {', '.join(f'{p:.1f}' for p in pipes)})\n")
    print("| --max-batch-requests | clients | requests/s | sentences/s | of the pipe | p50 ms | p95 ms | p99 ms "
          "| errors | server CPU | client CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (batch_requests, clients), runs in results.items():
        def m(key: str, runs=runs) -> float:
            return statistics.median(run[key] for run in runs)

        print(f"| {batch_requests} | {clients} | {m('requests_s'):.1f} | {m('requests_s'):.1f} | "
              f"{m('requests_s') / pipe:.0%} | {m('p50'):.0f} | {m('p95'):.0f} | {m('p99'):.0f} | "
              f"{sum(run['errors'] for run in runs)} | {m('server_cpu'):.0%} | {m('client_cpu'):.0%} |")


if __name__ == "__main__":
    main()
