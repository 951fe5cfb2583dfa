"""nmt report's 95% intervals and paired bootstrap p-values: sacreBLEU's numbers, on hand-written runs."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import make_run, runner

from cli.main import app
from nmt import report
from nmt.files import sha256 as file_sha256
from nmt.metrics import bleu, chrf, paired_bootstrap

VOCABULARY = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "ro", "ne", "vi") for b in ("n", "s", "ta", "ri", "m")]


@pytest.fixture(autouse=True)
def sacrebleu_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SACREBLEU_SEED", "12345")  # sacreBLEU's default, whatever the environment says


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def corrupt(lines: list[str], rate: float, seed: int) -> list[str]:
    """Each word replaced by a random one with probability ``rate``: a system of some quality."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCABULARY) if rng.random() < rate else w for w in line.split()) for line in lines]


def change_a_word(lines: list[str], how_many: int, seed: int) -> list[str]:
    """One random word changed in ``how_many`` lines: a system that differs by chance."""
    rng = random.Random(seed)
    out = list(lines)
    for i in rng.sample(range(len(out)), how_many):
        words = out[i].split()
        words[rng.randrange(len(words))] = rng.choice(VOCABULARY)
        out[i] = " ".join(words)
    return out


def write_test_set(root: Path, n: int, seed: int = 0) -> list[str]:
    """Write the test split ``root/data/test2016.{en,de}`` of ``n`` sentences; returns the references."""
    refs = sentences(n, seed)
    (root / "data").mkdir(parents=True)
    (root / "data" / "test2016.en").write_text("".join(f"source {i}\n" for i in range(n)), encoding="utf-8")
    (root / "data" / "test2016.de").write_text("".join(f"{r}\n" for r in refs), encoding="utf-8")
    return refs


def scored_run(root: Path, name: str, hyps: list[str], **options) -> Path:
    """A run of ``make_run`` whose test evaluation scored ``hyps`` and kept them, as nmt eval does."""
    run = make_run(root, name, **options)
    refs = (root / "data" / "test2016.de").read_text(encoding="utf-8").splitlines()
    hyp = run / "eval" / "test2016.en.best.beam5.hyp"
    hyp.write_text("".join(f"{h}\n" for h in hyps), encoding="utf-8")
    path = run / "eval" / "test2016.en.best.beam5.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    record["BLEU"]["score"], record["chrF2"]["score"] = bleu(hyps, refs).score, chrf(hyps, refs).score
    record.update(hyp=hyp.name, hyp_sha256=file_sha256(hyp))
    path.write_text(json.dumps(record), encoding="utf-8")
    return run


def compared(runs: list[Path], baseline: str | None = None) -> list[report.RunSummary]:
    return report.compare(runs, baseline=baseline).rows


def test_the_interval_narrows_with_more_sentences(tmp_path: Path) -> None:
    widths = []
    for n in (60, 960):
        refs = write_test_set(tmp_path / str(n), n)
        (row,) = compared([scored_run(tmp_path / str(n), "a", corrupt(refs, 0.3, 1))])
        assert row.test_bleu_mean == pytest.approx(row.test_bleu, abs=2.0) and row.significance_note == "baseline"
        widths.append((row.test_bleu_ci, row.test_chrf_ci))
    (bleu_small, chrf_small), (bleu_large, chrf_large) = widths
    assert bleu_large < bleu_small / 2 and chrf_large < chrf_small / 2  # about 1/sqrt(16) as wide


def test_a_difference_by_chance_is_not_significant(tmp_path: Path) -> None:
    refs = write_test_set(tmp_path, 400)
    system = corrupt(refs, 0.3, 1)
    a, b = scored_run(tmp_path, "a", system), scored_run(tmp_path, "b", change_a_word(system, 3, 0))
    base, other = compared([a, b])
    assert other.test_bleu != base.test_bleu and other.p_baseline == "a"
    assert other.p_bleu > 0.05 and other.p_chrf > 0.05


