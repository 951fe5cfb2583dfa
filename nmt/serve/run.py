"""Starting and stopping the server (see ``nmt.serve``)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
import uvicorn

from nmt.hardware import usable_cores
from nmt.serve.app import ServeLimits, Server, build_app, read_api_keys
from nmt.serve.batcher import Limits
from nmt.serve.models import load_models

log = logging.getLogger("nmt")


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM or SIGINT it shut down on gracefully ends in exit 0
    (uvicorn raises the signal again once it has shut down, which kills the process: 143)."""

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._captured_signals.clear()  # handled here: shut down, do not raise it again


def serve(models: list[Path], *, host: str = "127.0.0.1", port: int = 5000, engine: str = "nmt",
          checkpoint: str = "best", int8: bool | None = None, threads: int | None = None,
          api_keys: Path | None = None, limits: ServeLimits | None = None, batching: Limits | None = None,
          access_log: bool = False) -> None:
    """Load the models and serve them until SIGTERM or Ctrl-C."""
    threads = threads or usable_cores()
    torch.set_num_threads(threads)  # once, for the one worker thread that decodes
    keys = read_api_keys(api_keys) if api_keys else None
    served = load_models(models, engine, checkpoint, int8, threads)
    batching = batching or Limits()
    server = Server(served, limits or ServeLimits(), batching, keys)
    for m in served:
        log.info("serving %s", m.describe())
    config = uvicorn.Config(build_app(server), host=host, port=port, access_log=access_log, log_level="info",
                            timeout_graceful_shutdown=int(batching.timeout) + 5)
    GracefulServer(config).run()
