"""BLEU's tokenization (``data.bleu_tokenize``, ``nmt eval --tokenize``): sacreBLEU's, 13a unless a recipe
says otherwise, and the same in every BLEU of a run: validation, nmt eval --model, sweeps and nmt report.
Also the small_parallel_enja recipes, which score the given tokens (tok:none), and compare.sh's en-ja/ja-en."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import overlapped, stub_nmt, tiny_recipe
from test_cli import one_error_line, run

from nmt import config
from nmt.errors import NmtError
from nmt.metrics import bleu, paired_bootstrap, signature_tokenize

ROOT = Path(__file__).resolve().parent.parent
ENJA = ROOT / "recipes" / "small_parallel_enja"

# The references split "." off, the hypotheses keep it on the word: 13a splits both alike, none does not.
HYPS = ["a dog runs on the beach.", "two men talk.", "the cat sleeps."]
REFS = ["a dog runs on the beach .", "two men talk .", "the cat sleeps ."]


# --- the setting -------------------------------------------------------------------------------

def test_the_default_is_sacrebleus_13a_and_recipes_that_say_nothing_keep_it() -> None:
    assert config.Config().data.bleu_tokenize == "13a"
    assert config.from_dict({"data": {"dir": "x"}}).data.bleu_tokenize == "13a"
    for path in sorted((ROOT / "recipes" / "multi30k").glob("*.yaml")):
        assert config.load_recipe(path).data.bleu_tokenize == "13a", path


def test_an_unknown_tokenization_is_one_error_naming_the_key_and_the_valid_ones() -> None:
    with pytest.raises(NmtError) as e:
        config.from_dict({"data": {"bleu_tokenize": "moses"}})
    assert "data.bleu_tokenize" in str(e.value) and "'moses'" in str(e.value)
    assert "13a" in str(e.value) and "none" in str(e.value) and "ja-mecab" in str(e.value)
    assert "\n" not in str(e.value)


def test_train_refuses_an_unknown_tokenization_in_one_line(tmp_path: Path, corpus: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(corpus)), encoding="utf-8")
    line = one_error_line(run("train", str(recipe), "--set", "data.bleu_tokenize=Moses", "--run", str(tmp_path / "r")))
    assert "data.bleu_tokenize" in line and "'Moses'" in line


def test_a_tokenization_that_cannot_load_here_stops_train_before_it_starts(tmp_path: Path, corpus: Path) -> None:
    if importlib.util.find_spec("MeCab") is not None:
        pytest.skip("sacreBLEU's [ja] extra is installed here: ja-mecab loads")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(corpus)), encoding="utf-8")
    line = one_error_line(run("train", str(recipe), "--set", "data.bleu_tokenize=ja-mecab",
                              "--run", str(tmp_path / "r")))
    assert "BLEU tokenization ja-mecab" in line and "sacrebleu[ja]" in line
    assert not (tmp_path / "r").exists()  # not at the first validation, minutes later


# --- BLEU and its signature --------------------------------------------------------------------

def test_the_tokenization_changes_bleu_and_the_signature_names_it() -> None:
    split, given = bleu(HYPS, REFS), bleu(HYPS, REFS, tokenize="none")
    assert split.score == pytest.approx(100) and given.score < 50  # 13a splits "beach." as the reference has it
    assert "tok:13a" in split.signature and "tok:none" in given.signature
    assert signature_tokenize(given.signature) == "none" and signature_tokenize("nrefs:1|case:mixed") == "13a"
    results, signatures = paired_bootstrap([("a", HYPS), ("b", REFS)], REFS, n_samples=100, tokenize="none")
    assert "tok:none" in signatures["BLEU"] and results["a"]["BLEU"].score == pytest.approx(given.score)


def test_eval_tokenize_scores_as_the_sacrebleu_command_line(tmp_path: Path) -> None:
    (tmp_path / "hyp").write_text("".join(f"{h}\n" for h in HYPS), encoding="utf-8")
    (tmp_path / "ref").write_text("".join(f"{r}\n" for r in REFS), encoding="utf-8")
    hyp, ref = str(tmp_path / "hyp"), str(tmp_path / "ref")
    ours = run("eval", "--bleu", "--hyp", hyp, "--ref", ref, "--tokenize", "none", "--json")
    assert ours.exit_code == 0, ours.output
    assert json.loads(ours.stdout)["tok"] == "none"
    assert json.loads(ours.stdout)["score"] == round(bleu(HYPS, REFS, tokenize="none").score, 1)
    assert json.loads(run("eval", "--bleu", "--hyp", hyp, "--ref", ref, "--json").stdout)["tok"] == "13a"
    sacrebleu = shutil.which("sacrebleu")
    if sacrebleu:
        theirs = subprocess.run([sacrebleu, ref, "-i", hyp, "-m", "bleu", "-tok", "none"],
                                capture_output=True, text=True, check=True)
        assert json.loads(ours.stdout) == json.loads(theirs.stdout)


def test_eval_tokenize_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("a\n", encoding="utf-8")
    x = str(tmp_path / "x")
    line = one_error_line(run("eval", "--bleu", "--hyp", x, "--ref", x, "--tokenize", "moses"))
    assert "--tokenize 'moses'" in line and "none" in line
    line = one_error_line(run("eval", "--model", x, "--src", x, "--ref", x, "--tokenize", "none"))
    assert "data.bleu_tokenize" in line


# --- every BLEU of a run -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def none_run(tmp_path_factory, corpus: Path) -> Path:
    """A run whose recipe says bleu_tokenize: none, two updates and one validation (its output is
    whatever two updates make: the references below are built from it)."""
    from nmt.train import train

    raw = tiny_recipe(corpus, max_steps=2, valid_every=2, log_every=1)
    raw["data"]["bleu_tokenize"] = "none"
    run_dir = tmp_path_factory.mktemp("none") / "none"
    train(config.from_dict(raw), run_dir, progress_bar=False)
    return run_dir


def test_validation_scores_with_the_recipes_tokenization(none_run: Path) -> None:
    records = [json.loads(line) for line in (none_run / "log.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["event"] == "valid"]
    assert valid and all("tok:none" in r["valid_bleu_signature"] for r in valid)


def test_eval_sweep_and_report_score_with_the_runs_tokenization(none_run: Path, corpus: Path, tmp_path: Path) -> None:
    src = str(corpus / "test.en")
    first = run("eval", "--model", str(none_run), "--src", src, "--ref", str(corpus / "test.de"), "--beam", "2")
    assert first.exit_code == 0, first.output
    hyps = (none_run / "eval" / "test.en.best.beam2.hyp").read_text(encoding="utf-8").splitlines()
    # References that 13a and none split differently: the model's own words, "." kept on the last.
    refs = [f"{h}." if h else "." for h in hyps]
    ref = tmp_path / "test.ref"
    ref.write_text("".join(f"{r}\n" for r in refs), encoding="utf-8")
    given, split = bleu(hyps, refs, tokenize="none").score, bleu(hyps, refs).score
    assert given != pytest.approx(split)

    result = run("eval", "--model", str(none_run), "--src", src, "--ref", str(ref), "--beam", "2")
    assert result.exit_code == 0, result.output
    assert "|tok:none|" in result.stdout.splitlines()[0]
    saved = json.loads((none_run / "eval" / "test.en.best.beam2.json").read_text())
    assert saved["BLEU"]["score"] == pytest.approx(given) and "tok:none" in saved["BLEU"]["signature"]

    swept = run("eval", "--model", str(none_run), "--src", src, "--ref", str(ref), "--sweep", "beam=2")
    assert swept.exit_code == 0, swept.output
    assert float(swept.stdout.splitlines()[1].split()[1]) == pytest.approx(given, abs=0.006)

    report = run("report", str(none_run))
    assert report.exit_code == 0, report.output
    signatures = [line for line in report.stdout.splitlines() if "signature" in line.lower()]
    assert signatures and all("tok:none" in line and "tok:13a" not in line for line in signatures)


def test_report_refuses_runs_scored_with_different_tokenizations(none_run: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(none_run, tmp_path / "other"))
    saved = yaml.safe_load((other / "config.yaml").read_text())
    saved["data"]["bleu_tokenize"] = "13a"
    (other / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    line = one_error_line(run("report", str(none_run), str(other)))
    assert "different BLEU tokenizations" in line and "--allow-mixed" in line


# --- the small_parallel_enja recipes and compare.sh ---------------------------------------------

@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
@pytest.mark.parametrize("src,tgt", [("en", "ja"), ("ja", "en")])
def test_enja_recipes_load_and_score_the_given_tokens(kind: str, src: str, tgt: str) -> None:
    path = ENJA / f"{kind}-{src}-{tgt}.yaml"
    assert "nmt train" in "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:6])
    cfg = config.load_recipe(path)
    multi30k = config.load_recipe(ROOT / "recipes" / "multi30k" / f"{kind}.yaml")
    assert (cfg.data.dir, cfg.data.src_lang, cfg.data.tgt_lang) == ("small_parallel_enja", src, tgt)
    assert (cfg.data.train, cfg.data.valid, cfg.data.test, cfg.data.bleu_tokenize) == ("train", "valid", "test", "none")
    assert cfg.name == f"small_parallel_enja-{kind}-{src}-{tgt}" and cfg.tokenizer.reuse is None
    assert (cfg.model, cfg.train, cfg.search, cfg.tokenizer) == (multi30k.model, multi30k.train, multi30k.search,
                                                                 multi30k.tokenizer)


def test_enja_recipes_find_their_files_when_nmt_data_holds_them() -> None:
    data = os.environ.get("NMT_DATA")
    if not data or not (Path(data) / "small_parallel_enja" / "test.ja").is_file():
        pytest.skip("NMT_DATA does not hold small_parallel_enja/")
    cfg = config.load_recipe(ENJA / "transformer-en-ja.yaml")
    for split, lines in (("valid", 500), ("test", 500)):
        for path in config.split_paths(cfg.data, split):
            assert len(path.read_text(encoding="utf-8").splitlines()) == lines, path


def enja_env(tmp_path: Path, train_s: float = 0.1, **env: str) -> dict:
    """compare.sh's environment for en-ja and ja-en against a stub nmt."""
    return stub_nmt(tmp_path, train_s, **{"PAIRS": "en-ja ja-en", "BUDGET": "5", "OUT": str(tmp_path / "out"),
                                 "NMT_DATA": str(tmp_path / "data"), **env})