def test_a_clearly_better_system_is_significant(tmp_path: Path) -> None:
    refs = write_test_set(tmp_path, 400)
    a, b = scored_run(tmp_path, "a", corrupt(refs, 0.3, 1)), scored_run(tmp_path, "b", corrupt(refs, 0.15, 2))
    base, better = compared([a, b])
    assert better.test_bleu > base.test_bleu + 10
    assert better.p_bleu < 0.05 and better.p_chrf < 0.05
    result = runner.invoke(app, ["report", str(a), str(b)])
    assert result.exit_code == 0 and "p-values against a" in result.stdout
    assert f"| b | {better.test_bleu:.2f} ({better.test_bleu_mean:.2f} ± {better.test_bleu_ci:.2f}) | " \
           f"{better.p_bleu:.4f}* |" in result.stdout


def test_identical_outputs_are_reported_as_identical(tmp_path: Path) -> None:
    refs = write_test_set(tmp_path, 200)
    system = corrupt(refs, 0.3, 1)
    # sacreBLEU gives identical systems its smallest p-value, as if they differed significantly.
    results, _ = paired_bootstrap([("a", system), ("b", list(system))], refs)
    assert results["b"]["BLEU"].p_value == pytest.approx(1 / 1001)
    a, b = scored_run(tmp_path, "a", system), scored_run(tmp_path, "b", system)
    base, same = compared([a, b])
    assert (same.p_bleu, same.p_chrf, same.significance_note) == (None, None, "identical to the baseline's output")
    assert same.test_bleu_ci == base.test_bleu_ci  # still an interval of its own
    text = runner.invoke(app, ["report", str(a), str(b)]).stdout
    assert "| identical to the baseline's output |" in text and "0.0010" not in text
    # Outputs that differ only in a word neither matches score alike on every resample: the same.
    c = scored_run(tmp_path, "c", [system[0] + " zzz", *system[1:]])
    d = scored_run(tmp_path, "d", [system[0] + " yyy", *system[1:]])
    _, other = compared([c, d])
    assert (other.p_bleu, other.p_chrf) == (None, None)
    assert other.significance_note == "same BLEU and chrF2 as the baseline on every resample"


def _sacrebleu_table(ref: Path, systems: list[Path], seed: str) -> tuple[list[tuple[float, ...]], list[float]]:
    """(score, mean, ci) per system and metric, and the p-values, as sacreBLEU's command line prints them."""
    command = [sys.executable, "-m", "sacrebleu", str(ref), "-i", *map(str, systems), "-m", "bleu", "chrf",
               "--paired-bs", "--paired-bs-n", "1000", "-f", "text", "-w", "4", "--no-color"]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "SACREBLEU_SEED": seed}).stdout
    scores = [tuple(map(float, m)) for m in re.findall(r"(\d+\.\d+) \((\d+\.\d+) ± (\d+\.\d+)\)", out)]
    return scores, [float(p) for p in re.findall(r"p = (\d\.\d+)", out)]


