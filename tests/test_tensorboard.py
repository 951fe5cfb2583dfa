"""TensorBoard scalars (train.tensorboard): what the log records, against update step and training time."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from test_cli import one_error_line, run
from test_train import FakeClock, clock, small, spm_model, takes  # noqa: F401  (clock, spm_model: fixtures)

from nmt import config
from nmt.train import Trainer, train


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``directory``: its (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_scalars_against_step_and_training_seconds_survive_a_restart(
        tmp_path: Path, corpus: Path, spm_model: str, clock: FakeClock, monkeypatch) -> None:  # noqa: F811
    takes(monkeypatch, Trainer, "update", 1.0, clock)  # every update takes one second of training time
    run_dir = tmp_path / "run"
    train(small(corpus, spm_model, tensorboard=True, max_steps=8), run_dir, progress_bar=False)
    shutil.copy(run_dir / "last.pt", tmp_path / "step8.pt")
    train(small(corpus, spm_model, tensorboard=True), run_dir, progress_bar=False)
    # Killed after step 16 was written but before its checkpoint: the restart trains 9-16 again.
    shutil.copy(tmp_path / "step8.pt", run_dir / "last.pt")
    train(small(corpus, spm_model, tensorboard=True), run_dir, progress_bar=False)

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["event"] == "train"]
    valid = [r for r in records if r["event"] == "valid"]
    by_step, by_time = scalars(run_dir / "tb"), scalars(run_dir / "tb" / "train_seconds")
    assert by_step["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in logged]
    assert [s for s, _ in by_step["train/loss"]] == [4, 8, 12, 16]  # each step once: the restart replaced 12, 16
    assert by_step["valid/bleu"] == [(r["step"], pytest.approx(r["valid_bleu"])) for r in valid]
    assert [s for s, _ in by_step["valid/bleu"]] == [8, 16]
    assert {"train/nll", "train/lr", "train/tokens_per_s", "valid/loss", "valid/ppl"} <= set(by_step)
    # Against training seconds (validation's 0 seconds of training time left out): one second per update.
    assert by_time["train/loss"] == [(s, v) for s, v in by_step["train/loss"]]
    assert by_time["valid/bleu"] == [(s, v) for s, v in by_step["valid/bleu"]]


def test_without_the_package_training_stops_at_setup_with_one_line(
        tmp_path: Path, corpus: Path, spm_model: str, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    recipe = tmp_path / "recipe.yaml"
    config.save(small(corpus, spm_model, tensorboard=True), recipe)
    line = one_error_line(run("train", str(recipe), "--run", str(tmp_path / "run"), "--no-test", "--no-progress"))
    assert line == 'nmt: error: train.tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'
    assert not (tmp_path / "run" / "log.jsonl").exists()
