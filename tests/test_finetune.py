"""Fine-tuning (nmt train --init-from): a run that starts from another run's weights and tokenizer.

The parent is the session's tiny model, trained on word-by-word translation (corpus A); the
child is fine-tuned on corpus B, the same words with the target in reverse order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe, write_corpus
from test_cli import one_error_line, run

from nmt import checkpoint, config, report
from nmt.errors import NmtError
from nmt.rundir import fine_tune
from nmt.rundir import open_run as prepare_run
from nmt.train import Trainer


@pytest.fixture(scope="module")
def corpus_b(tmp_path_factory) -> Path:
    root = write_corpus(tmp_path_factory.mktemp("corpus-b"), {"train": 400, "valid": 40, "test": 10})
    for split in ("train", "valid", "test"):
        path = root / f"{split}.de"
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text("".join(" ".join(reversed(line.split())) + "\n" for line in lines), encoding="utf-8")
    return root


def recipe_b(corpus_b: Path, tmp_path: Path, model: dict | None = None, tokenizer: dict | None = None,
             **train) -> Path:
    """A recipe file for corpus B with the parent's shape (but its dropout), unless ``model`` changes it.

    A ``model`` with a ``kind`` replaces the section.
    """
    raw = tiny_recipe(corpus_b, **{"max_steps": 20, "valid_every": 10, "log_every": 5, "warmup_steps": 5,
                                   "valid_max_sentences": 10, **train})
    raw["model"] = model if model and "kind" in model else {**raw["model"], "dropout": 0.1, **(model or {})}
    raw["tokenizer"].update(tokenizer or {})
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def train_child(recipe: Path, child: Path, *more: str):
    return run("train", str(recipe), "--run", str(child), "--no-test", "--no-progress", *more)


def file_hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def valid_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "valid"]


def test_fine_tuned_run_starts_from_the_parent_and_learns_the_new_corpus(
        trained_run: Path, corpus_b: Path, tmp_path: Path) -> None:
    before = file_hashes(trained_run)
    recipe = recipe_b(corpus_b, tmp_path)
    # The parent's own valid loss on corpus B: a trainer set up as the child, before any update.
    cfg, _ = prepare_run(fine_tune(config.load_recipe(recipe), trained_run), tmp_path / "probe")
    probe = Trainer(cfg, tmp_path / "probe", progress_bar=False)
    probe.start_from(cfg.init_from)
    parent_loss = probe.validate()["valid_loss"]

    child = tmp_path / "child"
    result = train_child(recipe, child, "--init-from", str(trained_run))
    assert result.exit_code == 0, result.output
    valid = valid_records(child)
    assert [r["step"] for r in valid] == [10, 20]  # the step count started at 0
    assert valid[-1]["valid_loss"] < parent_loss

    assert (child / "spm.model").read_bytes() == (trained_run / "spm.model").read_bytes()
    recorded = yaml.safe_load((child / "config.yaml").read_text())["init_from"]
    assert recorded == {"run": str(trained_run), "checkpoint": "best", "keep_optimizer": False,
                        "step": 300, "sha256": checkpoint.fingerprint(trained_run / "best.pt")["sha256"]}
    row = report.summarize(child)
    assert row.init_from == f"{trained_run} best.pt step 300"
    assert f"| {child.name} (fine-tuned) |" in report.render([row], "md")
    assert file_hashes(trained_run) == before  # the parent is only read


def test_resuming_a_fine_tuned_run_continues_it(trained_run: Path, corpus_b: Path, tmp_path: Path) -> None:
    recipe = recipe_b(corpus_b, tmp_path)
    assert train_child(recipe, tmp_path / "straight", "--init-from", str(trained_run)).exit_code == 0
    short = recipe_b(corpus_b, tmp_path, max_steps=10)
    assert train_child(short, tmp_path / "resumed", "--init-from", str(trained_run)).exit_code == 0
    # Resumed from its own directory: a re-initialisation from the parent would not land on the same weights.
    result = run("train", str(tmp_path / "resumed"), "--set", "train.max_steps=20", "--no-test", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in valid_records(tmp_path / "resumed")] == [10, 20]
    straight = checkpoint.load(tmp_path / "straight" / "last.pt")["model"]
    resumed = checkpoint.load(tmp_path / "resumed" / "last.pt")["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    recorded = yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["init_from"]
    assert recorded["run"] == str(trained_run) and recorded["step"] == 300


GNMT = {"kind": "gnmt", "embed_dim": 48, "hidden": 48, "encoder_layers": 2, "decoder_layers": 2,
        "max_positions": 64}


@pytest.mark.parametrize("model, tokenizer, key", [
    ({"d_model": 64, "heads": 4}, None, "model.d_model is 64 here but 48 in"),
    ({"max_positions": 128}, None, "model.max_positions is 128 here but 64 in"),
    (GNMT, None, "model.kind is 'gnmt' here but 'transformer' in"),
    (None, {"vocab_size": 400}, "tokenizer.vocab_size is 400 here but 300 in"),
    (None, {"model_type": "bpe"}, "tokenizer.model_type is 'bpe' here but 'unigram' in"),
])
def test_another_shape_or_tokenizer_is_refused_naming_the_key(trained_run: Path, corpus_b: Path, tmp_path: Path,
                                                               model: dict, tokenizer: dict, key: str) -> None:
    recipe = recipe_b(corpus_b, tmp_path, model=model, tokenizer=tokenizer)
    line = one_error_line(train_child(recipe, tmp_path / "child", "--init-from", str(trained_run)))
    assert line.startswith(f"nmt: error: --init-from {trained_run}: {key}")
    assert not (tmp_path / "child" / "spm.model").exists()


def test_a_tokenizer_reused_from_elsewhere_is_refused(trained_run: Path, corpus_b: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.model"
    other.write_bytes(b"another SentencePiece model")
    recipe = recipe_b(corpus_b, tmp_path, tokenizer={"reuse": str(other)})
    line = one_error_line(train_child(recipe, tmp_path / "child", "--init-from", str(trained_run)))
    assert f"tokenizer.reuse is '{other}' here, not the SentencePiece model of {trained_run}" in line
    # The parent's own spm.model is fine to name.
    same = recipe_b(corpus_b, tmp_path, tokenizer={"reuse": str(trained_run / "spm.model")}, max_steps=1)
    assert train_child(same, tmp_path / "child2", "--init-from", str(trained_run)).exit_code == 0


def test_keep_optimizer_loads_the_parents_moments_under_the_new_settings(
        trained_run: Path, corpus_b: Path, tmp_path: Path) -> None:
    recipe = recipe_b(corpus_b, tmp_path, lr=1e-4)
    line = one_error_line(train_child(recipe, tmp_path / "refused", "--init-from", str(trained_run),
                                      "--keep-optimizer"))
    assert "best.pt holds no optimizer state (only last.pt does); add --checkpoint last" in line
    cfg, _ = prepare_run(fine_tune(config.load_recipe(recipe), trained_run, "last", keep_optimizer=True),
                         tmp_path / "child")
    trainer = Trainer(cfg, tmp_path / "child", progress_bar=False)
    trainer.start_from(cfg.init_from)
    parent = checkpoint.load(trained_run / "last.pt")["optimizer"]
    mine = trainer.optimizer.state_dict()
    assert all(torch.equal(mine["state"][i]["exp_avg_sq"], parent["state"][i]["exp_avg_sq"]) for i in parent["state"])
    assert mine["param_groups"][0]["initial_lr"] == 1e-4 != parent["param_groups"][0]["initial_lr"]
    assert trainer.state.step == 0 and trainer.scheduler.last_epoch == 0


def test_a_fresh_start_checks_the_parent_checkpoint_is_the_one_recorded(trained_run: Path, corpus_b: Path,
                                                                        tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    for name in ("config.yaml", "spm.model", "best.pt", "last.pt"):
        (parent / name).write_bytes((trained_run / name).read_bytes())
    child = tmp_path / "child"
    prepare_run(fine_tune(config.load_recipe(recipe_b(corpus_b, tmp_path)), parent), child)  # recorded, not trained
    checkpoint.save({**checkpoint.load(parent / "best.pt"), "step": 301}, parent / "best.pt")
    with pytest.raises(NmtError, match=r"best.pt is no longer the checkpoint .* recorded as its start \(step 300, "
                                       r"now step 301\); pass --init-from again"):
        prepare_run(config.load_recipe(child / "config.yaml"), child)


def test_init_from_options_alone_and_a_resume_of_another_run_are_refused(trained_run: Path, tmp_path: Path) -> None:
    line = one_error_line(run("train", str(trained_run), "--keep-optimizer", "--no-test"))
    assert "add --init-from RUN" in line
    line = one_error_line(run("train", str(trained_run), "--init-from", str(trained_run), "--no-test"))
    assert "did not start from another (last.pt); --init-from" in line and "give a new --run directory" in line