def test_numbers_equal_what_sacrebleu_prints_for_the_same_files(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SACREBLEU_SEED", "7")
    refs = write_test_set(tmp_path, 300)
    system = corrupt(refs, 0.3, 1)
    runs = [scored_run(tmp_path, "a", system), scored_run(tmp_path, "b", corrupt(refs, 0.2, 2)),
            scored_run(tmp_path, "c", change_a_word(system, 5, 3))]
    rows = compared(runs)
    scores, p_values = _sacrebleu_table(tmp_path / "data" / "test2016.de",
                                        [run / "eval" / "test2016.en.best.beam5.hyp" for run in runs], "7")
    ours = [(r.test_bleu, r.test_bleu_mean, r.test_bleu_ci, r.test_chrf, r.test_chrf_mean, r.test_chrf_ci)
            for r in rows]
    assert len(scores) == 6 and len(p_values) == 4
    for (bleu_line, chrf_line), mine in zip(zip(scores[::2], scores[1::2]), ours):
        assert (*bleu_line, *chrf_line) == pytest.approx(mine, abs=5e-5)
    assert p_values == pytest.approx([rows[1].p_bleu, rows[1].p_chrf, rows[2].p_bleu, rows[2].p_chrf], abs=5e-5)
    # The same numbers in every format.
    parsed = json.loads(runner.invoke(app, ["report", *map(str, runs), "--format", "json"]).stdout)
    assert [(r["test_bleu_ci"], r["p_chrf"]) for r in parsed] == [(r.test_bleu_ci, r.p_chrf) for r in rows]


def test_runs_on_different_test_sets_are_not_compared(tmp_path: Path) -> None:
    refs, others = write_test_set(tmp_path / "one", 100, seed=0), write_test_set(tmp_path / "two", 100, seed=1)
    a = scored_run(tmp_path / "one", "a", corrupt(refs, 0.3, 1))
    b = scored_run(tmp_path / "one", "b", corrupt(refs, 0.3, 2))
    c = scored_run(tmp_path / "two", "c", corrupt(others, 0.3, 1))
    refused = runner.invoke(app, ["report", str(a), str(b), str(c)])
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "different test sets (a, b; c)" in refused.stderr
    result = runner.invoke(app, ["report", str(a), str(b), str(c), "--allow-mixed"])
    assert result.exit_code == 0, result.output
    not_compared = [line for line in result.stdout.splitlines() if line.startswith("- not compared with a")]
    assert len(not_compared) == 1 and not_compared[0].endswith(": c")
    rows = report.compare([a, b, c], allow_mixed=True).rows
    assert rows[1].p_bleu is not None and rows[2].p_bleu is None and rows[2].test_bleu_ci > 0


def test_a_run_without_kept_hypotheses_gets_a_note(tmp_path: Path) -> None:
    refs = write_test_set(tmp_path, 100)
    a = scored_run(tmp_path, "a", corrupt(refs, 0.3, 1))
    old = make_run(tmp_path, "old")  # evaluated before nmt eval kept the hypotheses
    changed = scored_run(tmp_path, "changed", corrupt(refs, 0.3, 2))
    (changed / "eval" / "test2016.en.best.beam5.hyp").write_text("edited\n" * 100, encoding="utf-8")
    result = runner.invoke(app, ["report", str(a), str(old), str(changed)])
    assert result.exit_code == 0, result.output
    assert "| old | no significance: re-run nmt eval (its record keeps no hypotheses) |" in result.stdout
    assert "| changed | no significance: re-run nmt eval (" in result.stdout and "changed since it was scored)" \
        in result.stdout
    baseline_without = runner.invoke(app, ["report", str(a), str(old), "--baseline", "old"])
    assert baseline_without.exit_code == 0 and "no p-values: the baseline old has no kept" in baseline_without.stdout
    unknown = runner.invoke(app, ["report", str(a), "--baseline", "nope"])
    assert unknown.exit_code == 1 and "--baseline nope: not one of the reported runs (a)" in unknown.stderr


def test_seed_groups_compare_their_first_seeds(tmp_path: Path) -> None:
    refs = write_test_set(tmp_path, 200)
    runs = [scored_run(tmp_path, "t2", corrupt(refs, 0.3, 2), seed=2),
            scored_run(tmp_path, "t1", corrupt(refs, 0.3, 1), seed=1),
            scored_run(tmp_path, "g1", corrupt(refs, 0.15, 3), kind="gnmt", seed=1),
            scored_run(tmp_path, "g2", corrupt(refs, 0.15, 4), kind="gnmt", seed=2)]
    found = report.compare(runs, baseline="t2", group_seeds=True)  # t2's group: its first seed is t1
    rows = {r.run: r for r in found.rows}
    assert found.significance.baseline == "t1" and rows["t1"].significance_note == "baseline"
    transformer, gnmt = found.groups
    assert (transformer.p_run, transformer.p_note) == ("t1", "baseline")
    assert (gnmt.p_run, gnmt.p_bleu, gnmt.p_chrf) == ("g1", rows["g1"].p_bleu, rows["g1"].p_chrf)
    assert gnmt.p_bleu < 0.05
    text = report.render(found.rows, "md", found.groups, found.significance)
    assert "each group's p-value is its first seed's" in text
