"""nmt report on hand-written run directories: the numbers it derives, its formats and refusals."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import overlapped, stub_nmt
from typer.testing import CliRunner

from cli.main import app
from nmt import report, runlog
from nmt.errors import NmtError
from nmt.files import sha256 as file_sha256

runner = CliRunner()


def make_run(root: Path, name: str, kind: str = "transformer", finished: bool = True, spm: bytes = b"spm-A",
             ref: str | None = None, seed: int = 1, valid: tuple[float, float, float] = (10.0, 22.0, 27.0),
             test_bleu: float = 30.5, cpu: str | None = "AMD EPYC (2 cores)", train: dict | None = None,
             cpu_kind: str | None = None, resumed_on: dict | None = None) -> Path:
    """A run whose valid BLEU goes 10 -> 22 -> 27 (or ``valid``) at 5, 10, 15 training minutes (best.pt: step 300).

    Its recipe (named after ``kind``, with ``train.seed`` = ``seed`` and ``train``'s keys) has the
    test split ``root/data/test2016`` (written by the first run of ``root``), evaluated with best.pt
    at beam 5 (BLEU ``test_bleu``); ``ref`` replaces the reference's sha256 in that record. ``cpu``:
    the start record's CPU, None for a log written before nmt recorded it; ``cpu_kind`` likewise.
    ``resumed_on``: the hardware of a resume record at step 200.
    """
    run = root / name
    (run / "eval").mkdir(parents=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    for split in ("test2016", "valid"):
        for lang, text in (("en", "source"), ("de", "reference")):
            if not (data / f"{split}.{lang}").exists():
                (data / f"{split}.{lang}").write_text(f"{split} {text}\n", encoding="utf-8")
    recipe = {"name": f"recipe-{kind}", "data": {"dir": str(data), "test": "test2016"}, "model": {"kind": kind},
              "train": {"seed": seed, **(train or {})}, "search": {"beam": 5}}
    (run / "config.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    (run / "spm.model").write_bytes(spm)
    records = [{"event": "start", "step": 0, "params": 1234, "device": "cpu", "world_size": 2,
                "precision": "bf16", "effective_batch_tokens": 8192, **({"cpu": cpu} if cpu else {}),
                **({"cpu_kind": cpu_kind} if cpu_kind else {})}]
    for i, (bleu, tok_s) in enumerate(zip(valid, [900.0, 1100.0, 1000.0]), 1):
        records.append({"event": "train", "step": 100 * i, "epoch": i, "loss": 3.0, "tokens_per_s": tok_s,
                        "train_seconds": 300.0 * i, "valid_seconds": 20.0 * (i - 1)})
        records.append({"event": "valid", "step": 100 * i, "epoch": i, "valid_bleu": bleu,
                        "train_seconds": 300.0 * i, "valid_seconds": 20.0 * i})
        if resumed_on and i == 2:
            records.append({"event": "resume", "step": 200, **resumed_on})
    if finished:
        records.append({"event": "end", "step": 300, "train_seconds": 900.0, "valid_seconds": 60.0})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    add_eval(run, "test2016", test_bleu, ref_sha256=ref)
    return run


def add_eval(run: Path, split: str, bleu: float, checkpoint: str = "best", step: int | None = 300,
             int8: bool = False, ref_sha256: str | None = None, age: int = 0, shortlist: str = "") -> None:
    """An eval/*.json as nmt eval --model writes it, ``age`` seconds older than the newest."""
    data = run.parent / "data"
    src, ref = data / f"{split}.en", data / f"{split}.de"
    record = {"BLEU": {"score": bleu, "signature": "nrefs:1|tok:13a"}, "chrF2": {"score": 55.25, "signature": "x"},
              "src": str(src), "src_sha256": file_sha256(src), "ref": str(ref),
              "ref_sha256": ref_sha256 or file_sha256(ref), "checkpoint": checkpoint, "beam": 5,
              "int8": int8, "sentences_per_s": 42.0, "search": {"shortlist": shortlist}}
    if step is not None:
        record["checkpoint_step"] = step
    tags = (".int8" if int8 else "") + (f".shortlist{shortlist.replace(',', '-')}" if shortlist else "")
    path = run / "eval" / f"{split}.en.{checkpoint}.beam5{tags}.json"
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
    # The table says which target it timed.
    assert "| to valid BLEU 20 (min) |" in report.render([row], "md")


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
    assert float(table[0]["target"]) == 20.0 and parsed[1]["target"] == 20.0
    assert float(table[1]["train_minutes"]) == rows[1].train_minutes
    assert float(table[1]["valid_bleu_at_10min"]) == 22.0


def with_load(run: Path, others: list[float]) -> Path:
    """Give each train record of ``run``'s log CPU figures in which other processes took ``others[i]`` of the
    cores' time (2 cores over the window's 300 s; the run itself used 1.5 cores)."""
    lines, window = [], iter(others)
    for r in runlog.read(run / "log.jsonl"):
        if r["event"] == "train":
            share = next(window)
            r.update(cpu_seconds=450.0, machine_core_seconds=600.0, machine_busy_seconds=450.0 + share * 600.0)
        lines.append(json.dumps(r))
    (run / "log.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run


def test_a_run_that_shared_its_machine_has_its_wall_clock_figures_marked(tmp_path: Path) -> None:
    shared = report.summarize(with_load(make_run(tmp_path, "a"), [0.0, 0.5, 0.02]), 20.0, [10])
    alone = report.summarize(with_load(make_run(tmp_path, "b"), [0.0, 0.02, 0.09]), 20.0, [10])
    unknown = report.summarize(make_run(tmp_path, "c"), 20.0, [10])  # logged before nmt recorded CPU figures
    assert (shared.machine_use, shared.loaded_windows) == ("shared", pytest.approx(1 / 3))
    assert (alone.machine_use, alone.loaded_windows) == ("alone", 0.0)
    assert (unknown.machine_use, unknown.loaded_windows) == ("", None)
    text = report.render([shared, alone, unknown], "md")
    # Training minutes, tokens/s and time to target of the shared run are marked; its steps and BLEU are not.
    assert "| 300 | 3 | 15.0 † | 1.0 | 1,000 † | 27.00 | 30.50 | 55.25 | 10.0 † | 42.0 | shared (33% of windows) † |" \
        in text
    assert "| 300 | 3 | 15.0 | 1.0 | 1,000 | 27.00 | 30.50 | 55.25 | 10.0 | 42.0 | alone |" in text
    assert "| 10.0 | 42.0 | – |" in text
    assert "| a | transformer | 22.00 † |" in text and "| b | transformer | 22.00 |" in text
    assert "† shared the machine with other work: a (33% of windows). Its wall-clock figures" in text
    assert "more than 10% of the cores' time" in text and "more than 5% of the run's windows" in text
    flat = json.loads(report.render([shared, alone], "json"))
    assert [r["machine_use"] for r in flat] == ["shared", "alone"]
    # A seed group with a member that shared the machine has its wall-clock means marked too.
    loads = ((1, [0, 0.5, 0.5]), (2, [0, 0, 0]))
    seeds = [with_load(make_run(tmp_path / "g", f"s{i}", seed=i), load) for i, load in loads]
    grouped = runner.invoke(app, ["report", *map(str, seeds), "--group-seeds", "--target", "20", "--at", "10"])
    assert grouped.exit_code == 0, grouped.output
    assert "| 10.0 ± 0.0 † |" in grouped.stdout and "| 22.00 ± 0.00 † |" in grouped.stdout


def ended(run: Path, reason: str, steps: int = 300) -> Path:
    """Give ``run``'s end record the reason ``nmt train`` writes (and the update it stopped at)."""
    records = [r for r in runlog.read(run / "log.jsonl")]
    records[-1].update(reason=reason, step=steps)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return run


def test_curves_read_by_updates_say_how_each_run_ended(tmp_path: Path) -> None:
    """Valid BLEU 10, 22, 27 at updates 100, 200, 300: by 150 updates 10, by 300 27, by 400 not reached."""
    converged = ended(make_run(tmp_path, "a", seed=1), "no better valid BLEU in 6 validations (train.patience)")
    capped = ended(make_run(tmp_path, "b", seed=2, valid=(12.0, 20.0, 26.0)), "reached train.max_steps=300")
    running = make_run(tmp_path, "c", seed=3, finished=False)
    plot = tmp_path / "updates.png"
    args = ["report", str(converged), str(capped), str(running), "--target", "20", "--at-updates", "150,300,400"]
    result = runner.invoke(app, [*args, "--group-seeds", "--plot-updates", str(plot)])
    assert result.exit_code == 0, result.output
    assert "| a | transformer | 27.00 (300) | 200 | 10.00 | 27.00 | – | converged: no better valid BLEU in 6 " \
           "validations (train.patience), at 300 updates |" in result.stdout
    assert "| b | transformer | 26.00 (300) | 200 | 12.00 | 26.00 | – | at 300 updates, not converged: reached " \
           "train.max_steps=300 |" in result.stdout
    assert "| c | transformer | 27.00 (300) | 200 | 10.00 | 27.00 | – | unfinished at 300 updates |" in result.stdout
    # The three seeds of one recipe: mean ± sd by updates.
    assert "| recipe-transformer | transformer | 1, 2, 3 | 200 ± 0 | 10.67 ± 1.15 | 26.67 ± 0.58 | – |" \
        in result.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"
    row = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)[1]
    assert (row["valid_bleu_at_150updates"], row["valid_bleu_at_400updates"]) == (12.0, None)
    assert row["updates_to_target"] == 200 and row["ended"] == "reached train.max_steps=300"
    bad = runner.invoke(app, ["report", str(converged), "--at-updates", "1000,soon"])
    assert bad.exit_code != 0 and len(bad.stderr.strip().splitlines()) == 1 and "--at-updates 1000,soon" in bad.stderr


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
    from nmt.runlog import RunLog

    run = make_run(tmp_path, "a")
    assert report.summarize(run).status == "finished"
    RunLog(run / "log.jsonl").truncate_after(300)  # what resuming from last.pt at step 300 does
    assert report.summarize(run).status == "unfinished"  # until the resumed run writes its own end
    assert runner.invoke(app, ["report", str(run)]).stdout.count("a (unfinished)") == 1
    # Stopped again right after it resumed: its training time is still the time it trained.
    with open(run / "log.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps({"event": "resume", "step": 300, "cpu": "AMD EPYC (2 cores)"}) + "\n")
    assert (report.summarize(run).train_minutes, report.summarize(run).valid_minutes) == (15.0, 1.0)


def test_rerunning_a_finished_run_keeps_it_finished(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    from nmt import config
    from nmt.train import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    train(config.load_recipe(run / "config.yaml"), run, progress_bar=False)  # nothing left to train
    records = runlog.read_run(run / "log.jsonl")
    assert [r["event"] for r in records].count("end") == 1 and records[-1]["event"] == "end"
    assert report.summarize(run).status == "finished"


def test_test_bleu_is_the_recipe_test_split_with_the_best_checkpoint(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a")
    add_eval(run, "valid", 99.0)  # newer, but the valid split
    add_eval(run, "test2016", 88.0, checkpoint="last")  # newer, but not the best checkpoint
    add_eval(run, "test2016", 77.0, int8=True)  # newer, but int8 decoding
    add_eval(run, "test2016", 66.0, shortlist="100,100")  # newer, but over a shortlist
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
    # The hypotheses are kept with their hash, so the report can test them later.
    hyp = run / "eval" / saved["hyp"]
    assert saved["hyp_sha256"] == file_sha256(hyp) and row.test_hyp == str(hyp)
    (tested,), _ = report.significance([row])
    assert tested.test_bleu_mean is not None and tested.test_bleu_ci > 0 and tested.significance_note == "baseline"


def test_a_run_records_the_cpu_it_trained_on(trained_run: Path) -> None:
    import torch

    from nmt.hardware import hardware

    start = runlog.read_run(trained_run / "log.jsonl")[0]
    assert start["event"] == "start" and start["cpu"] == hardware(torch.device("cpu"))["cpu"]
    assert start["cpu_kind"] == hardware(torch.device("cpu"))["cpu_kind"]
    assert start["cpu_kind"].endswith(torch.backends.cpu.get_cpu_capability())
    assert report.summarize(trained_run).cpu == start["cpu"] and "cores)" in start["cpu"]


def test_runs_on_different_cpus_are_refused_unless_mixed_is_allowed(tmp_path: Path) -> None:
    a = make_run(tmp_path, "a", cpu="AMD EPYC (2 cores)")
    b = make_run(tmp_path, "b", cpu="Intel Xeon (16 cores)")
    refused = runner.invoke(app, ["report", str(a), str(b)])
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "a on AMD EPYC (2 cores); b on Intel Xeon (16 cores)" in refused.stderr
    allowed = runner.invoke(app, ["report", str(a), str(b), "--allow-mixed"])
    assert allowed.exit_code == 0 and "Trained on: AMD EPYC (2 cores); Intel Xeon (16 cores)" in allowed.stdout
    old = make_run(tmp_path, "old", cpu=None)  # logged before the CPU was recorded: compared, with a note
    result = runner.invoke(app, ["report", str(a), str(old)])
    assert result.exit_code == 0 and "CPU not recorded" in result.stdout and ": old" in result.stdout


def test_one_cpu_name_over_two_cpu_kinds_is_refused(tmp_path: Path) -> None:
    """A virtual machine may call two CPU generations "AMD EPYC": the kind tells them apart."""
    zen1 = make_run(tmp_path, "zen1", cpu_kind="family 23 model 1, AVX2")
    zen4 = make_run(tmp_path, "zen4", cpu_kind="family 25 model 17, AVX512")
    refused = runner.invoke(app, ["report", str(zen1), str(zen4)])
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert ("zen1 on AMD EPYC (2 cores) [family 23 model 1, AVX2]; zen4 on AMD EPYC (2 cores) "
            "[family 25 model 17, AVX512]") in refused.stderr
    same = make_run(tmp_path, "zen4b", cpu_kind="family 25 model 17, AVX512")
    alike = runner.invoke(app, ["report", str(zen4), str(same)])
    assert alike.exit_code == 0 and "Trained on: AMD EPYC (2 cores) [family 25 model 17, AVX512]\n" in alike.stdout
    assert "not recorded" not in alike.stdout
    old = make_run(tmp_path, "old")  # logged the name and cores only: matched on them, with a note
    result = runner.invoke(app, ["report", str(zen4), str(old)])
    assert result.exit_code == 0
    assert "CPU kind not recorded" in result.stdout and "cores only: old" in result.stdout
    assert report.compare([zen4, old]).rows[0].cpu_kind == "family 25 model 17, AVX512"
    parsed = json.loads(runner.invoke(app, ["report", str(zen4), str(same), "--format", "json"]).stdout)
    assert [row["cpu_kind"] for row in parsed] == ["family 25 model 17, AVX512"] * 2


def test_a_run_resumed_on_another_cpu_kind_is_refused(tmp_path: Path) -> None:
    kind = "family 25 model 17, AVX512"
    moved = make_run(tmp_path, "moved", cpu_kind=kind,
                     resumed_on={"cpu": "AMD EPYC (2 cores)", "cpu_kind": "family 23 model 1, AVX2"})
    stayed = make_run(tmp_path, "stayed", cpu_kind=kind, resumed_on={"cpu": "AMD EPYC (2 cores)", "cpu_kind": kind})
    assert report.summarize(stayed).moved_to == ""
    assert report.summarize(moved).moved_to == "AMD EPYC (2 cores) [family 23 model 1, AVX2]"
    refused = runner.invoke(app, ["report", str(stayed), str(moved)])
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "moved started on AMD EPYC (2 cores) [family 25 model 17, AVX512] and was resumed on AMD EPYC " \
        "(2 cores) [family 23 model 1, AVX2]" in refused.stderr
    allowed = runner.invoke(app, ["report", str(stayed), str(moved), "--allow-mixed"])
    assert allowed.exit_code == 0 and "Trained on more than one machine: moved (resumed on" in allowed.stdout


def test_nmt_hardware_checks_this_machine_against_runs(tmp_path: Path) -> None:
    from nmt.hardware import hardware, pick_device

    here = hardware(pick_device())
    name = ", ".join(here[key] for key in ("cpu", "gpu") if key in here)
    same = make_run(tmp_path, "same", cpu=name, cpu_kind=here["cpu_kind"])
    other = make_run(tmp_path, "other", cpu=name, cpu_kind="family 0 model 0, NONE")
    old = make_run(tmp_path, "old", cpu=name)
    ok = runner.invoke(app, ["hardware", str(same), str(old)])
    assert ok.exit_code == 0 and ok.stdout.strip() == f"{name} [{here['cpu_kind']}]"
    assert ok.stderr.strip() == f"{old}: CPU kind not recorded (logged before nmt recorded it), matched on name " \
        "and cores only"
    refused = runner.invoke(app, ["hardware", str(same), str(other)])
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert f"{other} trained on {name} [family 0 model 0, NONE], this machine is {name}" in refused.stderr


def seed_runs(root: Path) -> list[Path]:
    """Three Transformer seeds and one GNMT: valid BLEU by 10 min 22, 20, 24; test BLEU 30.5, 31.5, 29.0."""
    return [make_run(root, "t1", seed=1, valid=(10.0, 22.0, 27.0), test_bleu=30.5),
            make_run(root, "t3", seed=3, valid=(12.0, 24.0, 29.0), test_bleu=29.0),
            make_run(root, "t2", seed=2, valid=(10.0, 20.0, 25.0), test_bleu=31.5),
            make_run(root, "g1", kind="gnmt", seed=1)]


def test_seed_groups_give_mean_and_sd(tmp_path: Path) -> None:
    found = report.compare(seed_runs(tmp_path), target=21.0, at=[10], group_seeds=True)
    transformer, gnmt = found.groups
    assert (transformer.recipe, transformer.runs, transformer.seeds) == ("recipe-transformer", ["t1", "t2", "t3"],
                                                                        [1, 2, 3])
    # test BLEU 30.5, 31.5, 29.0: mean 30.333, sample sd sqrt(((1/6)² + (7/6)² + (4/3)²) / 2) = 1.2583
    assert transformer.test_bleu.mean == pytest.approx(91 / 3)
    assert transformer.test_bleu.sd == pytest.approx(1.2583, abs=1e-4)
    assert (transformer.bleu_at["10"].mean, transformer.bleu_at["10"].sd) == (22.0, pytest.approx(2.0))
    # valid BLEU 21 first reached at 10, 15 and 10 minutes
    assert transformer.time_to_target_minutes.mean == pytest.approx(35 / 3)
    assert transformer.time_to_target_minutes.sd == pytest.approx(2.8868, abs=1e-4)
    assert (gnmt.test_bleu.mean, gnmt.test_bleu.sd, gnmt.test_bleu.n) == (30.5, None, 1)
    text = report.render(found.rows, "md", found.groups, found.significance)
    assert "| recipe-transformer | transformer | 1, 2, 3 (n=3) | 27.00 ± 2.00 | 30.33 ± 1.26 |" in text
    assert "| recipe-transformer | transformer | 22.00 ± 2.00 |" in text
    parsed = json.loads(report.render(found.rows, "json", found.groups))
    assert [r["row"] for r in parsed] == ["run"] * 4 + ["group"] * 2
    assert parsed[4]["test_bleu_seed_sd"] == pytest.approx(1.2583, abs=1e-4)
    assert parsed[4]["valid_bleu_at_10min_seed_n"] == 3 and parsed[4]["runs"] == "t1 t2 t3"
    table = list(csv.DictReader(io.StringIO(report.render(found.rows, "csv", found.groups))))
    assert float(table[4]["time_to_target_minutes_seed_mean"]) == pytest.approx(35 / 3) and table[0]["run"] == "t1"


def test_seed_grouping_refuses_runs_that_differ_in_another_key(tmp_path: Path) -> None:
    a = make_run(tmp_path, "a", seed=1)
    b = make_run(tmp_path, "b", seed=2, train={"lr": 0.002})
    assert runner.invoke(app, ["report", str(a), str(b)]).exit_code == 0  # not grouped, nothing to refuse
    result = runner.invoke(app, ["report", str(a), str(b), "--group-seeds"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "differ in train.lr" in result.stderr and "Traceback" not in result.output


def test_mean_curve_interpolates_over_the_common_time() -> None:
    times, mean, low, high = report.mean_curve([([5.0, 10.0, 15.0], [10.0, 20.0, 30.0]),
                                                ([4.0, 12.0], [0.0, 16.0])])
    assert times == [5.0, 10.0, 12.0]  # from the later start to the earlier end
    assert mean == pytest.approx([(10 + 2) / 2, (20 + 12) / 2, (24 + 16) / 2])
    assert low == pytest.approx([2.0, 12.0, 16.0]) and high == pytest.approx([10.0, 20.0, 24.0])


def test_plot_of_seed_groups_is_a_png(tmp_path: Path) -> None:
    out = tmp_path / "bleu.png"
    result = runner.invoke(app, ["report", *map(str, seed_runs(tmp_path)), "--group-seeds", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "multi30k"


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
@pytest.mark.parametrize("tgt", ["fr", "cs"])
def test_recipes_for_more_language_pairs_match_the_en_de_ones(kind: str, tgt: str) -> None:
    from nmt import config

    cfg = config.load_recipe(RECIPES / f"{kind}-en-{tgt}.yaml")
    en_de = config.load_recipe(RECIPES / f"{kind}.yaml")
    assert (cfg.data.src_lang, cfg.data.tgt_lang, cfg.data.test) == ("en", tgt, "test2016")
    assert cfg.name == f"{en_de.name}-en-{tgt}" and cfg.tokenizer.reuse is None  # a SentencePiece model of its own
    assert (cfg.model, cfg.train, cfg.search, cfg.tokenizer) == (en_de.model, en_de.train, en_de.search,
                                                                 en_de.tokenizer)


def test_converge_script_trains_by_updates_and_evaluates_only_what_stopped_on_its_own(tmp_path: Path) -> None:
    import subprocess

    script = RECIPES / "converge.sh"
    out = tmp_path / "out"
    done = out / "gnmt-seed1"  # stopped by its patience: evaluated, not trained again
    done.mkdir(parents=True)
    (done / "log.jsonl").write_text(json.dumps({"event": "end", "step": 4000, "reason":
                                                "no better valid BLEU in 6 validations (train.patience)"}) + "\n")
    capped = out / "transformer-seed2"  # stopped at an older, lower cap: trained on
    capped.mkdir(parents=True)
    (capped / "log.jsonl").write_text(json.dumps({"event": "end", "step": 500,
                                                  "reason": "reached train.max_steps=500"}) + "\n")
    env = stub_nmt(tmp_path, train_s=1, OUT=str(out), JOBS="2", CAP="8000")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    trains = sorted(c for c in calls if c.startswith("train "))
    assert len(trains) == 3 and not [c for c in trains if f"{done} " in c + " "]
    assert all("train.max_minutes=0" in c and "train.max_steps=8000" in c and "train.patience=6" in c
               and "train.threads=1" in c for c in trains)
    assert overlapped(tmp_path) == 2  # JOBS=2: two runs at a time, never three
    # Only the run that ended by itself is scored; the others stopped without an end record (a signal).
    assert [c for c in calls if c.startswith("eval ")] == [c for c in calls if c.startswith(f"eval --model {done} ")]
    assert len([c for c in calls if c.startswith("eval ")]) == 1
    report = next(c for c in calls if c.startswith("report ") and "--plot-updates" in c)
    assert "--at-updates 1000,2000" in report and all(f"{out}/{r} " in report + " " for r in
                                                      ("transformer-seed1", "gnmt-seed2", "transformer-seed2"))
    breakdown = next(c for c in calls if c.startswith("report ") and "--breakdown" in c)
    assert "--baseline transformer-seed1 --breakdown length --breakdown frequency" in breakdown


def test_converge_script_says_why_a_run_was_refused(tmp_path: Path) -> None:
    import subprocess

    env = stub_nmt(tmp_path, OUT=str(tmp_path / "out"), MODELS="gnmt", SEEDS="1")
    refusing = tmp_path / "bin" / "nmt"  # as nmt train answers a run directory whose last.pt was lost
    refusing.write_text('#!/bin/bash\necho "$*" >> "$NMT_CALLS"\nif [ "$1" = train ]; then\n'
                        '  echo "nmt: RUN holds a run that was logged to step 6850, saved at 6750" >&2\n'
                        '  exit 1\nfi\n')
    done = subprocess.run(["bash", str(RECIPES / "converge.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert f"converge.sh: {tmp_path}/out/gnmt-seed1: nmt: RUN holds a run that was logged to step 6850" in done.stderr
    calls = (tmp_path / "calls").read_text()
    assert "eval " not in calls and "report " not in calls  # nothing scored or reported after it


def test_compare_script_trains_every_pair_and_seed_and_reports_each_pair(tmp_path: Path) -> None:
    import subprocess

    script = RECIPES / "compare.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = stub_nmt(tmp_path, PAIRS="en-de en-cs", SEEDS="1 2", BUDGET="5", OUT=str(tmp_path / "out"))
    out = tmp_path / "out"
    # A finished run kept without its checkpoints (as the committed answer is) is not trained or
    # evaluated again; one that still has last.pt is resumed.
    kept, resumed = out / "en-de" / "gnmt-seed2", out / "en-de" / "transformer-seed2"
    for run in kept, resumed:
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "test2016.json").write_text("{}")
    (resumed / "last.pt").write_bytes(b"")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    trains = [c for c in calls if c.startswith("train ")]
    # en-de compares three recipes (the 6+1 Transformer too), en-cs two; one en-de run is kept.
    assert len(trains) == 9 and sum("gnmt-en-cs.yaml" in c and "train.seed=2" in c for c in trains) == 1
    assert overlapped(tmp_path) == 1  # a minutes budget: each run alone on the machine
    assert sum("multi30k/transformer-deep-enc.yaml" in c for c in trains) == 2
    assert not [c for c in calls if f"{kept} " in c + " " and not c.startswith("report ")]
    assert sum(f"{resumed} " in c + " " for c in calls if not c.startswith("report ")) == 2  # train, eval
    assert f"{kept} " in [c for c in calls if c.startswith("report ")][0]
    # Every run of a pair reads the first Transformer's subwords; the pairs do not share them.
    assert all(f"tokenizer.reuse={out}/en-cs/transformer-seed1" in c for c in trains
               if "/en-cs/" in c and "transformer-seed1 " not in c)
    reports = [c for c in calls if c.startswith("report ") and "--plot " in c]
    assert len(reports) == 2 and "--group-seeds --baseline transformer-seed1" in reports[1]
    # And per pair where each model wins, by length and frequency, against the same baseline.
    breakdowns = [c for c in calls if c.startswith("report ") and "--breakdown" in c]
    assert len(breakdowns) == 2 and "--baseline transformer-seed1 --breakdown length --breakdown frequency" in \
        breakdowns[1] and f"{out}/en-cs/gnmt-seed2" in breakdowns[1] and f"{out}/en-cs/breakdown.png" in breakdowns[1]
    assert (out / "en-cs" / "breakdown.md").exists()
    assert f"{out}/en-cs/gnmt-seed2" in reports[1] and f"{out}/en-cs/bleu-vs-time.png" in reports[1]
    # en-de's runs trained on two CPU kinds: its report projects them onto the probed machine.
    assert "--time-from recipes/multi30k/results/probes/xeon-transformer-deep-enc.json" in reports[0]
    assert "--time-from" not in reports[1]
    assert (out / "en-cs" / "report.md").exists() and (out / "en-de" / "report.csv").exists()
