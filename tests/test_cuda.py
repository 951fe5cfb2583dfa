"""Training on a CUDA GPU: bf16 and fp16 updates train, GNMT's LSTMs run in train.lstm_dtype and never in
fp16, an update never makes the host wait for the GPU, pinned batches arrive unchanged.

The tests marked ``cuda`` skip without a GPU; ``bench/gpu_check.py`` runs them (``pytest -m cuda``) on a
GPU machine. The last test runs on any machine: gpu_check's answer where there is no GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LstmCalls, small_recipe

from nmt.models.gnmt import LSTM_DTYPES
from nmt.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_trainer(tmp_path: Path, corpus: Path, trained_run: Path, kind: str = "transformer", **train_cfg) -> Trainer:
    trainer = Trainer(small_recipe(corpus, trained_run / "spm.model", kind, **train_cfg), tmp_path / "run",
                      progress_bar=False)
    assert trainer.device.type == "cuda"
    return trainer


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_bf16_updates_on_the_gpu_lower_the_loss(tmp_path: Path, corpus: Path, trained_run: Path, kind: str) -> None:
    trainer = gpu_trainer(tmp_path, corpus, trained_run, kind, precision="bf16", warmup_steps=1)
    upd = next(trainer.updates)  # one batch, learned again and again: its loss must fall
    losses = []
    for _ in range(10):
        loss, _, tokens = trainer.update(upd)
        losses.append(loss.item() / tokens)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    params = list(trainer.model.parameters())
    assert all(p.dtype == torch.float32 and p.is_cuda and torch.isfinite(p).all() for p in params)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("lstm_dtype", ["fp32", "bf16"])
def test_gnmt_lstms_under_bf16_autocast_run_in_lstm_dtype_never_fp16(tmp_path: Path, corpus: Path,
                                                                     trained_run: Path, lstm_dtype: str) -> None:
    # cuDNN's RNN under autocast would cast to fp16 whatever the autocast dtype: the LSTMs run outside it.
    trainer = gpu_trainer(tmp_path, corpus, trained_run, "gnmt", precision="bf16", lstm_dtype=lstm_dtype)
    watch = LstmCalls()
    with watch:
        trainer.update(next(trainer.updates))
    dtype = LSTM_DTYPES[lstm_dtype]
    assert watch.calls, "no LSTM kernel was seen"
    assert watch.dtypes() == {(dtype, frozenset({dtype}))}, watch.calls
    lstm_params = [p for m in trainer.model.modules() if isinstance(m, torch.nn.LSTM) for p in m.parameters()]
    assert lstm_params and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lstm_params)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind, precision", [("transformer", "fp32"), ("transformer", "bf16"),
                                             ("gnmt", "fp32"), ("gnmt", "bf16")])
def test_updates_never_make_the_host_wait_for_the_gpu(tmp_path: Path, corpus: Path, trained_run: Path,
                                                      kind: str, precision: str) -> None:
    trainer = gpu_trainer(tmp_path, corpus, trained_run, kind, precision=precision, update_freq=2)
    trainer.update(next(trainer.updates))  # Adam's state is made here
    updates = [next(trainer.updates) for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for upd in updates:
            trainer.update(upd)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
@needs_cuda
def test_pinned_batches_reach_the_gpu_unchanged(tmp_path: Path, corpus: Path, trained_run: Path) -> None:
    trainer = gpu_trainer(tmp_path, corpus, trained_run)
    idx = next(trainer.updates).batches[0]
    host = trainer.batches.collate(idx)
    pinned_by_trainer = trainer.collate(idx)
    assert all(t.is_pinned() for t in (pinned_by_trainer.src, pinned_by_trainer.targets))  # the trainer pins
    pinned = host.pin_memory()
    moved = pinned.to(trainer.device, non_blocking=True)
    torch.cuda.synchronize()
    for name in ("src", "tgt_in", "rows", "targets"):
        assert getattr(pinned, name).is_pinned(), name
        assert getattr(moved, name).is_cuda, name
        assert torch.equal(getattr(moved, name).cpu(), getattr(host, name)), name
    for name in ("src_lens", "tgt_out"):  # packing reads the lengths on the host; the loss reads rows/targets
        assert getattr(moved, name) is getattr(host, name), name


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_fp16_trains_a_few_updates_without_nan(tmp_path: Path, corpus: Path, trained_run: Path, kind: str) -> None:
    trainer = gpu_trainer(tmp_path, corpus, trained_run, kind, precision="fp16", warmup_steps=1)
    losses = []
    for _ in range(8):
        loss, _, tokens = trainer.update(next(trainer.updates))
        losses.append(loss.item() / tokens)
    assert all(math.isfinite(x) for x in losses), losses
    # The loss scaler skips a step whose gradients overflowed; the schedule counts the steps taken.
    assert trainer.scheduler.last_epoch >= 1, f"every step skipped; scale now {trainer.scaler.get_scale()}"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], result.stdout
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert records[-1]["section"] == "env" and records[-1]["cuda"] is False
