"""nmt report on hand-written run directories: the numbers it derives, its formats and refusals."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from nmt import report
from nmt.errors import NmtError
from nmt.tokenizer import file_sha256

runner = CliRunner()


def make_run(root: Path, name: str, kind: str = "transformer", finished: bool = True, spm: bytes = b"spm-A",
             ref: str | None = None) -> Path:
    """A run whose valid BLEU goes 10 -> 22 -> 27 at 5, 10, 15 training minutes (best.pt: step 300).

    Its recipe's test split is ``root/data/test2016``, evaluated with best.pt at beam 5
    (BLEU 30.5); ``ref`` replaces the reference's sha256 in that record.
    """
    run = root / name
    (run / "eval").mkdir(parents=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    for split in ("test2016", "valid"):
        (data / f"{split}.en").write_text(f"{split} source\n", encoding="utf-8")
        (data / f"{split}.de").write_text(f"{split} reference\n", encoding="utf-8")
    recipe = {"data": {"dir": str(data), "test": "test2016"}, "model": {"kind": kind}, "search": {"beam": 5}}
    (run / "config.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (run / "spm.model").write_bytes(spm)
    records = [{"event": "start", "step": 0, "params": 1234, "device": "cpu", "world_size": 2,
                "precision": "bf16", "effective_batch_tokens": 8192}]
    for i, (bleu, tok_s) in enumerate([(10.0, 900.0), (22.0, 1100.0), (27.0, 1000.0)], 1):
        records.append({"event": "train", "step": 100 * i, "epoch": i, "loss": 3.0, "tokens_per_s": tok_s,
                        "train_seconds": 300.0 * i, "valid_seconds": 20.0 * (i - 1)})
        records.append({"event": "valid", "step": 100 * i, "epoch": i, "valid_bleu": bleu,
                        "train_seconds": 300.0 * i, "valid_seconds": 20.0 * i})
    if finished:
        records.append({"event": "end", "step": 300, "train_seconds": 900.0, "valid_seconds": 60.0})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    add_eval(run, "test2016", 30.5, ref_sha256=ref)
    return run


def add_eval(run: Path, split: str, bleu: float, checkpoint: str = "best", step: int | None = 300,
             int8: bool = False, ref_sha256: str | None = None, age: int = 0) -> None:
    """An eval/*.json as nmt eval --model writes it, ``age`` seconds older than the newest."""
    data = run.parent / "data"
    src, ref = data / f"{split}.en", data / f"{split}.de"
    record = {"BLEU": {"score": bleu, "signature": "nrefs:1|tok:13a"}, "chrF2": {"score": 55.25, "signature": "x"},
              "src": str(src), "src_sha256": file_sha256(src), "ref": str(ref),
              "ref_sha256": ref_sha256 or file_sha256(ref), "checkpoint": checkpoint, "beam": 5,
              "int8": int8, "sentences_per_s": 42.0}
    if step is not None:
        record["checkpoint_step"] = step
    path = run / "eval" / f"{split}.en.{checkpoint}.beam5{'.int8' if int8 else ''}.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    newest = max(p.stat().st_mtime for p in (run / "eval").glob("*.json"))
    os.utime(path, (newest + 1 - age, newest + 1 - age))


def test_time_to_target_and_training_time_without_validation(tmp_path: Path) -> None:
    row = report.summarize(make_run(tmp_path, "a"), target=20.0)
    assert row.time_to_target_minutes == pytest.approx(10.0)  # first reached at 600 s of training
    assert row.train_minutes == pytest.approx(15.0) and row.valid_minutes == pytest.approx(1.0)
    assert row.tokens_per_s == 1000.0 and row.best_valid_bleu == 27.0
    assert (row.test_bleu, row.test_chrf, row.decode_sent_per_s) == (30.5, 55.25, 42.0)
    assert (row.ranks, row.precision, row.effective_batch, row.status) == (2, "bf16", 8192, "finished")
    assert report.summarize(make_run(tmp_path, "b"), target=28.0).time_to_target_minutes is None


def test_bleu_at_equal_training_times(tmp_path: Path) -> None:
    row = report.summarize(make_run(tmp_path, "a"), at=[4, 5, 12, 15, 30])
    # Nothing validated by 4 min; the best so far at 5, 12 and 15; the run never reached 30.
    assert row.bleu_at == {"4": None, "5": 10.0, "12": 22.0, "15": 27.0, "30": None}
    text = report.render([row], "md")
    assert "| a | transformer | – | 10.00 | 22.00 | 27.00 | – |" in text


def test_csv_and_json_parse_back_to_the_same_numbers(tmp_path: Path) -> None:
    rows = [report.summarize(make_run(tmp_path, "a"), 20.0, [10]),
            report.summarize(make_run(tmp_path, "g", "gnmt"), 20.0, [10])]
    parsed = json.loads(report.render(rows, "json"))
    assert [r["test_bleu"] for r in parsed] == [30.5, 30.5] and parsed[1]["model"] == "gnmt"
    assert parsed[0]["valid_bleu_at_10min"] == 22.0
    table = list(csv.DictReader(io.StringIO(report.render(rows, "csv"))))
    assert float(table[0]["time_to_target_minutes"]) == rows[0].time_to_target_minutes
    assert float(table[1]["train_minutes"]) == rows[1].train_minutes
    assert float(table[1]["valid_bleu_at_10min"]) == 22.0


def test_bad_minutes_for_at_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(make_run(tmp_path, "a")), "--at", "10,soon"])
    assert result.exit_code != 0 and "--at 10,soon" in result.stderr and "Traceback" not in result.output


def test_unfinished_run_is_reported_as_such(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(make_run(tmp_path, "a", finished=False))])
    assert result.exit_code == 0 and "a (unfinished)" in result.stdout


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_log_is_one_clear_line(tmp_path: Path, damage: str) -> None:
    run = make_run(tmp_path, "a")
    if damage == "missing":
        (run / "log.jsonl").unlink()
    else:
        lines = (run / "log.jsonl").read_text().splitlines()
        lines[3] = lines[3][:20]  # a damaged record in the middle
        (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("nmt: error: ") and "log.jsonl" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if damage == "corrupt":
        assert "log.jsonl:4:" in result.stderr


def test_a_record_cut_off_at_the_end_is_left_out(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", finished=False)
    with (run / "log.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 4')  # the run was killed while writing
    row = report.summarize(run)
    assert row.status == "unfinished" and row.steps == 300


def test_runs_with_different_tokenizers_or_test_sets_are_refused(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", spm=b"spm-B")
    refused = runner.invoke(app, ["report", str(a), str(b)])
    assert refused.exit_code == 1 and "different SentencePiece models (a; b)" in refused.stderr
    assert runner.invoke(app, ["report", str(a), str(b), "--allow-mixed"]).exit_code == 0
    c = make_run(tmp_path, "c", ref="ref-sha-2")
    with pytest.raises(NmtError, match="different test sets"):
        report.check_comparable([report.summarize(a), report.summarize(c)])


def test_plot_is_a_png(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "g", "gnmt")]
    out = tmp_path / "bleu.png"
    result = runner.invoke(app, ["report", *map(str, runs), "--plot", str(out), "--target", "25", "--speed"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_attention_plot_for_both_model_kinds(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "att.png"
    result = runner.invoke(app, ["attention", "-m", str(trained_run), "--text", "red dog runs", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Hund" in result.stdout and out.read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_run_is_not_reported_finished(tmp_path: Path) -> None:
    from nmt.train import JsonLog

    run = make_run(tmp_path, "a")
    assert report.summarize(run).status == "finished"
    JsonLog(run / "log.jsonl").truncate_after(300)  # what resuming from last.pt at step 300 does
    assert report.summarize(run).status == "unfinished"  # until the resumed run writes its own end
    assert runner.invoke(app, ["report", str(run)]).stdout.count("a (unfinished)") == 1


def test_rerunning_a_finished_run_keeps_it_finished(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    from nmt import config
    from nmt.train import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    train(config.load_recipe(run / "config.yaml"), run, progress_bar=False)  # nothing left to train
    records = report.read_log(run / "log.jsonl")
    assert [r["event"] for r in records].count("end") == 1 and records[-1]["event"] == "end"
    assert report.summarize(run).status == "finished"


def test_test_bleu_is_the_recipe_test_split_with_the_best_checkpoint(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a")
    add_eval(run, "valid", 99.0)  # newer, but the valid split
    add_eval(run, "test2016", 88.0, checkpoint="last")  # newer, but not the best checkpoint
    add_eval(run, "test2016", 77.0, int8=True)  # newer, but int8 decoding
    row = report.summarize(run)
    assert (row.test_bleu, row.test_source, row.test_checkpoint, row.test_note) == (30.5, "test2016.en",
                                                                                   "best step 300", "")
    assert "\\* not the recipe's test split" not in report.render([row], "md")


def test_report_says_which_evaluation_it_shows_when_the_expected_one_is_missing(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a")
    (run / "eval" / "test2016.en.best.beam5.json").unlink()
    add_eval(run, "valid", 19.0)
    row = report.summarize(run)
    assert row.test_bleu == 19.0
    assert row.test_note == "valid.en -> valid.de, not the recipe's test split test2016.en"
    text = report.render([row], "md")
    assert "19.00 *" in text and "- a: test BLEU of valid.en -> valid.de, not the recipe's test split" in text
    assert json.loads(report.render([row], "json"))[0]["test_note"] == row.test_note


def test_an_evaluation_of_an_older_best_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a")
    add_eval(run, "test2016", 25.0, step=200)  # best.pt of step 200, since replaced by step 300's
    (run / "eval" / "test2016.en.best.beam5.json").rename(run / "eval" / "old.json")
    add_eval(run, "valid", 19.0, step=300)
    row = report.summarize(run)
    assert row.test_bleu == 25.0  # the test split outranks the checkpoint
    assert row.test_note == "checkpoint best at step 200, not best.pt (step 300)"


def test_records_written_before_provenance_are_read(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a")
    record_path = run / "eval" / "test2016.en.best.beam5.json"
    record = json.loads(record_path.read_text())
    for key in ("src_sha256", "checkpoint_step", "int8"):
        del record[key]
    record_path.write_text(json.dumps(record))
    row = report.summarize(run)
    assert (row.test_bleu, row.test_checkpoint, row.test_note) == (30.5, "best", "")


def test_report_of_a_real_run_after_two_evaluations(trained_run: Path, corpus: Path, tmp_path: Path) -> None:
    import shutil

    from nmt import checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval"))
    for split in ("test", "valid"):  # the valid split last, as a user checking a number might
        result = runner.invoke(app, ["eval", "--model", str(run), "--src", str(corpus / f"{split}.en"),
                                     "--ref", str(corpus / f"{split}.de"), "--beam", "1"])
        assert result.exit_code == 0, result.output
    saved = json.loads((run / "eval" / "test.en.best.beam1.json").read_text())
    assert saved["src_sha256"] == file_sha256(corpus / "test.en")
    assert saved["checkpoint_sha256"] == file_sha256(run / "best.pt")
    assert saved["checkpoint_step"] == checkpoint.load(run / "best.pt")["step"]
    row = report.summarize(run)
    assert row.test_source == "test.en" and row.test_bleu == saved["BLEU"]["score"] and row.test_note == ""
