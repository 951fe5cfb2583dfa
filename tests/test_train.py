"""Training: a tiny model learns, resume is exact, bad runs and checkpoints are refused clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_recipe
from faults import fail_above

import nmt.data
from nmt import checkpoint, config, distributed, rundir
from nmt import prepare as prep
from nmt.batching import ORDER_VERSION, Batch
from nmt.corpus import PreparedCorpus
from nmt.data import read_lines
from nmt.errors import NmtError
from nmt.metrics import bleu
from nmt.train import Trainer, train
from nmt.translate import translate_text

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_tiny_model_learns_the_task(trained_run: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    valid = [r for r in records if r["event"] == "valid"]
    assert losses[-1] < losses[0] / 3
    assert valid[-1]["valid_bleu"] > 30
    for name in ("config.yaml", "spm.model", "best.pt", "last.pt"):
        assert (trained_run / name).is_file()


def test_log_opens_with_the_batch_and_closes_with_both_clocks(trained_run: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    start, end = records[0], records[-1]
    assert start["event"] == "start" and start["effective_batch_tokens"] == 600
    assert end["event"] == "end" and end["train_seconds"] > 0 and end["valid_seconds"] > 0
    train_records = [r for r in records if r["event"] == "train"]
    assert all(r["tokens_per_s"] > 0 and r["oom_splits"] == 0 for r in train_records)


def test_checkpoints_are_self_describing(trained_run: Path) -> None:
    state = checkpoint.load(trained_run / "last.pt")
    assert state["model_kind"] == "transformer"
    assert state["step"] == 300
    assert config.from_dict(state["config"]).model.d_model == 48
    assert len(state["tokenizer_sha256"]) == 64


@pytest.fixture
def spm_model(trained_run: Path) -> str:
    return str(trained_run / "spm.model")


def small(corpus: Path, spm_model: str, **train_cfg) -> config.Config:
    raw = tiny_recipe(corpus, **{"max_steps": 16, "valid_every": 8, "log_every": 4, **train_cfg})
    raw["model"]["dropout"] = 0.2  # dropout draws random numbers: resume must restore the RNG
    raw["tokenizer"]["reuse"] = spm_model
    raw["train"]["update_freq"] = 2
    return config.from_dict(raw)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --- the training clock

class FakeClock:
    """Stands in for ``time.perf_counter`` in the trainer: time passes only where a test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("nmt.train.time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def takes(monkeypatch, owner, name: str, seconds: float, clock: FakeClock) -> None:
    """Make ``owner.name`` take ``seconds`` of the fake clock."""
    original = getattr(owner, name)

    def slow(*args, **kwargs):
        out = original(*args, **kwargs)
        clock.now += seconds
        return out

    monkeypatch.setattr(owner, name, slow)


def test_validation_time_is_kept_apart_from_training_time(tmp_path: Path, corpus: Path, spm_model: str,
                                                          clock: FakeClock, monkeypatch) -> None:
    takes(monkeypatch, Trainer, "update", 1.0, clock)
    takes(monkeypatch, Trainer, "validate", 100.0, clock)
    train(small(corpus, spm_model), tmp_path / "run", progress_bar=False)  # 16 updates, validated at 8 and 16
    records = read_log(tmp_path / "run")
    assert [r["valid_seconds"] for r in records if r["event"] == "valid"] == pytest.approx([100, 200])
    assert [r["train_seconds"] for r in records if r["event"] == "train"] == pytest.approx([4, 8, 12, 16])
    assert records[-1]["train_seconds"] == pytest.approx(16) and records[-1]["valid_seconds"] == pytest.approx(200)


def test_waiting_for_the_device_counts_as_training_time(tmp_path: Path, corpus: Path, spm_model: str,
                                                        clock: FakeClock, monkeypatch) -> None:
    """On a GPU an update's work is queued: the host waits for it later, outside ``update()``."""
    takes(monkeypatch, Trainer, "update", 1.0, clock)
    # Under DDP the per-update all-reduce is where the host waits for the previous update's work.
    takes(monkeypatch, distributed, "all_sum", 0.5, clock)
    # What is still queued when validation starts belongs to training, not to validation.
    takes(monkeypatch, distributed, "synchronize", 0.25, clock)
    takes(monkeypatch, Trainer, "validate", 100.0, clock)
    train(small(corpus, spm_model), tmp_path / "run", progress_bar=False)
    end = read_log(tmp_path / "run")[-1]
    assert end["train_seconds"] >= 16 * (1 + 0.5) + 2 * 0.25
    assert end["valid_seconds"] == pytest.approx(200)


# --- resume

def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    train(small(corpus, spm_model), tmp_path / "straight", progress_bar=False)
    train(small(corpus, spm_model, max_steps=8), tmp_path / "resumed", progress_bar=False)
    train(small(corpus, spm_model), tmp_path / "resumed", progress_bar=False)
    a = checkpoint.load(tmp_path / "straight" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 16
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps.count(16) >= 1 and steps == sorted(steps)


def test_resume_drops_a_cut_off_last_log_line_and_refuses_a_damaged_one(tmp_path: Path, corpus: Path,
                                                                        spm_model: str) -> None:
    run = tmp_path / "run"
    train(small(corpus, spm_model, max_steps=8), run, progress_bar=False)
    log = run / "log.jsonl"
    with log.open("a", encoding="utf-8") as f:
        f.write('{"event": "train", "step": 9, "lo')  # killed mid-write
    train(small(corpus, spm_model, max_steps=12), run, progress_bar=False)
    records = read_log(run)  # every line a record again: the cut-off line is gone
    assert records[-1]["event"] == "end" and records[-1]["step"] == 12

    lines = log.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-5]  # a damaged line in the middle
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(NmtError, match=rf"{log}:3: not a JSON record"):
        train(small(corpus, spm_model, max_steps=16), run, progress_bar=False)
    assert log.read_text(encoding="utf-8").splitlines() == lines  # nothing deleted
    assert checkpoint.load(run / "last.pt")["step"] == 12


def test_interrupted_run_saves_and_resumes(tmp_path: Path, corpus: Path, spm_model: str, monkeypatch) -> None:
    run = tmp_path / "run"
    original = Trainer.update

    def update_then_interrupt(self, group, total_tokens=None):
        out = original(self, group, total_tokens)
        if self.state.step == 4:  # the update in flight finishes; the signal stops the next one
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "update", update_then_interrupt)
    with pytest.raises(NmtError, match="interrupted at step 5;.*run the same command to resume"):
        train(small(corpus, spm_model), run, progress_bar=False)
    assert checkpoint.load(run / "last.pt")["step"] == 5
    monkeypatch.setattr(Trainer, "update", original)
    assert train(small(corpus, spm_model), run, progress_bar=False).step == 16


