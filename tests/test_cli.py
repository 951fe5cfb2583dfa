"""The nmt command as a user runs it: stdin to stdout, one-line errors, sacreBLEU's numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_pairs, tiny_recipe
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def run(*args: str, input: str | bytes | None = None):
    return runner.invoke(app, list(args), input=input)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("nmt: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_help_lists_commands() -> None:
    result = run("--help")
    for command in ("train", "translate", "eval", "data"):
        assert command in result.stdout
    for command in ("train", "translate", "eval", "data multi30k"):
        assert run(*command.split(), "--help").exit_code == 0


def test_python_dash_m_runs_the_same_app() -> None:
    out = subprocess.run([sys.executable, "-m", "nmt", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "translate" in out.stdout


# --- README's commands, as CI runs them

ROOT = Path(__file__).resolve().parent.parent


def ci_commands(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / ".ci" / "run"), "--print"], capture_output=True, text=True)


def test_ci_runs_the_readme_install_line_and_test_command() -> None:
    out = ci_commands(ROOT)
    assert out.returncode == 0, out.stderr
    install, test = out.stdout.splitlines()
    assert install.startswith("python3 -m pip install ") and "torch==2.13.0" in install.split()
    assert '-e ".[dev]"' in install  # the dev extra brings pytest, which the test command needs
    assert test == "python3 -m pytest -q"
    block = (ROOT / "README.md").read_text(encoding="utf-8").split("```")[1]
    assert install in block and test in block
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert any(req.startswith("pytest") for req in extras["dev"])


@pytest.mark.parametrize("readme", ["# nmt\n\nNo commands here.\n",
                                    "```bash\npip install -e .\n```\n"])
def test_ci_fails_loudly_without_readme_commands(tmp_path: Path, readme: str) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    out = ci_commands(tmp_path)
    assert out.returncode != 0 and out.stdout == ""
    assert "README.md: " in out.stderr and ("no code block" in out.stderr or "found 1 and 0" in out.stderr)


# --- translate

def test_n_lines_in_n_lines_out_with_empty_lines(trained_run: Path) -> None:
    lines = ["one red dog", "", "big house", "   ", "cat sleeps"]
    result = run("translate", "--model", str(trained_run), input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    out = result.stdout.split("\n")[:-1]
    assert len(out) == 5 and out[1] == "" and out[3] == ""
    assert "Hund" in out[0] and "Haus" in out[2]


def test_output_does_not_depend_on_batch_size(trained_run: Path) -> None:
    text = "".join(f"{src}\n" for src, _ in make_pairs(70, seed=11))
    outputs = {b: run("translate", "--model", str(trained_run), "--batch-size", str(b), input=text).stdout
               for b in (1, 7, 64)}
    assert outputs[1] == outputs[7] == outputs[64]
    assert outputs[1].count("\n") == 70


def test_overlong_line_truncated_with_warning_not_dropped(trained_run: Path) -> None:
    text = "one dog\n" + "red " * 2500 + "\nbig cat\n"
    result = run("translate", "--model", str(trained_run), "--beam", "1", input=text)
    assert result.exit_code == 0
    assert result.stdout.count("\n") == 3
    assert "<stdin>:2:" in result.stderr and "truncated" in result.stderr


def test_input_and_output_files_and_nbest(trained_run: Path, tmp_path: Path) -> None:
    (tmp_path / "in.en").write_text("red dog\nsmall tree runs\n", encoding="utf-8")
    result = run("translate", "-m", str(trained_run), "-i", str(tmp_path / "in.en"),
                 "-o", str(tmp_path / "out.de"), "--beam", "3", "--n-best", "2")
    assert result.exit_code == 0, result.output
    rows = [line.split(" ||| ") for line in (tmp_path / "out.de").read_text().splitlines()]
    assert [r[0] for r in rows] == ["0", "0", "1", "1"]
    assert float(rows[0][2]) >= float(rows[1][2])


def test_progress_not_written_when_stderr_is_not_a_terminal(trained_run: Path) -> None:
    result = run("translate", "--model", str(trained_run), input="red dog\n")
    assert "sent/s" not in result.stderr and "%|" not in result.stderr


def test_invalid_utf8_on_stdin(trained_run: Path) -> None:
    line = one_error_line(run("translate", "--model", str(trained_run), input=b"ok\n\xff\xfe bad\n"))
    assert "<stdin>:2: invalid UTF-8" in line


def test_invalid_utf8_error_names_the_way_to_go_on(trained_run: Path) -> None:
    line = one_error_line(run("translate", "--model", str(trained_run), input=b"ok\n\xff bad\n"))
    assert "--on-bad-line replace|skip-empty" in line


@pytest.mark.parametrize("policy", ["replace", "skip-empty"])
def test_on_bad_line_keeps_n_lines_in_n_lines_out(trained_run: Path, policy: str) -> None:
    text = b"one red dog\ncaf\xe9 dog\n\xff\xfe\nbig house\n"
    result = run("translate", "--model", str(trained_run), "--on-bad-line", policy, input=text)
    assert result.exit_code == 0, result.output
    out = result.stdout.split("\n")[:-1]
    assert len(out) == 4 and "Hund" in out[0] and "Haus" in out[3]
    warnings = [line for line in result.stderr.splitlines() if "invalid UTF-8" in line]
    assert len(warnings) == 2 and "<stdin>:2:" in warnings[0] and "<stdin>:3:" in warnings[1]
    if policy == "skip-empty":
        assert out[1] == "" and out[2] == ""
    else:
        assert "Hund" in out[1]  # the rest of the line is still translated


def test_unknown_on_bad_line_policy(trained_run: Path) -> None:
    line = one_error_line(run("translate", "--model", str(trained_run), "--on-bad-line", "drop", input="x\n"))
    assert "--on-bad-line drop: choose one of error, replace, skip-empty" in line


@pytest.mark.parametrize("args, expected", [
    (["--beam", "0"], "--beam 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--n-best", "0"], "--n-best 0: must be at least 1"),
    (["--beam", "2", "--n-best", "3"], "--n-best 3 is more than the beam (--beam 2)"),
    (["--n-best", "4"], "--n-best 4 is more than the beam (the recipe's search.beam 3)"),
])
def test_bad_search_options_are_one_line(trained_run: Path, args: list[str], expected: str) -> None:
    assert expected in one_error_line(run("translate", "--model", str(trained_run), *args, input="red dog\n"))


def test_not_a_run_directory(tmp_path: Path) -> None:
    assert "not a run directory" in one_error_line(run("translate", "--model", str(tmp_path), input="x\n"))


def test_corrupt_checkpoint_via_cli(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "best.pt").write_bytes((run_dir / "best.pt").read_bytes()[:1000])
    assert "truncated or corrupt" in one_error_line(run("translate", "--model", str(run_dir), input="x\n"))


# --- eval

@pytest.fixture
def hyp_ref(tmp_path: Path) -> tuple[Path, Path]:
    pairs = make_pairs(40, seed=5)
    hyps = [t if i % 3 else " ".join(reversed(t.split())) for i, (_, t) in enumerate(pairs)]
    (tmp_path / "hyp").write_text("".join(f"{h}\n" for h in hyps), encoding="utf-8")
    (tmp_path / "ref").write_text("".join(f"{t} .\n" for _, t in pairs), encoding="utf-8")
    return tmp_path / "hyp", tmp_path / "ref"


def test_eval_equals_sacrebleu_command_line(hyp_ref) -> None:
    hyp, ref = hyp_ref
    sacrebleu = shutil.which("sacrebleu") or pytest.skip("sacrebleu command not on PATH")
    ours = run("eval", "--bleu", "--chrf", "--hyp", str(hyp), "--ref", str(ref), "--json")
    theirs = subprocess.run([sacrebleu, str(ref), "-i", str(hyp), "-m", "bleu", "chrf"],
                            capture_output=True, text=True, check=True)
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    text = run("eval", "--bleu", "--hyp", str(hyp), "--ref", str(ref))
    theirs_text = subprocess.run([sacrebleu, str(ref), "-i", str(hyp), "-m", "bleu", "-f", "text"],
                                 capture_output=True, text=True, check=True)
    assert text.stdout.strip() == theirs_text.stdout.strip()


def test_eval_mismatched_lines(hyp_ref, tmp_path: Path) -> None:
    hyp, ref = hyp_ref
    short = tmp_path / "short"
    short.write_text("a\n", encoding="utf-8")
    line = one_error_line(run("eval", "--bleu", "--hyp", str(short), "--ref", str(ref)))
    assert "short has 1 lines" in line and "ref has 40" in line


def test_eval_of_two_empty_files_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "hyp").write_bytes(b"")
    (tmp_path / "ref").write_bytes(b"")
    line = one_error_line(run("eval", "--bleu", "--hyp", str(tmp_path / "hyp"), "--ref", str(tmp_path / "ref")))
    assert "have no lines: there is nothing to score" in line


def test_eval_model_with_beam_0_is_one_line(trained_run: Path, corpus: Path) -> None:
    line = one_error_line(run("eval", "--model", str(trained_run), "--src", str(corpus / "test.en"),
                              "--ref", str(corpus / "test.de"), "--beam", "0"))
    assert "--beam 0: the beam size must be at least 1" in line


def test_eval_model_saves_result(trained_run: Path, corpus: Path) -> None:
    result = run("eval", "--model", str(trained_run), "--src", str(corpus / "test.en"),
                 "--ref", str(corpus / "test.de"), "--beam", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a")
    saved = json.loads((trained_run / "eval" / "test.en.best.beam2.json").read_text())
    assert saved["BLEU"]["score"] > 30 and saved["sentences"] == 60


# --- train

def test_train_unknown_key_is_one_line(tmp_path: Path, corpus: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(corpus)), encoding="utf-8")
    line = one_error_line(run("train", str(recipe), "--set", "train.speed=3"))
    assert "unknown recipe key train.speed" in line


@pytest.mark.parametrize("text, expected", [
    ("model: 3\n", "recipe section model: expected a mapping of keys, got 3"),
    ("", "empty recipe"),
    ("model:\n  kind: gnmt\n  encoder_layers: 1\n", "model.encoder_layers must be at least 2 for gnmt"),
    ("data:\n  max_len: 0\n", "data.max_len must be between 1 and"),
])
def test_bad_recipe_is_one_line_before_training(tmp_path: Path, text: str, expected: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    assert expected in one_error_line(run("train", str(recipe), "--run", str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_train_with_no_processes_is_refused(tmp_path: Path, corpus: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(corpus)), encoding="utf-8")
    line = one_error_line(run("train", str(recipe), "--nproc", "0", "--run", str(tmp_path / "run")))
    assert "--nproc 0: give at least 1 process" in line
    assert not (tmp_path / "run").exists()


def test_train_missing_data_is_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "nowhere")), encoding="utf-8")
    line = one_error_line(run("train", str(recipe), "--run", str(tmp_path / "run")))
    assert "train.en: no such file" in line


def test_train_mismatched_corpus_is_one_line(tmp_path: Path, corpus: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    with (data / "train.de").open("a", encoding="utf-8") as f:
        f.write("extra\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(data)), encoding="utf-8")
    line = one_error_line(run("train", str(recipe), "--run", str(tmp_path / "run")))
    assert "train.en has 1500 lines" in line and "train.de has 1501" in line


def test_train_then_print_test_bleu(tmp_path: Path, corpus: Path, trained_run: Path) -> None:
    recipe = tmp_path / "r.yaml"
    raw = tiny_recipe(corpus, max_steps=20, valid_every=0)
    raw["tokenizer"]["reuse"] = str(trained_run)
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run("train", str(recipe), "--run", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "test test.en -> test.de: BLEU|" in result.stdout


def test_data_download_failure_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NMT_MULTI30K_URL", "http://127.0.0.1:9")  # nothing listens there
    line = one_error_line(run("data", "multi30k", "--dest", str(tmp_path)))
    assert "127.0.0.1:9" in line
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
