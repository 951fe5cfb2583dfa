"""Shared fixtures: a tiny synthetic translation task and a tiny model trained on it once.

The task is word-by-word translation of random sentences over a 16-word lexicon, which
a two-layer model of width 48 learns in a few hundred updates on the CPU.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nmt import config

LEXICON = {
    "one": "eins", "two": "zwei", "three": "drei", "four": "vier", "five": "fünf",
    "red": "rot", "blue": "blau", "green": "grün", "dog": "Hund", "cat": "Katze",
    "house": "Haus", "tree": "Baum", "runs": "läuft", "sleeps": "schläft", "big": "groß",
    "small": "klein",
}

torch.set_num_threads(1)


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = list(LEXICON)
    pairs = []
    for _ in range(n):
        src = [rng.choice(words) for _ in range(rng.randint(2, 7))]
        pairs.append((" ".join(src), " ".join(LEXICON[w] for w in src)))
    return pairs


def write_corpus(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """Write {train,valid,test}.{en,de} under ``root``; returns ``root``."""
    sizes = sizes or {"train": 1500, "valid": 60, "test": 60}
    root.mkdir(parents=True, exist_ok=True)
    for seed, (split, n) in enumerate(sizes.items()):
        pairs = make_pairs(n, seed)
        (root / f"{split}.en").write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
        (root / f"{split}.de").write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    return root


def tiny_recipe(data_dir: Path, **train) -> dict:
    """A recipe dict for a model small enough to train in seconds."""
    return {
        "name": "tiny",
        "data": {"dir": str(data_dir), "src_lang": "en", "tgt_lang": "de", "test": "test", "max_len": 40},
        "tokenizer": {"vocab_size": 300},
        "model": {"kind": "transformer", "d_model": 48, "heads": 4, "ffn": 96, "encoder_layers": 2,
                  "decoder_layers": 2, "dropout": 0.0, "max_positions": 64},
        "train": {"max_tokens": 600, "lr": 3e-3, "warmup_steps": 50, "max_steps": 300,
                  "valid_every": 150, "log_every": 50, "threads": 1, "seed": 3, **train},
        "search": {"beam": 3, "max_len_a": 1.2, "max_len_b": 5},
    }


def small_recipe(corpus: Path, spm: Path, kind: str = "transformer", **train) -> config.Config:
    """The tiny recipe (a Transformer, or a GNMT as small) with a trained run's tokenizer, six updates
    logged one by one, no validation."""
    raw = tiny_recipe(corpus, **{"max_steps": 6, "valid_every": 0, "log_every": 1, **train})
    raw["tokenizer"]["reuse"] = str(spm)
    if kind == "gnmt":
        raw["model"] = {"kind": "gnmt", "embed_dim": 32, "hidden": 48, "max_positions": 64, "dropout": 0.1}
    return config.from_dict(raw)


class LstmCalls(TorchDispatchMode):
    """(op, input dtype, weight dtypes) of every LSTM kernel called: oneDNN's layer on the CPU, cuDNN's
    RNN or the fused cell of PyTorch's own path on CUDA (``aten::lstm`` itself is decomposed before a
    dispatch mode sees it)."""

    OPS = {"aten::mkldnn_rnn_layer", "aten::_cudnn_rnn", "aten::_thnn_fused_lstm_cell"}

    def __init__(self):
        super().__init__()
        self.calls: set[tuple[str, torch.dtype, frozenset[torch.dtype]]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.OPS:
            weights = args[1] if isinstance(args[1], list | tuple) else [args[1]]  # cuDNN: the list of weights
            self.calls.add((name, args[0].dtype, frozenset(w.dtype for w in weights)))
        return func(*args, **(kwargs or {}))

    def dtypes(self) -> set[tuple[torch.dtype, frozenset[torch.dtype]]]:
        """(input dtype, weight dtypes) of the calls, whatever the kernel."""
        return {(inputs, weights) for _, inputs, weights in self.calls}


@pytest.fixture
def nmt_log(caplog):
    """caplog that sees each record of the "nmt" logger once, also after a CLI test stopped the
    logger propagating to caplog's root handler."""
    logger = logging.getLogger("nmt")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


@pytest.fixture(scope="session", autouse=True)
def prepared_cache(tmp_path_factory):
    """Prepared corpora go to the test session's own cache, never to the user's ~/.cache/nmt."""
    patch = pytest.MonkeyPatch()
    patch.setenv("NMT_CACHE", str(tmp_path_factory.mktemp("nmt-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus) -> Path:
    """A run directory with a model that has learned the synthetic task."""
    from nmt.train import train

    run = tmp_path_factory.mktemp("run") / "tiny"
    train(config.from_dict(tiny_recipe(corpus)), run, progress_bar=False)
    return run


def shared_data() -> Path | None:
    """The real corpora, when NMT_DATA points at them (tests that need them skip otherwise)."""
    root = os.environ.get("NMT_DATA")
    if root and (Path(root) / "multi30k" / "train.en").is_file():
        return Path(root)
    return None


def stub_nmt(tmp_path: Path, train_s: float = 0.1, **env: str) -> dict:
    """The environment of a script run against an nmt that only writes down its arguments.

    Each call is a line of tmp_path/calls; --run directories are made, as nmt train makes them.
    `nmt train` also lasts ``train_s`` seconds and writes "start RUN" and "end RUN" to
    tmp_path/calls.timeline, so a test can tell which runs trained at the same time (give runs
    that should overlap long enough to start together on a slow machine).
    """
    stub = tmp_path / "bin" / "nmt"
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\necho "$*" >> "$NMT_CALLS"\nrun=""\n'
                    'for ((i = 1; i <= $#; i++)); do [ "${!i}" = --run ] && j=$((i + 1)) && run=${!j}; done\n'
                    '[ -z "$run" ] || mkdir -p "$run"\n'
                    'if [ "$1" = train ]; then echo "start $run" >> "$NMT_CALLS.timeline"; sleep "$STUB_TRAIN_S";'
                    ' echo "end $run" >> "$NMT_CALLS.timeline"; fi\n')
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "NMT_CALLS": str(tmp_path / "calls"),
            "STUB_TRAIN_S": str(train_s), **env}


def overlapped(tmp_path: Path) -> int:
    """The most runs of a stub_nmt script that trained at the same time."""
    running = most = 0
    for line in (tmp_path / "calls.timeline").read_text().splitlines():
        running += 1 if line.startswith("start ") else -1
        most = max(most, running)
    return most