def test_a_resume_records_its_machine_and_warns_when_it_differs(tmp_path: Path, corpus: Path, spm_model: str,
                                                                monkeypatch, nmt_log) -> None:
    import nmt.train as trainer_module
    from nmt import report

    run = tmp_path / "run"
    train(small(corpus, spm_model, max_steps=2, valid_every=0), run, progress_bar=False)
    here = trainer_module.hardware(torch.device("cpu"))
    elsewhere = {**here, "cpu_kind": "family 1 model 1, DEFAULT"}
    monkeypatch.setattr(trainer_module, "hardware", lambda device: elsewhere)
    with nmt_log.at_level("WARNING", logger="nmt"):
        train(small(corpus, spm_model, max_steps=4, valid_every=0), run, progress_bar=False)
    resume = next(r for r in read_log(run) if r["event"] == "resume")
    assert resume["step"] == 2 and resume["cpu_kind"] == "family 1 model 1, DEFAULT"
    assert "resumed on" in nmt_log.text and "mixes two machines" in nmt_log.text
    assert report.summarize(run).moved_to.endswith("[family 1 model 1, DEFAULT]")
    with pytest.raises(NmtError, match="was resumed on .*mixes their speeds"):
        report.compare([run])


def test_changed_config_refuses_to_resume(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    run = tmp_path / "run"
    train(small(corpus, spm_model, max_steps=2, valid_every=0), run, progress_bar=False)
    changed = small(corpus, spm_model, max_steps=4)
    changed.model.d_model = 64
    with pytest.raises(NmtError, match=r"model.d_model=48.*new --run directory"):
        train(changed, run, progress_bar=False)
    # A limit is not part of what was trained: raising it continues the run.
    assert train(small(corpus, spm_model, max_steps=4, valid_every=0), run, progress_bar=False).step == 4
    # Once the run holds its own copy of the tokenizer, where it first came from does not matter.
    moved = small(corpus, spm_model, max_steps=6, valid_every=0)
    moved.tokenizer.reuse = None
    assert train(moved, run, progress_bar=False).step == 6


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    run = tmp_path / "run"
    train(small(corpus, spm_model, max_steps=2, valid_every=0), run, progress_bar=False)
    for path in run.glob("*.pt"):  # a finished run kept as its records only
        path.unlink()
    log = (run / "log.jsonl").read_text()
    with pytest.raises(NmtError, match=rf"{run} holds a run that finished at step 2 and has no last.pt.*new --run"):
        train(small(corpus, spm_model, max_steps=4, valid_every=0), run, progress_bar=False)
    assert (run / "log.jsonl").read_text() == log


def test_a_stopped_run_whose_last_pt_was_lost_is_not_overwritten(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    run = tmp_path / "run"
    train(small(corpus, spm_model, max_steps=4, valid_every=2), run, progress_bar=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # Stopped by a signal after validating (no end record), then moved without its git-ignored checkpoints.
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r.get("event") != "end"))
    for path in run.glob("*.pt"):
        path.unlink()
    log = (run / "log.jsonl").read_text()
    with pytest.raises(NmtError, match=rf"{run} holds a run that was logged to step 4, saved at 4 .*last.pt back"):
        train(small(corpus, spm_model, max_steps=8, valid_every=2), run, progress_bar=False)
    assert (run / "log.jsonl").read_text() == log


def test_a_start_that_saved_nothing_is_started_over(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    run = tmp_path / "run"
    train(small(corpus, spm_model, max_steps=2, valid_every=0), run, progress_bar=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # As if it had crashed after logging, before its first checkpoint: no last.pt, no validation, no end.
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records
                                           if r.get("event") not in ("valid", "end")))
    for path in run.glob("*.pt"):
        path.unlink()
    train(small(corpus, spm_model, max_steps=2, valid_every=0), run, progress_bar=False)
    again = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in again].count("start") == 1
    assert [r.get("event") for r in again] == [r.get("event") for r in records]


