"""Choosing search settings on the validation set: nmt eval --sweep, RUN/search.yaml, --stop."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_pairs
from test_cli import one_error_line, run


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the trained run, free to be given a search.yaml."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


TEXT = "".join(f"{src}\n" for src, _ in make_pairs(12, seed=21))


def translate_nbest(run_dir: Path, *options: str) -> str:
    # n-best scores are log P / lp(|Y|) ** alpha + coverage: they show the penalties in use.
    result = run("translate", "--model", str(run_dir), "--beam", "3", "--n-best", "2", *options, input=TEXT)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_sweep_prints_each_setting_and_saves_the_best_for_translate(run_copy: Path) -> None:
    result = run("eval", "--model", str(run_copy), "--sweep", "length_penalty=0,2",
                 "--sweep", "coverage_penalty=0,0.2", "--save")
    assert result.exit_code == 0, result.output
    header, *rows, best_line = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["length_penalty", "coverage_penalty", "BLEU", "BP"]
    settings = [tuple(float(v) for v in row.split()[:2]) for row in rows]
    assert settings == [(0.0, 0.0), (0.0, 0.2), (2.0, 0.0), (2.0, 0.2)]  # the grid, in order
    bleus = [float(row.split()[2]) for row in rows]
    assert max(bleus) > 30  # the valid split of the task the model learned, translated
    saved = yaml.safe_load((run_copy / "search.yaml").read_text())
    best = settings[bleus.index(max(bleus))]
    assert saved == {"length_penalty": best[0], "coverage_penalty": best[1]}
    assert best_line.startswith("best: ") and "search.yaml" in best_line

    # translate now decodes with the saved setting, as if it were given as options.
    explicit = ["--length-penalty", str(best[0]), "--coverage-penalty", str(best[1])]
    other = ["--length-penalty", str(2.0 - best[0]), "--coverage-penalty", str(best[1])]
    assert translate_nbest(run_copy) == translate_nbest(run_copy, *explicit)
    assert translate_nbest(run_copy) != translate_nbest(run_copy, *other)


def test_sweep_src_and_ref_and_fixed_options(run_copy: Path, corpus: Path) -> None:
    result = run("eval", "--model", str(run_copy), "--src", str(corpus / "test.en"), "--ref",
                 str(corpus / "test.de"), "--sweep", "stop=standard,exact", "--beam", "2")
    assert result.exit_code == 0, result.output
    rows = result.stdout.strip().splitlines()[1:-1]
    assert [row.split()[0] for row in rows] == ["standard", "exact"]
    assert not (run_copy / "search.yaml").exists()  # no --save


def test_search_yaml_applies_over_the_checkpoint_and_options_over_it(run_copy: Path) -> None:
    plain = translate_nbest(run_copy)  # the recipe's length_penalty, 0.6
    (run_copy / "search.yaml").write_text("length_penalty: 2.0\n", encoding="utf-8")
    assert translate_nbest(run_copy) == translate_nbest(run_copy, "--length-penalty", "2.0") != plain
    assert translate_nbest(run_copy, "--length-penalty", "0.6") == plain


@pytest.mark.parametrize("text, message", [
    ("length_penalty: [1\n", "not valid YAML"),
    ("- 1.0\n", "expected search keys and values"),
    ("lenght_penalty: 1.0\n", "unknown recipe key search.lenght_penalty"),
    ("stop: fast\n", "search.stop must be standard or exact"),
    ("beam: many\n", "search.beam: expected int"),
])
def test_bad_search_yaml_is_one_line(run_copy: Path, text: str, message: str) -> None:
    (run_copy / "search.yaml").write_text(text, encoding="utf-8")
    line = one_error_line(run("translate", "--model", str(run_copy), input="red dog\n"))
    assert "search.yaml" in line and message in line and "delete it" in line


@pytest.mark.parametrize("args, message", [
    (["--sweep", "n_best=1,2"], "n_best is not a search key to sweep"),
    (["--sweep", "length_penalty"], "expected KEY=V1,V2"),
    (["--sweep", "beam=0,2"], "--sweep beam=0: recipe key search.beam"),
    (["--sweep", "length_penalty=fast"], "search.length_penalty: expected float"),
    (["--save"], "--save needs --sweep"),
])
def test_bad_sweep_is_one_line(run_copy: Path, args: list[str], message: str) -> None:
    assert message in one_error_line(run("eval", "--model", str(run_copy), *args))


def test_translate_stop_exact_and_bad_stop(trained_run: Path) -> None:
    result = run("translate", "--model", str(trained_run), "--stop", "exact", input=TEXT)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 12
    line = one_error_line(run("translate", "--model", str(trained_run), "--stop", "fast", input="red dog\n"))
    assert "search.stop must be standard or exact" in line


def test_search_changes_do_not_block_a_resume(run_copy: Path) -> None:
    result = run("train", str(run_copy), "--set", "search.length_penalty=1.4", "--set", "search.stop=exact",
                 "--set", "search.min_len=2", "--no-test", "--no-progress")
    assert result.exit_code == 0, result.output
    line = one_error_line(run("train", str(run_copy), "--set", "model.ffn=64", "--no-test", "--no-progress"))
    assert "model.ffn" in line


def test_translating_under_several_settings_at_once_equals_one_at_a_time(trained_run: Path) -> None:
    from nmt.config import SearchConfig
    from nmt.rundir import load_run
    from nmt.translate import translate, translate_each

    _, tokenizer, model = load_run(trained_run)
    lines = TEXT.splitlines() + [""]
    cfgs = [SearchConfig(beam=1), SearchConfig(beam=3, n_best=2, length_penalty=2.0),
            SearchConfig(beam=3, coverage_penalty=0.5, stop="exact")]
    together = translate_each(model, tokenizer, lines, cfgs)
    for cfg, decoding in zip(cfgs, together, strict=True):
        alone = translate(model, tokenizer, lines, cfg)
        assert [t.texts for t in decoding.translations] == [t.texts for t in alone]
