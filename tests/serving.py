"""A ``nmt serve`` process on a free localhost port, for the tests that talk to it over HTTP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``nmt serve ARGS`` started in the background; its stdout and stderr go to files."""

    def __init__(self, tmp: Path, *args: str, timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = tmp / f"serve-{self.port}.out", tmp / f"serve-{self.port}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "nmt", "serve", "--port", str(self.port),
                                             "--threads", "1", *args], stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nmt serve exited {self.process.returncode}: {self.err.read_text()}")
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"nmt serve did not answer in {timeout} s: {self.err.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, object]:
        """(status, parsed JSON) of one request; an HTTP error status is returned, not raised."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str):
        return self.request("GET", path)[1]

    def post_json(self, path: str, payload, **kw) -> tuple[int, object]:
        return self.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"}, **kw)

    def log_lines(self) -> list[str]:
        return self.err.read_text(encoding="utf-8").splitlines()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