def test_training_maps_the_prepared_corpus_and_resume_encodes_nothing(tmp_path: Path, corpus: Path, spm_model: str,
                                                                      monkeypatch) -> None:
    run = tmp_path / "run"
    trainer = Trainer(small(corpus, spm_model, max_steps=2, valid_every=0), run, progress_bar=False)
    assert isinstance(trainer.train_data, PreparedCorpus)
    assert isinstance(trainer.train_data.src.tokens, np.memmap)  # mapped, not read into memory
    trainer.train()
    trainer.save("last.pt", full=True)

    def fail(*args, **kwargs):
        raise AssertionError("a resumed run encoded its corpus again")

    monkeypatch.setattr(prep, "_encode_into", fail)
    monkeypatch.setattr(prep, "train_tokenizer", fail)
    monkeypatch.setattr(nmt.data, "load_parallel", fail)
    assert train(small(corpus, spm_model, max_steps=4, valid_every=0), run, progress_bar=False).step == 4


def test_checkpoint_of_another_batch_order_version_is_refused(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    run = tmp_path / "run"
    train(small(corpus, spm_model, max_steps=2, valid_every=0), run, progress_bar=False)
    state = checkpoint.load(run / "last.pt")
    assert state["data_format"] == ORDER_VERSION
    state["data_format"] = ORDER_VERSION + 1
    checkpoint.save(state, run / "last.pt")
    with pytest.raises(NmtError, match=rf"last.pt was trained with batch order version {ORDER_VERSION + 1}, "
                                       rf"this nmt makes version {ORDER_VERSION}.*new --run directory"):
        train(small(corpus, spm_model, max_steps=4, valid_every=0), run, progress_bar=False)


def test_valid_bleu_on_the_first_sentences_of_valid(tmp_path: Path, corpus: Path, trained_run: Path) -> None:
    cfg = config.from_dict(tiny_recipe(corpus, valid_max_sentences=12))
    cfg.tokenizer.reuse = str(trained_run / "spm.model")
    trainer = Trainer(cfg, tmp_path / "run", progress_bar=False)
    trainer.model.load_state_dict(checkpoint.load(trained_run / "best.pt")["model"])
    src, ref = read_lines(corpus / "valid.en"), read_lines(corpus / "valid.de")
    search = replace(cfg.search, beam=cfg.train.valid_beam)
    expected = bleu(translate_text(trainer.model, trainer.tokenizer, src[:12], search), ref[:12]).score
    result = trainer.validate()
    assert result["valid_bleu"] == expected
    full = bleu(translate_text(trainer.model, trainer.tokenizer, src, search), ref).score
    assert full != expected  # the bound made a difference
    # A bound of another size trains on: it changes what is measured, not what is trained.
    assert "train.valid_max_sentences" in config.RESUMABLE_CHANGES


def test_resume_from_a_checkpoint_with_one_rng_state(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    """Checkpoints written before the RNG was kept per rank hold a single generator state."""
    run = tmp_path / "run"
    train(small(corpus, spm_model, max_steps=2, valid_every=0), run, progress_bar=False)
    state = checkpoint.load(run / "last.pt")
    state["rng"] = state["rng"][0]
    checkpoint.save(state, run / "last.pt")
    assert train(small(corpus, spm_model, max_steps=4, valid_every=0), run, progress_bar=False).step == 4


def test_averaging_last_checkpoints(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    run = tmp_path / "run"
    train(small(corpus, spm_model, valid_every=4, keep_last=3, average_last=3), run, progress_bar=False)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step*.pt"))
    assert kept == ["step12.pt", "step16.pt", "step8.pt"]
    averaged = checkpoint.load(run / "averaged.pt")["model"]
    parts = [checkpoint.load(run / "checkpoints" / n)["model"] for n in kept]
    name = "embed.weight"
    assert torch.allclose(averaged[name], sum(p[name] for p in parts) / 3, atol=1e-6)


def test_average_needs_a_count_of_at_least_two(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    run = tmp_path / "run"
    train(small(corpus, spm_model, valid_every=4, keep_last=3), run, progress_bar=False)
    for count in ("0", "-1", "1"):
        result = CliRunner().invoke(app, ["average", str(run), "--last", count])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.stderr.strip().splitlines() == [f"nmt: error: --last {count}: give the number of step "
                                                      "checkpoints to average, at least 2"]
    assert not (run / "averaged.pt").exists()
    result = CliRunner().invoke(app, ["average", str(run), "--last", "2"])
    assert result.exit_code == 0 and result.stdout.endswith("mean of step12.pt, step16.pt\n")


# --- bad checkpoints

def test_truncated_checkpoint(tmp_path: Path, trained_run: Path) -> None:
    data = (trained_run / "best.pt").read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(NmtError, match="cut.pt: truncated or corrupt checkpoint"):
        checkpoint.load(bad)


def test_garbage_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "noise.pt"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(NmtError, match="noise.pt: truncated or corrupt"):
        checkpoint.load(bad)


def test_foreign_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, foreign)
    with pytest.raises(NmtError, match="other.pt: not an nmt checkpoint"):
        checkpoint.load(foreign)


def test_tokenizer_that_does_not_match_checkpoint(tmp_path: Path, trained_run: Path, corpus: Path) -> None:
    from nmt.data import read_lines
    from nmt.tokenizer import train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lines = read_lines(corpus / "train.en") + read_lines(corpus / "train.de")
    train_tokenizer(lines, run, vocab_size=296)  # a different spm.model in the run
    with pytest.raises(NmtError, match="another SentencePiece model"):
        rundir.load_run(run)


def test_atomic_save_leaves_no_temp_file_on_failure(tmp_path: Path) -> None:
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    checkpoint.save({"model": {}}, tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(RuntimeError):
        checkpoint.save({"model": Unpicklable()}, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --- GNMT through the same trainer

def test_gnmt_learns_the_task_with_the_same_trainer(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    raw = tiny_recipe(corpus)
    raw["model"] = {"kind": "gnmt", "embed_dim": 48, "hidden": 64, "encoder_layers": 2, "decoder_layers": 2,
                    "dropout": 0.0, "max_positions": 64}
    raw["tokenizer"]["reuse"] = spm_model
    train(config.from_dict(raw), tmp_path / "gnmt", progress_bar=False)
    records = [json.loads(line) for line in (tmp_path / "gnmt" / "log.jsonl").read_text().splitlines()]
    # On random word strings an LSTM needs longer than a Transformer to find the alignment,
    # so this asks for clear learning, not a finished model.
    losses = [r["loss"] for r in records if r["event"] == "train"]
    valid = [r["valid_loss"] for r in records if r["event"] == "valid"]
    assert losses[-1] < losses[0] / 1.8 and valid[-1] < valid[0]
    assert checkpoint.load(tmp_path / "gnmt" / "best.pt")["model_kind"] == "gnmt"


def test_resuming_a_run_as_the_other_model_kind_is_refused(tmp_path: Path, trained_run: Path, corpus: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    raw = tiny_recipe(corpus)
    raw["model"] = {"kind": "gnmt"}
    with pytest.raises(NmtError, match=r"trained with model.kind='transformer'.*new --run directory"):
        train(config.from_dict(raw), run, progress_bar=False)


def test_checkpoint_of_one_kind_loaded_as_the_other(tmp_path: Path, trained_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state = checkpoint.load(run / "best.pt")
    state["config"]["model"] = vars(config.GNMTConfig())
    state["model_kind"] = "gnmt"
    checkpoint.save(state, run / "best.pt")
    with pytest.raises(NmtError, match="parameters do not fit a gnmt model"):
        rundir.load_run(run)


def test_early_stop_after_patience_validations_without_gain(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    # A learning rate too small to change any translation: BLEU cannot improve.
    cfg = small(corpus, spm_model, lr=1e-9, max_steps=100, valid_every=2, patience=2, keep_last=0)
    progress = train(cfg, tmp_path / "run", progress_bar=False)
    assert progress.step == 6  # the first validation sets the best; two more without gain stop it
    end = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert "train.patience" in end["reason"]


def test_epoch_limit(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    cfg = small(corpus, spm_model, max_steps=0, max_epochs=1, valid_every=0)
    trainer = Trainer(cfg, tmp_path / "run", progress_bar=False)
    per_epoch = -(-len(trainer.batches.epoch(1)) // cfg.train.update_freq)
    assert trainer.train().step == per_epoch


# --- out of memory on a long batch

def deterministic(corpus: Path, spm_model: str) -> config.Config:
    """A recipe whose update does not depend on how a batch is cut into pieces."""
    cfg = small(corpus, spm_model)  # update_freq 2
    cfg.model.dropout = 0.0  # a split batch draws dropout masks in another order
    # The attention key biases have a gradient of exactly zero in exact arithmetic (softmax
    # ignores a shift shared by all keys); in floats it is rounding noise, which Adam with a
    # tiny eps turns into full-size steps whose sign depends on the summation order.
    cfg.train.adam_eps = 1e-6
    return cfg


def parameters_after_updates(trainer: Trainer, updates: int) -> dict[str, torch.Tensor]:
    for _ in range(updates):
        trainer.update(next(trainer.updates))
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_batch_that_runs_out_of_memory_is_split_into_the_same_update(
        tmp_path: Path, corpus: Path, spm_model: str, phase: str) -> None:
    cfg = deterministic(corpus, spm_model)
    expected = parameters_after_updates(Trainer(cfg, tmp_path / "clean", progress_bar=False), 3)
    trainer = Trainer(cfg, tmp_path / "faulty", progress_bar=False)
    largest = max(len(idx) for idx in trainer.batches.epoch(1)[:6])
    faults = fail_above(trainer.model, largest // 3, phase)  # the largest batches split twice
    got = parameters_after_updates(trainer, 3)
    assert faults["failures"] > 0 and trainer.oom_splits >= faults["failures"]
    for name, value in expected.items():
        assert (got[name] - value).abs().max().item() < 1e-6, name


def test_one_sentence_that_does_not_fit_is_a_clear_error(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    trainer = Trainer(deterministic(corpus, spm_model), tmp_path / "run", progress_bar=False)
    fail_above(trainer.model, 0)
    with pytest.raises(NmtError, match=r"step 1: one sentence pair \(\d+ source, \d+ target tokens\) does "
                                       r"not fit in cpu memory on its own; lower data.max_len"):
        trainer.update(next(trainer.updates))


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    trainer = Trainer(deterministic(corpus, spm_model), tmp_path / "run", progress_bar=False)

    def broken(src, src_lens):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (7x48 and 64x48)")

    trainer.model.encode = broken
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        trainer.update(next(trainer.updates))
    assert trainer.oom_splits == 0


# --- bench/train_speed.py

@pytest.fixture
def train_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import train_speed
    return train_speed


def test_bench_counts_the_devices_queued_work_and_runs_on_its_device(
        tmp_path: Path, corpus: Path, spm_model: str, train_speed, monkeypatch) -> None:
    trainer = Trainer(small(corpus, spm_model), tmp_path / "run", progress_bar=False)
    fake = FakeClock()
    monkeypatch.setattr(train_speed, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    takes(monkeypatch, distributed, "synchronize", 5.0, fake)  # the wait for queued device work
    tokens, seconds = train_speed.timed_window(trainer, steps=2)
    assert tokens > 0 and seconds >= 5.0

    moved = []
    to = Batch.to
    monkeypatch.setattr(Batch, "to", lambda batch, device: moved.append(device) or to(batch, device))
    assert train_speed.flops_per_token(trainer) > 0
    assert moved == [trainer.device]


def test_bench_train_speed_prints_its_figures(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(corpus)), encoding="utf-8")
    out = subprocess.run([sys.executable, str(BENCH / "train_speed.py"), str(recipe), "--spm", spm_model,
                          "--windows", "1", "--steps", "2", "--warmup", "1"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "median:" in out.stdout and "target tokens/s" in out.stdout and "utilisation:" in out.stdout


def test_bench_memory_trace_counts_the_processes_a_command_starts() -> None:
    # A parent that holds little starts a child that fills 200 MB: the peak is the child's.
    child = "import numpy, time; a = numpy.ones(25_000_000); time.sleep(1.5)"
    parent = f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', {child!r}]).returncode)"
    out = subprocess.run([sys.executable, str(BENCH / "memory_trace.py"), "--every", "0.1", "--",
                          sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    peak = float(out.stderr.split("peak summed anonymous ")[1].split(" MiB")[0].replace(",", ""))
    assert 190 < peak < 400, out.stderr
    assert out.stderr.count("  pid ") == 2, out.stderr  # parent and child at the peak
