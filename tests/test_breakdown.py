"""nmt report --breakdown: scores per source-length bucket and word F-measure per training-frequency
bucket, on hand-written runs (and on the committed Multi30k runs where NMT_DATA holds the data)."""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import shared_data
from sacrebleu.metrics import BLEU, CHRF
from test_report import make_run, runner
from test_significance import VOCABULARY, corrupt, scored_run

from cli.main import app
from nmt.report import breakdown as bd

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "recipes" / "multi30k" / "results" / "en-de"


@pytest.fixture(autouse=True)
def sacrebleu_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SACREBLEU_SEED", "12345")


def write_data(root: Path, n: int = 150, seed: int = 0) -> tuple[list[str], list[str]]:
    """``root/data``: a test split of ``n`` sources of 2 to 25 words with their references, and a
    training split whose target words occur from once to hundreds of times. Returns (sources, refs)."""
    rng = random.Random(seed)
    data = root / "data"
    data.mkdir(parents=True)
    sources = [" ".join(rng.choice(("a", "b", "c")) for _ in range(rng.randint(2, 25))) for _ in range(n)]
    refs = [" ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(4, 12))) + " ." for _ in range(n)]
    # Word i of VOCABULARY occurs about 400 / (i + 1) times: every frequency bucket gets words.
    train = [" ".join(rng.choices(VOCABULARY, weights=[1 / (i + 1) for i in range(len(VOCABULARY))], k=8))
             for _ in range(300)]
    for name, lines in (("test2016.en", sources), ("test2016.de", refs), ("train.en", train), ("train.de", train)):
        (data / name).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return sources, refs


def two_runs(root: Path) -> tuple[list[Path], list[str], list[str]]:
    sources, refs = write_data(root)
    runs = [scored_run(root, "a", corrupt(refs, 0.4, 1)), scored_run(root, "b", corrupt(refs, 0.2, 2))]
    return runs, sources, refs


def test_length_buckets_hold_the_minimum_and_every_sentence() -> None:
    rng = random.Random(0)
    for n, minimum, parts in ((1000, 100, 5), (300, 50, 5), (120, 40, 8), (90, 100, 5)):
        lengths = [min(60, int(rng.lognormvariate(2.4, 0.4))) for _ in range(n)]
        buckets = bd.length_buckets(lengths, minimum, parts)
        assert sum(b.size for b in buckets) == n and len(buckets) <= parts
        assert [b.size for b in buckets] == [sum(b.holds(x) for x in lengths) for b in buckets]
        assert all(b.size >= minimum for b in buckets) or len(buckets) == 1  # 90 sentences: one bucket
        assert all(a.high < b.low for a, b in zip(buckets, buckets[1:]))
        assert buckets[0].low == min(lengths) and buckets[-1].high == max(lengths)
    # One length everywhere cannot be cut.
    assert [(b.low, b.high, b.size) for b in bd.length_buckets([7] * 300)] == [(7, 7, 300)]


def test_bucket_scores_are_sacrebleu_on_the_bucket_sentences(tmp_path: Path) -> None:
    runs, sources, refs = two_runs(tmp_path)
    found = bd.breakdown(runs, ["length"], min_sentences=25)
    lengths = [len(s.split()) for s in sources]
    sizes = {s.bucket: s.size for s in found.scores}
    assert sum(sizes.values()) == len(sources) and min(sizes.values()) >= 25 and len(sizes) > 1
    for s in found.scores:
        chosen = [i for i, n in enumerate(lengths) if s.low <= n <= s.high]
        assert len(chosen) == s.size
        hyps = (tmp_path / s.run / "eval" / "test2016.en.best.beam5.hyp").read_text(encoding="utf-8").splitlines()
        metric = BLEU() if s.metric == "BLEU" else CHRF()
        expected = metric.corpus_score([hyps[i] for i in chosen], [[refs[i] for i in chosen]]).score
        assert s.score == pytest.approx(expected)
        assert s.mean - 3 * s.ci < s.score < s.mean + 3 * s.ci
    # b is far better: every bucket says so, p-values corrected upwards but still small.
    better = [s for s in found.scores if s.run == "b"]
    assert all(s.p <= s.p_holm < 0.05 for s in better)
    assert all(s.note == "baseline" and s.p is None for s in found.scores if s.run == "a")


def test_word_f_measure_by_hand(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    train = ["ein Hund läuft .", "ein Hund schläft .", "ein Mann läuft ."]
    (data / "train.en").write_text("x\n" * 3, encoding="utf-8")
    (data / "train.de").write_text("".join(f"{line}\n" for line in train), encoding="utf-8")
    (data / "test2016.en").write_text("a dog sleeps .\n", encoding="utf-8")
    (data / "test2016.de").write_text("ein Hund schläft .\n", encoding="utf-8")
    base = scored_run(tmp_path, "base", ["ein Hund schläft ."])
    # 13a splits the comma off: "Katze" and "," never occur in training (bucket 0).
    run = scored_run(tmp_path, "run", ["Ein Katze, schläft schläft ."])
    found = bd.breakdown([base, run], ["frequency"], n_samples=50)
    got = {s.bucket: (s.size, s.hyp_words, s.matches, s.precision, s.recall, s.score)
           for s in found.scores if s.run == "run"}
    # Training counts: ein 3, . 3, Hund 2, läuft 2, schläft 1, Mann 1; case kept, so "Ein" is unseen.
    assert got == {
        "0": (0, 3, 0, 0.0, None, 0.0),  # Ein, Katze, ",": not in the reference
        "1": (1, 2, 1, 50.0, 100.0, pytest.approx(200 * 0.5 * 1 / 1.5)),  # schläft twice, matched once
        "2": (1, 0, 0, None, 0.0, 0.0),  # Hund missed
        "3": (2, 1, 1, 100.0, 50.0, pytest.approx(200 * 1 * 0.5 / 1.5)),  # "." matched, "ein" missed
    }
    assert {s.bucket: s.score for s in found.scores if s.run == "base"} == {"0": 0.0, "1": 100.0, "2": 100.0,
                                                                           "3": 100.0}
    # Output like the baseline's gets no p-value (sacreBLEU's test would give it its smallest one).
    same = scored_run(tmp_path, "same", ["ein Hund schläft ."])
    unseen = scored_run(tmp_path, "unseen", ["ein Hund schläft . Katze"])  # differs only in bucket 0's precision
    found = bd.breakdown([base, same, unseen], ["frequency"], n_samples=50)
    notes = {(s.run, s.bucket): (s.p, s.note) for s in found.scores}
    assert notes["same", "1"] == (None, "identical to the baseline's output")
    assert notes["unseen", "0"] == notes["unseen", "3"] == (None, "same as the baseline on every resample")


def test_word_f_measure_counts_the_words_bleu_counts(tmp_path: Path) -> None:
    # Under tok:none (text tokenized already) a word is what the spaces give: three words, each seen
    # once in training. 13a splits the comma and the dots off: u s Katze , läuft once, "." three times.
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.en").write_text("x\n", encoding="utf-8")
    (data / "train.de").write_text("u.s. Katze,. läuft\n", encoding="utf-8")
    (data / "test2016.en").write_text("a\n", encoding="utf-8")
    (data / "test2016.de").write_text("u.s. Katze,. läuft\n", encoding="utf-8")
    for tokenize, buckets in (("none", {"1": 3}), ("13a", {"1": 5, "3": 3})):
        root = tmp_path / tokenize
        root.mkdir()
        (root / "data").symlink_to(data)
        run = scored_run(root, "run", ["u.s. Katze,. läuft"], train={"seed": 1})
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        cfg["data"]["bleu_tokenize"] = tokenize
        (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        found = bd.breakdown([run], ["frequency"], n_samples=20)
        assert {s.bucket: s.size for s in found.scores} == buckets
        said = "the tokens given, split at spaces (tok:none)" in bd.render_breakdown(found, "md")
        assert said == (tokenize == "none")


def test_holm_correction() -> None:
    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1, never below the one before: 0.03, 0.06, 0.06.
    assert bd.holm([0.04, 0.01, None, 0.03]) == pytest.approx([0.06, 0.03, None, 0.06])
    assert bd.holm([0.5, 0.9]) == [1.0, 1.0] and bd.holm([]) == []


def test_corrected_p_values_are_holm_over_each_runs_buckets(tmp_path: Path) -> None:
    runs, _, refs = two_runs(tmp_path)
    runs.append(scored_run(tmp_path, "c", corrupt(refs, 0.38, 3)))  # close to the baseline: large p-values
    found = bd.breakdown(runs, ["length", "frequency"], min_sentences=25, n_samples=300)
    for kind in ("length", "frequency"):
        for run in ("b", "c"):
            for metric in {s.metric for s in found.scores if s.breakdown == kind}:
                family = [s for s in found.scores if (s.breakdown, s.run, s.metric) == (kind, run, metric)]
                assert [s.p_holm for s in family] == pytest.approx(bd.holm([s.p for s in family]))
    text = bd.render_breakdown(found, "md")
    # The star goes by the corrected p-value, which is shown beside the uncorrected one.
    for s in found.scores:
        if s.p is not None:
            star = "*" if s.p_holm <= 0.05 else ""
            assert f"{s.p:.4f} ({s.p_holm:.4f}{star})" in text


def test_formats_and_plot_from_the_command_line(tmp_path: Path) -> None:
    runs, sources, _ = two_runs(tmp_path)
    png = tmp_path / "buckets.png"
    args = ["report", *map(str, runs), "--breakdown", "length", "--breakdown", "frequency", "--bucket-min", "30"]
    md = runner.invoke(app, [*args, "--plot-breakdown", str(png), "--baseline", "b"])
    assert md.exit_code == 0, md.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p-values against b" in md.stdout and "| source words | sentences |" in md.stdout
    assert "| training frequency | reference words |" in md.stdout
    rows = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)
    table = list(csv.DictReader(io.StringIO(runner.invoke(app, [*args, "--format", "csv"]).stdout)))
    assert len(rows) == len(table) and [r["score"] for r in rows] == [float(r["score"]) for r in table]
    length = {r["bucket"]: r["size"] for r in rows if r["breakdown"] == "length"}
    assert sum(length.values()) == len(sources) and min(length.values()) >= 30
    words = {r["bucket"]: r["size"] for r in rows if r["breakdown"] == "frequency"}
    refs = (tmp_path / "data" / "test2016.de").read_text(encoding="utf-8").split()
    assert sum(words.values()) == len(refs)  # every reference word in one bucket
    assert {r["run"] for r in rows} == {"a", "b"} and {r["metric"] for r in rows} == {"BLEU", "chrF2", "F"}


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    return result.stderr


def test_bad_inputs_are_one_line(tmp_path: Path) -> None:
    runs, _, refs = two_runs(tmp_path)
    a, b = map(str, runs)
    old = make_run(tmp_path, "old")  # evaluated before nmt eval kept the hypotheses
    error = one_line_error(["report", a, str(old), "--breakdown", "length"])
    assert f"{old}: its record keeps no hypotheses" in error and f"nmt eval --model {old} --src " in error
    assert "test2016.en --ref " in error  # the recipe's test split, to evaluate on
    changed = scored_run(tmp_path, "changed", corrupt(refs, 0.3, 5))
    (changed / "eval" / "test2016.en.best.beam5.hyp").write_text("edited\n" * len(refs), encoding="utf-8")
    assert "changed since it was scored" in one_line_error(["report", a, str(changed), "--breakdown", "length"])
    assert "choose length or frequency" in one_line_error(["report", a, "--breakdown", "width"])
    assert "--breakdown" in one_line_error(["report", a, "--plot-breakdown", str(tmp_path / "x.png")])
    assert "--plot is for the cost table" in one_line_error(["report", a, "--breakdown", "length", "--plot", "x.png"])
    # The data it needs: the training targets (frequency), the reference and the source.
    (tmp_path / "data" / "train.de").unlink()
    error = one_line_error(["report", a, b, "--breakdown", "frequency"])
    assert "train.de (data.train) is missing" in error and "NMT_DATA" in error
    (tmp_path / "data" / "test2016.de").unlink()
    error = one_line_error(["report", a, b, "--breakdown", "length"])
    assert "the test reference" in error and "test2016.de" in error and "NMT_DATA" in error


def test_runs_on_different_test_sets_are_refused(tmp_path: Path) -> None:
    _, refs = write_data(tmp_path / "one")
    _, others = write_data(tmp_path / "two", seed=1)
    a = scored_run(tmp_path / "one", "a", corrupt(refs, 0.3, 1))
    c = scored_run(tmp_path / "two", "c", corrupt(others, 0.3, 1))
    error = one_line_error(["report", str(a), str(c), "--breakdown", "length"])
    assert "one test set" in error and "a was scored on" in error


@pytest.mark.skipif(shared_data() is None, reason="NMT_DATA does not hold multi30k/ (nmt data multi30k)")
def test_committed_multi30k_runs() -> None:
    runs = [COMMITTED / name for name in ("transformer-seed1", "gnmt-seed1", "gnmt-seed2")]
    found = bd.breakdown(runs, ["length", "frequency"], n_samples=200)
    length = {s.bucket: s.size for s in found.scores if s.breakdown == "length"}
    assert sum(length.values()) == 1000 and min(length.values()) >= 100
    # Every reference word in one frequency bucket: as many as BLEU counted (its ref_len).
    record = json.loads((runs[0] / "eval" / "test2016.en.best.beam5.json").read_text(encoding="utf-8"))
    ref_len = int(re.search(r"ref_len = (\d+)", record["BLEU"]["line"]).group(1))
    assert sum({s.bucket: s.size for s in found.scores if s.breakdown == "frequency"}.values()) == ref_len
    # Frequent words are translated better than rare ones, by every model.
    for run in found.runs:
        f = {s.bucket: s.score for s in found.scores if s.run == run and s.metric == "F"}
        assert f["1000+"] > f["10-99"] > f["0"]
    assert Counter(s.run for s in found.scores) == Counter({run: len(found.scores) // 3 for run in found.runs})
