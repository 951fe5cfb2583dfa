"""Data-parallel training with torch.distributed: gloo ranks on the CPU, launched by torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing
import yaml
from conftest import tiny_recipe
from faults import fail_above

import nmt.loss as nmt_loss
import nmt.train as training
from nmt import checkpoint, config, distributed
from nmt.errors import NmtError
from nmt.train import train


def recipe(tmp_path: Path, corpus: Path, spm: Path, **train_cfg) -> Path:
    raw = tiny_recipe(corpus, **{"valid_every": 0, "log_every": 1, "threads": 1, **train_cfg})
    raw["tokenizer"]["reuse"] = str(spm)
    path = tmp_path / f"recipe{len(list(tmp_path.glob('recipe*')))}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def nmt(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "nmt", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=240, **kwargs)


def read_log(run: Path) -> list[dict]:
    return [yaml.safe_load(line) for line in (run / "log.jsonl").read_text().splitlines()]


def train_records(run: Path) -> list[dict]:
    return [r for r in read_log(run) if r["event"] == "train"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, corpus: Path, trained_run: Path) -> tuple[Path, Path]:
    """Four updates on 2 ranks (1 batch each), and the same on 1 rank with update_freq 2."""
    tmp = tmp_path_factory.mktemp("ddp")
    spm = trained_run / "spm.model"
    cache = tmp / "cache"  # a cache of its own: what the 2-rank job prepared is all there is in it
    two = nmt("train", str(recipe(tmp, corpus, spm, max_steps=4)), "--run", str(tmp / "two"),
              "--nproc", "2", "--no-test", env={"NMT_CACHE": str(cache)})
    assert two.returncode == 0, two.stderr
    assert train_records(tmp / "two")[0]["step"] == 1 and read_log(tmp / "two")[0]["world_size"] == 2
    # Both ranks trained from one prepared corpus: one directory per split, the arrays mapped by both.
    prepared = sorted(p.name.split("-")[0] for p in (cache / "prepared").iterdir() if p.is_dir())
    assert prepared == ["train.en", "valid.en"]
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


def test_two_ranks_log_the_loss_of_one_rank_with_both_batches(two_rank_run) -> None:
    two, one = (train_records(run)[:4] for run in two_rank_run)  # steps 1 to 4, one record each
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def _rank_that_may_run_out_of_memory(rank: int, recipe: str, run: str, port: int, failing_rank: int,
                                     sentences: int) -> None:
    """One rank of a 2-rank job; rank ``failing_rank`` runs out of memory on batches over ``sentences``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    build_model, built = training.build_model, []

    def build(cfg, vocab_size):
        model = build_model(cfg, vocab_size)
        if rank == failing_rank:
            fail_above(model, sentences)
        built.append(model)
        return model

    training.build_model = build
    train(config.load_recipe(Path(recipe)), Path(run), progress_bar=False)
    torch.save(built[0].state_dict(), Path(run) / f"rank{rank}.params")


def wait_for(job, seconds: float = 240) -> None:
    """Join the processes of ``job``; kill them and fail if they take longer than ``seconds``."""
    deadline = time.time() + seconds
    while not job.join(timeout=1):
        if time.time() > deadline:
            for process in job.processes:
                process.kill()
            pytest.fail("the 2-rank job did not finish")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Under DDP an out-of-memory split needs a micro-batch before the one whose backward pass sums the
