"""Training: a tiny model learns, resume is exact, bad runs and checkpoints are refused clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe

from nmt import checkpoint, config
from nmt.errors import NmtError
from nmt.train import Trainer, train


def test_tiny_model_learns_the_task(trained_run: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    valid = [r for r in records if r["event"] == "valid"]
    assert losses[-1] < losses[0] / 3
    assert valid[-1]["valid_bleu"] > 30
    for name in ("config.yaml", "spm.model", "best.pt", "last.pt"):
        assert (trained_run / name).is_file()


def test_log_keeps_training_and_validation_time_apart(trained_run: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    start, end = records[0], records[-1]
    assert start["event"] == "start" and start["effective_batch_tokens"] == 600
    assert end["event"] == "end" and end["train_seconds"] > 0 and end["valid_seconds"] > 0
    train_records = [r for r in records if r["event"] == "train"]
    assert all(r["tokens_per_s"] > 0 for r in train_records)
    assert [r["train_seconds"] for r in train_records] == sorted(r["train_seconds"] for r in train_records)


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
        checkpoint.load_run(run)


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
        checkpoint.load_run(run)


def test_early_stop_after_patience_validations_without_gain(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    cfg = small(corpus, spm_model, lr=0.0, max_steps=100, valid_every=2, patience=2, keep_last=0)
    progress = train(cfg, tmp_path / "run", progress_bar=False)
    assert progress.step == 6  # the first validation sets the best; two more without gain stop it
    end = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert "train.patience" in end["reason"]


def test_epoch_limit(tmp_path: Path, corpus: Path, spm_model: str) -> None:
    cfg = small(corpus, spm_model, max_steps=0, max_epochs=1, valid_every=0)
    trainer = Trainer(cfg, tmp_path / "run", progress_bar=False)
    per_epoch = -(-len(trainer.batches.epoch(1)) // cfg.train.update_freq)
    assert trainer.train().step == per_epoch
