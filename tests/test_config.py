"""Recipes: typed keys, overrides, one-line errors for unknown or mistyped keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nmt import config
from nmt.errors import NmtError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("**/*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe: Path) -> None:
    cfg = config.load_recipe(recipe)
    assert cfg.model.kind in config.MODEL_CONFIGS


def test_overrides_are_typed(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"lr": 1e-3}})
    cfg = config.load_recipe(path, ["train.lr=5e-4", "model.encoder_layers=4", "train.adam_betas=[0.9, 0.99]"])
    assert cfg.train.lr == pytest.approx(5e-4)
    assert cfg.model.encoder_layers == 4
    assert cfg.train.adam_betas == [0.9, 0.99]
    assert isinstance(cfg.train.lr, float)


def test_int_accepted_for_float_but_not_string_for_int(tmp_path: Path) -> None:
    path = write(tmp_path, {})
    assert config.load_recipe(path, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(NmtError, match=r"model.d_model: expected int, got 'wide'"):
        config.load_recipe(path, ["model.d_model=wide"])


def test_unknown_key_names_key_and_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"learning_rate": 0.1}})
    with pytest.raises(NmtError) as err:
        config.load_recipe(path)
    message = str(err.value)
    assert "train.learning_rate" in message and "lr" in message and str(path) in message
    assert "\n" not in message


def test_unknown_override_and_section(tmp_path: Path) -> None:
    path = write(tmp_path, {})
    with pytest.raises(NmtError, match="model.layer"):
        config.load_recipe(path, ["model.layer=4"])
    with pytest.raises(NmtError, match="unknown recipe section 'optim'"):
        config.load_recipe(write(tmp_path, {"optim": {}}))
    with pytest.raises(NmtError, match="expected section.key=value"):
        config.load_recipe(path, ["train.lr"])


def test_unknown_model_kind(tmp_path: Path) -> None:
    with pytest.raises(NmtError, match="unknown model 'rnn'"):
        config.load_recipe(write(tmp_path, {"model": {"kind": "rnn"}}))


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1,\n", encoding="utf-8")
    with pytest.raises(NmtError, match=r"bad.yaml:\d+: invalid YAML"):
        config.load_recipe(path)


def test_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(NmtError, match="no such recipe"):
        config.load_recipe(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = config.load_recipe(write(tmp_path, {"name": "x", "train": {"lr": 2e-3}}))
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load_recipe(tmp_path / "config.yaml") == cfg


def test_split_paths_under_nmt_data(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NMT_DATA", str(tmp_path))
    src, tgt = config.split_paths(config.DataConfig(dir="multi30k"), "valid")
    assert src == tmp_path / "multi30k" / "valid.en" and tgt == tmp_path / "multi30k" / "valid.de"


# --- values of the right type that would fail later: refused at load time, naming key and range

@pytest.mark.parametrize("overrides, key, valid", [
    (["data.max_len=0"], "data.max_len", "between 1 and model.max_positions - 1 = 255"),
    (["model.max_positions=64", "data.max_len=64"], "data.max_len", "between 1 and model.max_positions - 1 = 63"),
    (["model.d_model=250", "model.heads=4"], "model.d_model", "multiple of model.heads = 4"),
    (["model.kind=gnmt", "model.encoder_layers=1"], "model.encoder_layers", "at least 2 for gnmt"),
    (["train.valid_beam=0"], "train.valid_beam", "at least 1"),
    (["train.label_smoothing=1.0"], "train.label_smoothing", "in [0, 1)"),
    (["train.label_smoothing=-0.1"], "train.label_smoothing", "in [0, 1)"),
    (["train.keep_last=3", "train.average_last=5"], "train.average_last", "at most train.keep_last = 3"),
    (["train.lr=-1e-3"], "train.lr", "positive"),
    (["train.log_every=0"], "train.log_every", "at least 1"),
    (["search.beam=0"], "search.beam", "at least 1"),
    (["search.beam=2", "search.n_best=3"], "search.n_best", "between 1 and search.beam = 2"),
])
def test_out_of_range_value_names_key_and_valid_range(tmp_path: Path, overrides, key, valid) -> None:
    path = write(tmp_path, {"model": {"kind": "transformer"}})
    with pytest.raises(NmtError) as err:
        config.load_recipe(path, overrides)
    message = str(err.value)
    assert f"recipe key {key} must be " in message and valid in message and "\n" not in message


def test_values_at_the_edge_of_their_range_are_accepted(tmp_path: Path) -> None:
    cfg = config.load_recipe(write(tmp_path, {"data": {"max_len": 255}}),
                             ["train.keep_last=3", "train.average_last=3", "train.label_smoothing=0"])
    assert (cfg.data.max_len, cfg.train.average_last) == (255, 3)
    gnmt = config.load_recipe(write(tmp_path, {"model": {"kind": "gnmt", "encoder_layers": 2}}))
    assert gnmt.model.encoder_layers == 2


@pytest.mark.parametrize("section", ["model", "train", "data"])
@pytest.mark.parametrize("value", [3, [1, 2], "wide"])
def test_section_that_is_not_a_mapping(tmp_path: Path, section: str, value) -> None:
    with pytest.raises(NmtError, match=rf"recipe section {section}: expected a mapping of keys, got"):
        config.load_recipe(write(tmp_path, {section: value}))


@pytest.mark.parametrize("text", ["", "\n", "# nothing but a comment\n"])
def test_empty_recipe_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(NmtError, match="empty.yaml: empty recipe"):
        config.load_recipe(path, ["train.lr=1e-3"])


def test_defaulted_sections_are_named(tmp_path: Path, nmt_log) -> None:
    with nmt_log.at_level("INFO", logger="nmt"):
        config.load_recipe(write(tmp_path, {"model": {"kind": "transformer"}, "train": {"lr": 1e-3}}))
    assert "no data, tokenizer, search section" in nmt_log.text