# gradients (update_freq >= 2), or the sum after the backward pass (train.overlap: false).
@pytest.mark.parametrize("setting", [{"overlap": False}, {"update_freq": 2}], ids=["no-overlap", "update-freq-2"])
def test_a_rank_that_runs_out_of_memory_splits_its_batches_and_stays_in_step(
        tmp_path: Path, corpus: Path, trained_run: Path, setting: dict) -> None:
    # Adam's eps as in tests/test_train.py: rounding noise must not decide any step.
    spm, steps = trained_run / "spm.model", {"max_steps": 4, "adam_eps": 1e-6, **setting}
    run = tmp_path / "run"
    job = torch.multiprocessing.start_processes(
        _rank_that_may_run_out_of_memory, args=(str(recipe(tmp_path, corpus, spm, **steps)), str(run),
                                                free_port(), 1, 20),
        nprocs=2, join=False, start_method="spawn")
    wait_for(job)
    splits = [r["oom_splits"] for r in train_records(run)]
    assert len(splits) == 4 and sum(splits) >= 3  # rank 1's splits, logged by rank 0
    rank0, rank1 = (torch.load(run / f"rank{r}.params") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # The same updates without a fault: one rank with both ranks' batches of every update.
    one = {**steps, "overlap": True, "update_freq": 2 * steps.get("update_freq", 1)}
    train(config.load_recipe(recipe(tmp_path, corpus, spm, **one)), tmp_path / "one", progress_bar=False)
    unsplit = checkpoint.load(tmp_path / "one" / "last.pt")["model"]
    assert max((rank0[k] - unsplit[k]).abs().max().item() for k in unsplit) < 1e-6


def test_running_out_of_memory_where_ddp_sums_the_gradients_stops_the_job_with_one_line(
        tmp_path: Path, corpus: Path, trained_run: Path) -> None:
    run = tmp_path / "run"
    job = torch.multiprocessing.start_processes(
        _rank_that_may_run_out_of_memory, args=(str(recipe(tmp_path, corpus, trained_run / "spm.model",
                                                           max_steps=4)), str(run), free_port(), 1, 20),
        nprocs=2, join=False, start_method="spawn")
    with pytest.raises(torch.multiprocessing.ProcessRaisedException) as failed:
        wait_for(job)
    message = str(failed.value).strip().splitlines()[-1]
    assert message.startswith("nmt.errors.NmtError: step 1: rank 1 ran out of cpu memory on the update's last "
                              "micro-batch") and "train.overlap: false" in message
    assert not (run / "last.pt").exists()  # nothing was saved at a step that did not happen


def _rank_on_its_own_node(rank: int, recipe: str, runs: list[str], port: int) -> None:
    """One rank of a 2-rank job, each rank on a "node" that has its own directory at the run's path."""
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        train(config.load_recipe(Path(recipe)), Path(runs[rank]), progress_bar=False)
    except NmtError as e:
        Path(runs[rank]).mkdir(parents=True, exist_ok=True)
        (Path(runs[rank]) / "error.txt").write_text(str(e))


def test_nodes_that_do_not_share_the_run_directory_stop_before_training(tmp_path: Path, corpus: Path,
                                                                        trained_run: Path) -> None:
    runs = [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")]
    job = torch.multiprocessing.start_processes(
        _rank_on_its_own_node, args=(str(recipe(tmp_path, corpus, trained_run / "spm.model", max_steps=2)), runs,
                                     free_port()), nprocs=2, join=False, start_method="spawn")
    wait_for(job)
    errors = [(Path(run) / "error.txt").read_text() for run in runs]
    for run, error in zip(runs, errors):  # every rank stops, naming the rank that cannot see
        assert len(error.splitlines()) == 1 and "shared file system" in error
        assert error.startswith(f"rank 1 on {socket.gethostname()} cannot see {run} as rank 0 writes it")
    assert not (Path(runs[0]) / "log.jsonl").exists() and not list(Path(runs[0]).glob(".job-token"))


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


def _shared_dirty_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Shared_Dirty:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _ranks(launcher: int) -> list[int]:
    """The rank processes of an ``nmt train --nproc N`` job: children of its fork server."""
    servers = [pid for pid in _children(launcher)
               if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return [rank for server in servers for rank in _children(server)]


def _job_past_its_first_checkpoint(tmp_path: Path, corpus: Path, trained_run: Path) -> tuple[subprocess.Popen, Path]:
    """A 2-rank ``nmt train`` job (its own session) that has written ``last.pt``, and its run."""
    path = recipe(tmp_path, corpus, trained_run / "spm.model", max_steps=100000, valid_every=3, keep_last=0)
    run = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "nmt", "-q", "train", str(path), "--run", str(run),
                            "--nproc", "2", "--no-test"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    if not (run / "last.pt").exists():
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail(job.stderr.read() if job.poll() is not None else "no checkpoint")
    return job, run


def test_a_dead_rank_ends_the_job_quickly_and_keeps_the_checkpoint(tmp_path: Path, corpus: Path,
                                                                  trained_run: Path) -> None:
    job, run = _job_past_its_first_checkpoint(tmp_path, corpus, trained_run)
    try:
        deadline = time.time() + 30
        while len(workers := _ranks(job.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(workers) == 2
        # Forked from a server that imported PyTorch: the memory that import wrote is shared by
        # the ranks (about 140 MB, which each rank would hold alone if it imported torch itself).
        assert all(_shared_dirty_mb(pid) > 60 for pid in workers)
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        _, err = job.communicate(timeout=60)
        assert time.time() - killed < 60
        assert job.returncode != 0
        assert "Traceback" not in err.splitlines()[-1]
        assert "nmt: error:" in err and "failed" in err
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert checkpoint.load(run / "last.pt")["step"] % 3 == 0


def test_ctrl_c_stops_every_rank_after_its_update_and_saves_there(tmp_path: Path, corpus: Path,
                                                                  trained_run: Path) -> None:
    job, run = _job_past_its_first_checkpoint(tmp_path, corpus, trained_run)
    try:
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        _, err = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130 and err.splitlines()[-1] == "nmt: interrupted", err
    assert "Traceback" not in err and "death signal" not in err, err
    # One signal per rank: both stopped between updates, at the same step, and it was saved.
    stopped = {int(line.split("interrupted at step ")[1].split(";")[0]) for line in err.splitlines()
               if "interrupted at step" in line}
    assert len(stopped) == 1, err
    assert checkpoint.load(run / "last.pt")["step"] == stopped.pop()


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
def test_bf16_trains_and_saves_fp32(tmp_path: Path, corpus: Path, trained_run: Path, kind: str,
                                   monkeypatch) -> None:
    path = recipe(tmp_path, corpus, trained_run / "spm.model", max_steps=30, log_every=10, precision="bf16")
    if kind == "gnmt":
        raw = yaml.safe_load(path.read_text())
        raw["model"] = {"kind": "gnmt", "embed_dim": 32, "hidden": 48, "max_positions": 64}
        path.write_text(yaml.safe_dump(raw))
    cfg = config.load_recipe(path)
    dtypes = set()
    loss = nmt_loss.chunk_loss
    monkeypatch.setattr(nmt_loss, "chunk_loss",
                        lambda logits, *args: dtypes.add(logits.dtype) or loss(logits, *args))
    train(cfg, tmp_path / "run", progress_bar=False)
    assert dtypes == {torch.bfloat16}  # the model really ran in bf16
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


# --- validation split across ranks

SLOW_PREPARATION_S = 8  # longer than the recipe's train.dist_timeout_minutes below


def _validate_on_rank(rank: int, recipe: str, run: str, port: int, weights: str, ready) -> None:
    """One rank of a 2-rank job whose rank 0 prepares slowly, then validates the weights of ``weights``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = config.load_recipe(Path(recipe))
    run_tokenizer, translate_text, translated = training.run_tokenizer, training.translate_text, []

    def slow_tokenizer(*args, **kwargs):
        time.sleep(SLOW_PREPARATION_S)  # a big corpus being prepared while the other rank waits
        return run_tokenizer(*args, **kwargs)

    def counting(model, tokenizer, lines, search):
        translated.append(len(lines))
        return translate_text(model, tokenizer, lines, search)

    training.run_tokenizer, training.translate_text = slow_tokenizer, counting
    ready.wait(timeout=120)  # both started: joining the group takes less than its short timeout
    ctx = distributed.setup(cfg.train.dist_timeout_minutes)
    try:
        trainer = training.Trainer(cfg, Path(run), progress_bar=False, ctx=ctx)
        trainer.model.load_state_dict(checkpoint.load(Path(weights))["model"])
        result = trainer.validate()
        (Path(run) / f"rank{rank}.json").write_text(json.dumps({"result": result, "translated": translated}))
    finally:
        distributed.teardown()


@pytest.fixture(scope="module")
def validated_on_two_ranks(tmp_path_factory, corpus: Path, trained_run: Path) -> tuple[list[dict], dict]:
    """Valid results of trained_run's best.pt on 2 ranks (one file per rank) and on 1 rank."""
    tmp = tmp_path_factory.mktemp("valid")
    path = recipe(tmp, corpus, trained_run / "spm.model", dist_timeout_minutes=SLOW_PREPARATION_S / 60 / 2)
    run, weights = tmp / "two", str(trained_run / "best.pt")
    ready = torch.multiprocessing.get_context("spawn").Barrier(2)
    job = torch.multiprocessing.start_processes(_validate_on_rank, nprocs=2, join=False, start_method="spawn",
                                                args=(str(path), str(run), free_port(), weights, ready))
    wait_for(job)
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    trainer = training.Trainer(config.load_recipe(path), tmp / "one", progress_bar=False)
    trainer.model.load_state_dict(checkpoint.load(Path(weights))["model"])
    return ranks, trainer.validate()


def test_a_preparation_longer_than_the_collective_timeout_is_waited_for(validated_on_two_ranks) -> None:
    ranks, _ = validated_on_two_ranks  # the job finished although rank 1 waited past dist_timeout_minutes
    assert ranks[0]["result"] is not None and ranks[1]["result"] is None  # rank 0 scores


def test_two_ranks_translate_half_the_valid_set_each_and_score_the_bleu_of_one(validated_on_two_ranks,
                                                                              corpus: Path) -> None:
    ranks, one = validated_on_two_ranks
    shares = [sum(r["translated"]) for r in ranks]
    assert shares == [30, 30] and sum(shares) == len((corpus / "valid.en").read_text().splitlines())
    two = ranks[0]["result"]
    assert two["valid_bleu"] == one["valid_bleu"] and two["valid_bleu_signature"] == one["valid_bleu_signature"]
    assert two["valid_loss"] == pytest.approx(one["valid_loss"], rel=1e-6)
    assert two["valid_ppl"] == pytest.approx(one["valid_ppl"], rel=1e-6)