def test_compare_script_runs_en_ja_and_ja_en_on_their_recipes_and_data(tmp_path: Path) -> None:
    env = enja_env(tmp_path)
    script = ROOT / "recipes" / "multi30k" / "compare.sh"
    refused = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "small_parallel_enja" in refused.stderr and "NMT_DATA" in refused.stderr
    data = tmp_path / "data" / "small_parallel_enja"
    data.mkdir(parents=True)
    for lang in ("en", "ja"):
        (data / f"train.{lang}").write_text("x\n")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    trains = [c for c in calls if c.startswith("train ")]
    assert [c.split()[1] for c in trains] == [f"recipes/small_parallel_enja/{m}-{p}.yaml"
                                              for p in ("en-ja", "ja-en") for m in ("transformer", "gnmt")]
    evals = [c for c in calls if c.startswith("eval ")]
    assert f"--src {data}/test.en --ref {data}/test.ja" in evals[0]
    assert f"--src {data}/test.ja --ref {data}/test.en" in evals[3]
    assert not [c for c in calls if c.startswith("data ")]  # nmt data fetches Multi30k only
    reports = [c for c in calls if c.startswith("report ") and "--plot " in c]
    assert f"{tmp_path}/out/ja-en/gnmt-seed1" in reports[1] and "--target 15" in reports[1]


