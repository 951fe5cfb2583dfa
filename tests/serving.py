"""A ``nmt serve`` process on a free localhost port, for the tests that talk to it over HTTP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """JSON requests to a server at ``url``."""

    url: str

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, object]:
        """(status, parsed JSON) of one request; an HTTP error status is returned, not raised."""
        status, _, payload = self.exchange(method, path, body, headers, timeout)
        return status, json.loads(payload) if payload else None

    def exchange(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 30.0) -> tuple[int, dict, bytes]:
        """(status, headers with lowercase names, body) of one request."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def get(self, path: str):
        return self.request("GET", path)[1]

    def post_json(self, path: str, payload, **kw) -> tuple[int, object]:
        return self.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"}, **kw)


class InThread(Client):
    """An ASGI app served by uvicorn in a thread of this process (no model to load), as a context."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the app did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Served(Client):
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
