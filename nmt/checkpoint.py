"""Self-describing checkpoints, written atomically; loading checks what they are.

A checkpoint holds the resolved config, the model kind, the SHA-256 of the run's
SentencePiece model, the training position and (for resuming) optimizer, scheduler,
RNG and data-order state. It is written to a temporary file in the same directory and
renamed over the old one, so a crash mid-write never leaves a half-written ``last.pt``;
the directory is then synced, so that a power cut cannot undo the rename.

``model_state`` and ``training_state`` make the dicts the trainer writes;
``check_resumable`` and ``restore_training`` read a ``last.pt`` back into a trainer's
parts, every rank's random generators included; ``load_weights`` and ``load_moments``
start a fine-tuned run from another run's checkpoint.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from nmt.errors import NmtError
from nmt.files import fsync_dir, sha256

FORMAT = "nmt-checkpoint"
VERSION = 1


def save(state: dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load(path: Path, tokenizer_sha256: str | None = None, mmap: bool = False) -> dict[str, Any]:
    """Load and check a checkpoint; every failure is one NmtError naming the file.

    ``mmap``: map the file instead of reading it, for a look at the header entries.
    """
    path = Path(path)
    if not path.is_file():
        raise NmtError(f"{path}: no such checkpoint; train first (nmt train) or name "
                       "another with --checkpoint best|last|averaged|PATH")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, KeyError, IndexError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NmtError(f"{path}: truncated or corrupt checkpoint ({reason[:120]}); use another "
                       "checkpoint (best.pt, last.pt) or train again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NmtError(f"{path}: not an nmt checkpoint (no '{FORMAT}' header); nmt reads only "
                       "checkpoints written by nmt train")
    if state.get("version", 0) > VERSION:
        raise NmtError(f"{path}: checkpoint format version {state['version']} is newer than this "
                       f"nmt reads ({VERSION}); upgrade nmt")
    if tokenizer_sha256 is not None and state.get("tokenizer_sha256") != tokenizer_sha256:
        raise NmtError(f"{path}: checkpoint was trained with another SentencePiece model than "
                       f"the run's spm.model; put the matching spm.model back or train again")
    return state


# --- what the trainer writes and reads back ----------------------------------------------

def model_state(config_dict: dict[str, Any], model_kind: str, tokenizer_sha256: str, step: int,
                vocab_size: int, model: torch.nn.Module, world_size: int) -> dict[str, Any]:
    """What every checkpoint holds: enough to translate with it and to know where it came from."""
    return {"config": config_dict, "model_kind": model_kind, "tokenizer_sha256": tokenizer_sha256,
            "step": step, "vocab_size": vocab_size, "model": model.state_dict(), "world_size": world_size}


def training_state(optimizer: torch.optim.Optimizer, scheduler, scaler, progress: dict[str, Any],
                   rng: list[dict[str, Any]], data_format: int) -> dict[str, Any]:
    """What ``last.pt`` adds for resuming: optimizer, schedule, loss scale, position, RNGs.

    ``rng`` holds one ``rng_state()`` per rank; ``data_format`` is the version of the batch
    order the position refers to (``nmt.batching.ORDER_VERSION``).
    """
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "progress": dict(progress), "rng": rng,
            "data_format": data_format}


def rng_state() -> dict[str, Any]:
    """This process's random generators, as tensors and ints (what ``weights_only`` loading reads)."""
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, *internal, gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(rng: dict[str, Any]) -> None:
    flat = rng["python"]
    torch.set_rng_state(rng["torch"])
    random.setstate((flat[0], tuple(flat[1:-1]), flat[-1]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def check_resumable(state: dict[str, Any], path: Path, model_kind: str, world_size: int,
                    data_format: int) -> None:
    """Refuse, in one line, a ``last.pt`` that this job cannot continue exactly."""
    if state.get("model_kind") != model_kind:
        raise NmtError(f"{path} holds a {state.get('model_kind')} model but the recipe asks "
                       f"for {model_kind}; train into a new --run directory")
    if "optimizer" not in state:
        raise NmtError(f"{path} has no training state to resume from; train into a new --run")
    if state.get("world_size", 1) != world_size:
        raise NmtError(f"{path} was trained on {state.get('world_size', 1)} rank(s), this job has "
                       f"{world_size}: the batch order and effective batch depend on it; resume "
                       f"with --nproc {state.get('world_size', 1)}, or train into a new --run directory")
    saved = state.get("data_format", 1)  # checkpoints from before the version was kept: the first order
    if saved != data_format:
        raise NmtError(f"{path} was trained with batch order version {saved}, this nmt makes version "
                       f"{data_format}: resuming would train on other batches than the run has seen; "
                       "finish it with the nmt that started it, or train into a new --run directory")


def restore_training(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, scaler, rank: int) -> dict[str, Any]:
    """Load a checked ``last.pt`` into the trainer's parts and this rank's RNGs; returns the progress dict."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    restore_rng(rng if "torch" in rng else rng[rank])  # older checkpoints kept one state for all ranks
    return state["progress"]


def load_weights(state: dict[str, Any], path: Path, model: torch.nn.Module) -> None:
    """The parameters of a loaded checkpoint into ``model``; a mismatch is one NmtError naming the file."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise NmtError(f"{path}: parameters do not fit a {state.get('model_kind')} model of this config "
                       f"({str(e).splitlines()[0][:100]}); the checkpoint may be from another run") from None


def load_moments(state: dict[str, Any], path: Path, optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint's per-parameter optimizer state (Adam's moments and step counts) into ``optimizer``.

    The optimizer keeps its own settings (learning rate, betas, eps): those are the new run's.
    """
    if "optimizer" not in state:
        raise NmtError(f"{path} holds no optimizer state (only last.pt does); fine-tune from "
                       "--checkpoint last to keep the optimizer, or leave out --keep-optimizer")
    own = optimizer.state_dict()
    saved = state["optimizer"]["state"]
    if len(saved) > sum(len(group["params"]) for group in own["param_groups"]):
        raise NmtError(f"{path}: its optimizer state covers more parameters than this model has")
    optimizer.load_state_dict({"state": saved, "param_groups": own["param_groups"]})


def average(paths: list[Path]) -> dict[str, Any]:
    """The first checkpoint with its model parameters replaced by the mean over all."""
    states = [load(p) for p in paths]
    kinds = {s.get("model_kind") for s in states}
    if len(kinds) != 1:
        raise NmtError(f"cannot average checkpoints of different model kinds: {sorted(map(str, kinds))}")
    out = {k: v for k, v in states[-1].items() if k not in ("optimizer", "scheduler", "rng", "scaler")}
    model = {}
    for name, value in states[0]["model"].items():
        if value.is_floating_point():
            model[name] = sum(s["model"][name].double() for s in states).div(len(states)).to(value.dtype)
        else:
            model[name] = value
    out["model"] = model
    out["averaged_from"] = [str(p) for p in paths]
    return out


def fingerprint(path: Path) -> dict[str, Any]:
    """The training step and SHA-256 of a checkpoint file: which weights produced a result."""
    # mmap: only the small header entries are read, not the parameters.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {"step": state.get("step"), "sha256": sha256(path)}
