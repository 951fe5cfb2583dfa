"""Data-parallel training with torch.distributed: gloo ranks on the CPU, launched by torchrun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe

from nmt import checkpoint, config, distributed
from nmt.errors import NmtError
from nmt.train import train


def recipe(tmp_path: Path, corpus: Path, spm: Path, **train_cfg) -> Path:
    raw = tiny_recipe(corpus, **{"valid_every": 0, "log_every": 1, "threads": 1, **train_cfg})
    raw["tokenizer"]["reuse"] = str(spm)
    path = tmp_path / f"recipe{len(list(tmp_path.glob('recipe*')))}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def nmt(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nmt", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=240, **kwargs)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, corpus: Path, trained_run: Path) -> tuple[Path, Path]:
    """Four updates on 2 ranks (1 batch each), and the same on 1 rank with update_freq 2."""
    tmp = tmp_path_factory.mktemp("ddp")
    spm = trained_run / "spm.model"
    two = nmt("train", str(recipe(tmp, corpus, spm, max_steps=4)), "--run", str(tmp / "two"),
              "--nproc", "2", "--no-test")
    assert two.returncode == 0, two.stderr
    one = recipe(tmp, corpus, spm, max_steps=4, update_freq=2)
    train(config.load_recipe(one), tmp / "one", progress_bar=False)
    return tmp / "two", tmp / "one"


def test_two_ranks_make_the_same_update_as_one_rank_with_both_batches(two_rank_run) -> None:
    two, one = (checkpoint.load(run / "last.pt") for run in two_rank_run)
    assert two["step"] == one["step"] == 4 and two["world_size"] == 2
    largest = max((two["model"][k] - one["model"][k]).abs().max().item() for k in one["model"])
    assert largest < 1e-6


def test_one_voice_and_effective_batch_logged(two_rank_run) -> None:
    two, _ = two_rank_run
    lines = (two / "log.jsonl").read_text().splitlines()
    start = yaml.safe_load(lines[0])
    assert start["world_size"] == 2 and start["effective_batch_tokens"] == 2 * 600
    assert [yaml.safe_load(line)["step"] for line in lines if '"train"' in line] == [1, 2, 3, 4]
    assert len(list(two.glob("*.pt"))) == 2  # best.pt and last.pt, each written once by rank 0


def test_checkpoint_params_stay_fp32(two_rank_run) -> None:
    state = checkpoint.load(two_rank_run[0] / "last.pt")
    assert {v.dtype for v in state["model"].values()} == {torch.float32}


def test_resuming_with_another_number_of_ranks_is_refused(two_rank_run, tmp_path: Path) -> None:
    two, _ = two_rank_run
    cfg = config.load_recipe(two / "config.yaml", ["train.max_steps=6"])
    with pytest.raises(NmtError, match=r"trained on 2 rank\(s\), this job has 1.*--nproc 2"):
        train(cfg, two, progress_bar=False)


def test_resume_on_two_ranks_continues(two_rank_run) -> None:
    two, _ = two_rank_run
    out = nmt("train", str(two), "--set", "train.max_steps=6", "--nproc", "2", "--no-test")
    assert out.returncode == 0, out.stderr
    assert checkpoint.load(two / "last.pt")["step"] == 6


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_dead_rank_ends_the_job_quickly_and_keeps_the_checkpoint(tmp_path: Path, corpus: Path,
                                                                  trained_run: Path) -> None:
    path = recipe(tmp_path, corpus, trained_run / "spm.model", max_steps=100000, valid_every=3, keep_last=0)
    run = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "nmt", "-q", "train", str(path), "--run", str(run),
                            "--nproc", "2", "--no-test"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert (run / "last.pt").exists(), job.stderr.read() if job.poll() is not None else "no checkpoint"
        workers = _children(job.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        _, err = job.communicate(timeout=60)
        assert time.time() - killed < 60
        assert job.returncode != 0
        assert "Traceback" not in err.splitlines()[-1]
        assert "nmt: error:" in err and "failed" in err
    finally:
        if job.poll() is None:
            job.kill()
    assert checkpoint.load(run / "last.pt")["step"] % 3 == 0


def test_taken_rendezvous_port_is_one_clear_error(monkeypatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(port)).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(NmtError, match=rf"could not join the process group at 127.0.0.1:{port}.*port is taken"):
            distributed.setup(timeout_minutes=0.2)


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_bf16_trains_and_saves_fp32(tmp_path: Path, corpus: Path, trained_run: Path, kind: str) -> None:
    path = recipe(tmp_path, corpus, trained_run / "spm.model", max_steps=30, log_every=10, precision="bf16")
    if kind == "gnmt":
        raw = yaml.safe_load(path.read_text())
        raw["model"] = {"kind": "gnmt", "embed_dim": 32, "hidden": 48, "max_positions": 64}
        path.write_text(yaml.safe_dump(raw))
    cfg = config.load_recipe(path)
    train(cfg, tmp_path / "run", progress_bar=False)
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    losses = [yaml.safe_load(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert losses[-1] < losses[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU fp16 is allowed")
def test_fp16_on_the_cpu_is_refused(tmp_path: Path, corpus: Path, trained_run: Path) -> None:
    cfg = config.load_recipe(recipe(tmp_path, corpus, trained_run / "spm.model", precision="fp16"))
    with pytest.raises(NmtError, match="fp16 needs a CUDA GPU.*use bf16"):
        train(cfg, tmp_path / "run", progress_bar=False)