def test_compare_script_budgets_updates_runs_them_together_and_reports_by_updates(tmp_path: Path) -> None:
    env = enja_env(tmp_path, train_s=1, PAIRS="en-ja", UPDATES="300", JOBS="2", THREADS="1")
    data = tmp_path / "data" / "small_parallel_enja"
    data.mkdir(parents=True)
    for lang in ("en", "ja"):
        (data / f"train.{lang}").write_text("x\n")
    subprocess.run(["bash", str(ROOT / "recipes" / "multi30k" / "compare.sh")], env=env, check=True,
                   capture_output=True, cwd=tmp_path)
    calls = (tmp_path / "calls").read_text().splitlines()
    shared = tmp_path / "out" / "en-ja" / "transformer-seed1"
    # The pair's SentencePiece model is made before the runs that share it start together.
    assert calls[[c.split()[0] for c in calls].index("prepare")] == \
        f"prepare recipes/small_parallel_enja/transformer-en-ja.yaml --run {shared} --no-progress"
    first_train = next(i for i, c in enumerate(calls) if c.startswith("train "))
    assert [c.split()[0] for c in calls[:first_train]].count("prepare") == 1
    trains = [c for c in calls if c.startswith("train ")]
    assert len(trains) == 2 and all("train.max_minutes=0" in c and "train.max_steps=300" in c
                                    and "train.threads=1" in c for c in trains)
    assert overlapped(tmp_path) == 2  # JOBS=2: both runs train at once
    report = next(c for c in calls if c.startswith("report ") and "--plot-updates" in c)
    assert "--at-updates 60,120,180,240,300" in report and "--at " not in report
    # Its runs take the en-ja probes of this machine kind, and the plot against projected time.
    probes = sorted((ROOT / "recipes" / "small_parallel_enja" / "results" / "probes").glob("*-en-ja.json"))
    assert probes and all(f"--time-from recipes/small_parallel_enja/results/probes/{p.name}" in report
                          for p in probes)
    assert "-ja-en.json" not in report and f"--plot {tmp_path}/out/en-ja/bleu-vs-time.png" in report
