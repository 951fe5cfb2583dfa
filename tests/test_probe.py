"""The speed probe (nmt bench), the CPU figures of the training log, and training time projected from a probe
(nmt report --time-from, bench/projection_check.py), on a tiny run trained here."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from cli.main import app
from nmt import config, hardware, probe, rundir, runlog
from nmt.batching import EpochBatches
from nmt.errors import NmtError
from nmt.train import train

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus: Path) -> Path:
    """12 updates of the tiny model, validated every 4, logged every 4, with its own small tokenizer."""
    path = tmp_path_factory.mktemp("probe") / "tiny"
    train(config.from_dict(tiny_recipe(corpus, max_steps=12, valid_every=4, log_every=4, keep_last=0)), path,
          progress_bar=False)
    return path


@pytest.fixture
def idle(monkeypatch) -> None:
    """The machine as nmt bench measures it before probing: idle (the tests share it with other work)."""
    monkeypatch.setattr(probe, "measure_load", lambda seconds=probe.LOAD_WINDOW_S: 0.0)


def bench(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["bench", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def probe_file(run: Path, tmp_path_factory) -> Path:
    """A real probe of the run on this machine (2 timed updates), however loaded the machine is."""
    out = tmp_path_factory.mktemp("probes") / "tiny.json"
    cfg, _ = probe.resolve(run, [])
    probe.run_probe(cfg, out, steps=2, warmup=1, force=True, source=str(run))
    return out


def edited(source: Path, out: Path, **changes) -> Path:
    """A copy of a probe file with ``changes`` (``config``: a dict merged into its recipe's sections)."""
    record = json.loads(source.read_text())
    for section, values in changes.pop("config", {}).items():
        record["config"][section].update(values)
    record.update(changes)
    out.write_text(json.dumps(record))
    return out


def records(run: Path, event: str) -> list[dict]:
    return [r for r in runlog.read(run / rundir.LOG_FILE) if r["event"] == event]


def alone(run: Path, copy: Path) -> Path:
    """A copy of ``run`` whose log says nothing else ran on its machine (the tests share theirs)."""
    shutil.copytree(run, copy)
    lines = []
    for r in runlog.read(copy / rundir.LOG_FILE):
        if r["event"] == "train":
            r["machine_busy_seconds"] = r["cpu_seconds"]
        lines.append(json.dumps(r))
    (copy / rundir.LOG_FILE).write_text("\n".join(lines) + "\n")
    return copy


# --- the training log: CPU seconds of the run and of the machine

def test_every_train_record_has_the_runs_and_the_machines_cpu_seconds(run: Path) -> None:
    windows = records(run, "train")
    assert [r["step"] for r in windows] == [4, 8, 12]
    for r in windows:
        assert r["cpu_seconds"] > 0
        # The machine's busy time holds the run's own (up to a tick of /proc/stat per core), and its cores'
        # time is that of a window of wall-clock time, validation included.
        assert r["cpu_seconds"] <= r["machine_busy_seconds"] + 0.05
        assert r["machine_busy_seconds"] <= r["machine_core_seconds"] + 0.05
        assert r["machine_core_seconds"] >= r["cpu_seconds"] / hardware.usable_cores()


def test_without_proc_stat_the_machine_figures_are_left_out(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    monkeypatch.setattr(hardware, "PROC_STAT", tmp_path / "no-proc-stat")
    out = tmp_path / "run"
    train(config.from_dict(tiny_recipe(corpus, max_steps=2, valid_every=0, log_every=1)), out, progress_bar=False)
    for r in records(out, "train"):
        assert r["cpu_seconds"] > 0 and "machine_busy_seconds" not in r and "machine_core_seconds" not in r
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[2].endswith("| – |")  # the machine column: not measured
    assert "shared the machine" not in result.output


def test_training_writes_the_length_histogram_of_its_pairs(run: Path) -> None:
    lengths = rundir.read_lengths(run)
    start = records(run, "start")[0]
    assert lengths["pairs"] == start["train_pairs"] and lengths["max_len"] == 40
    assert lengths["vocab_size"] == 300
    assert all(0 < s <= 40 and 0 < t <= 40 and n > 0 for s, t, n in lengths["counts"])


# --- nmt bench

def test_probe_of_a_run_writes_its_figures(run: Path, tmp_path: Path, idle) -> None:
    out = tmp_path / "p.json"
    code, output = bench(str(run), "--steps", "3", "--warmup", "1", "--out", str(out), "--force")
    assert code == 0, output
    assert "s/update" in output and str(out) in output
    found = json.loads(out.read_text())
    here = hardware.hardware(hardware.pick_device())
    assert found["format"] == probe.FORMAT and found["recipe"] == "tiny" and found["source"] == str(run)
    assert found["seconds_per_update"] > 0 and found["target_tokens_per_s"] > 0 and found["peak_memory_mib"] > 0
    assert found["updates"] == 3 and found["warmup"] == 1 and len(found["window_seconds_per_update"]) == 3
    assert (found["device"], found["cpu"], found["cpu_kind"]) == ("cpu", here["cpu"], here["cpu_kind"])
    assert (found["precision"], found["ranks"], found["effective_batch_tokens"]) == ("fp32", 1, 600)
    assert found["batches"] == "the corpus" and found["timed"] == probe.TIMED and "spread over" in output
    assert found["load"]["before"] == 0.0 and found["load"]["limit"] == hardware.OTHER_LOAD_LIMIT
    assert found["config"]["model"] == yaml.safe_load((run / "config.yaml").read_text())["model"]


def test_synthetic_probe_needs_no_corpus(run: Path, tmp_path: Path, idle) -> None:
    elsewhere = tmp_path / "copied"  # a machine with the run directory but not the corpus
    elsewhere.mkdir()
    for name in ("config.yaml", "spm.model", "lengths.json", "log.jsonl"):
        shutil.copy(run / name, elsewhere / name)
    cfg = yaml.safe_load((elsewhere / "config.yaml").read_text())
    cfg["data"]["dir"] = str(tmp_path / "no-corpus-here")
    (elsewhere / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, output = bench(str(elsewhere), "--steps", "2", "--warmup", "0", "--out", str(tmp_path / "n.json"), "--force")
    assert code == 1 and "no-corpus-here" in output  # the corpus is missing
    code, output = bench(str(elsewhere), "--synthetic", "--steps", "2", "--warmup", "0", "--out",
                         str(tmp_path / "s.json"), "--force")
    assert code == 0, output
    found = json.loads((tmp_path / "s.json").read_text())
    assert found["batches"] == f"synthetic ids, lengths drawn from {elsewhere / 'lengths.json'}"
    assert found["seconds_per_update"] > 0 and found["target_tokens_per_s"] > 0


def test_synthetic_probe_without_a_length_histogram_is_one_line(run: Path, tmp_path: Path, idle) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "lengths.json").unlink()  # a run trained before nmt wrote it
    code, output = bench(str(old), "--synthetic", "--out", str(tmp_path / "x.json"))
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "lengths.json: missing" in output and "nmt train RUN" in output


def test_synthetic_batches_keep_the_histograms_lengths(run: Path) -> None:
    lengths = rundir.read_lengths(run)
    assert len(probe.synthetic_corpus(lengths, seed=1)) == lengths["pairs"]  # as many pairs as the corpus
    corpus = probe.synthetic_corpus(lengths, seed=1, pairs=1000)  # or fewer: a big corpus is sampled
    bins = {(s, t) for s, t, _ in lengths["counts"]}
    assert len(corpus) == 1000 and set(zip(corpus.src_lens.tolist(), corpus.tgt_lens.tolist())) <= bins
    assert int(corpus.src.tokens.min()) > 3 and int(corpus.tgt.tokens.max()) < lengths["vocab_size"]  # no special ids


def test_timed_updates_cover_the_epochs_lengths_not_its_first_batches(run: Path) -> None:
    batches = EpochBatches(probe.synthetic_corpus(rundir.read_lengths(run), seed=1, pairs=3000), 600, seed=1)
    numbers = batches.epoch(1).order  # batch numbers grow with their pairs' length; training order is shuffled
    every = probe.spread_updates(batches, update_freq=1, count=len(numbers), windows=5)
    assert sorted(int(u.batches.order[0]) for u in every) == sorted(numbers.tolist())  # an epoch's worth: each once
    updates = probe.spread_updates(batches, update_freq=1, count=10, windows=5)
    picked = [int(u.batches.order[0]) for u in updates]
    half = len(numbers) // 2
    for w in range(5):  # each window of 2 updates: one batch of the shorter half, one of the longer
        window = picked[2 * w : 2 * w + 2]
        assert min(window) < half <= max(window)
    assert picked != numbers[:10].tolist()
    assert all(u.target_tokens == batches.target_tokens(u.batches) for u in updates)
    grouped = probe.spread_updates(batches, update_freq=2, count=4, windows=2)
    assert all(len(u.batches) == 2 and u.batches.order[0] < half <= u.batches.order[1] for u in grouped)


def test_probe_is_refused_under_load_unless_forced(run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(probe, "measure_load", lambda seconds=probe.LOAD_WINDOW_S: 0.37)
    out = tmp_path / "p.json"
    code, output = bench(str(run), "--steps", "1", "--warmup", "0", "--out", str(out))
    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "other processes took 37% of this machine's cores" in output and "--force" in output
    assert not out.exists()
    code, output = bench(str(run), "--steps", "1", "--warmup", "0", "--out", str(out), "--force")
    assert code == 0, output
    load = json.loads(out.read_text())["load"]
    assert load["before"] == 0.37 and load["forced"] is True


def test_load_during_the_probe_refuses_it(run: Path, tmp_path: Path, idle, monkeypatch) -> None:
    monkeypatch.setattr(probe, "other_load", lambda before, after, own=None: 0.5)
    out = tmp_path / "p.json"
    code, output = bench(str(run), "--steps", "1", "--warmup", "0", "--out", str(out))
    assert code == 1 and "took 50% of this machine's cores during the probe" in output and not out.exists()


def test_two_ranks_probe_the_recipe_as_nmt_train_runs_it(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "two.json"
    result = subprocess.run([sys.executable, "-m", "nmt", "-q", "bench", str(run), "--nproc", "2", "--steps", "2",
                             "--warmup", "1", "--out", str(out), "--force"], capture_output=True, text=True,
                            timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    found = json.loads(out.read_text())
    assert found["ranks"] == 2 and found["effective_batch_tokens"] == 2 * 600 and found["threads"] >= 1
    assert found["load"]["before"] is not None  # measured by the launcher, recorded by rank 0
    assert result.stdout.count("s/update") == 1  # one voice


# --- the probe file: bad input

@pytest.mark.parametrize("content, message", [
    (None, "no such probe file"),
    ("not json", "not a probe file"),
    ('{"seconds_per_update": 1}', "no 'format'"),
    ('{"format": 0, "seconds_per_update": 1}', "probe format 0, and this nmt reads format 1"),
])
def test_a_bad_probe_file_is_one_line(run: Path, tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "probe.json"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["report", str(run), "--time-from", str(path)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("nmt: error: ") and message in result.output and "nmt bench" in result.output


def test_a_probe_of_another_shape_is_refused_naming_the_key(run: Path, probe_file: Path, tmp_path: Path) -> None:
    wider = edited(probe_file, tmp_path / "wider.json", config={"model": {"d_model": 64}})
    result = runner.invoke(app, ["report", str(run), "--time-from", str(wider)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "model.d_model=64" in result.output and "has 48" in result.output and "nmt bench" in result.output
    gnmt = edited(probe_file, tmp_path / "gnmt.json", config={"model": {"kind": "gnmt"}})
    assert "model.kind='gnmt'" in runner.invoke(app, ["report", str(run), "--time-from", str(gnmt)]).output
    bigger = edited(probe_file, tmp_path / "bigger.json", effective_batch_tokens=1200)
    output = runner.invoke(app, ["report", str(run), "--time-from", str(bigger)]).output
    assert "tokens per update" in output and "1200" in output


def test_a_run_without_updates_is_refused(run: Path, probe_file: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh)
    start = records(run, "start")[0]
    (fresh / rundir.LOG_FILE).write_text(json.dumps(start) + "\n")
    result = runner.invoke(app, ["report", str(fresh), "--time-from", str(probe_file)])
    assert result.exit_code == 1 and "no update logged" in result.output and "train it first" in result.output


# --- projected time

def test_projected_time_is_updates_times_seconds_per_update(run: Path, probe_file: Path, tmp_path: Path) -> None:
    scored = tmp_path / "scored"  # the run's log with valid BLEU 5, 12, 20 at steps 4, 8, 12
    shutil.copytree(run, scored)
    lines = []
    for r in runlog.read(scored / rundir.LOG_FILE):
        if r["event"] == "valid":
            r["valid_bleu"] = {4: 5.0, 8: 12.0, 12: 20.0}[r["step"]]
        lines.append(json.dumps(r))
    (scored / rundir.LOG_FILE).write_text("\n".join(lines) + "\n")
    per_update = 7.5  # seconds: the 12 updates take 12 x 7.5 s = 1.5 projected minutes
    gpu = edited(probe_file, tmp_path / "gpu.json", seconds_per_update=per_update, gpu="Some GPU", precision="bf16")
    args = ["report", str(scored), "--time-from", str(gpu), "--target", "12", "--at", "1,1.2,2"]
    md = runner.invoke(app, args)
    assert md.exit_code == 0, md.output
    assert "Projected training time in minutes" in md.output
    assert "| run | model | updates | projected min on Some GPU, bf16, 1 rank |" in md.output
    assert "| scored | transformer | 12 | 1.5 (7.5 s/update) |" in md.output
    # BLEU 12 first at step 8: 8 x 7.5 s = 1 projected minute.
    assert "Projected minutes to valid BLEU 12" in md.output and "| scored | transformer | 1.0 |" in md.output
    # By 1 projected minute: the validations at steps 4 and 8; by 1.2: the same; 2: more than the run trained.
    assert "Best valid BLEU by projected training time on Some GPU, bf16, 1 rank:" in md.output
    assert "| scored | transformer | 12.00 | 12.00 | – |" in md.output
    assert "no probe can project" in md.output and "launch" in md.output
    row = json.loads(runner.invoke(app, [*args, "--format", "json"]).output)[0]
    machine = "Some GPU, bf16, 1 rank"
    assert row[f"projected_seconds_per_update[{machine}]"] == per_update
    assert row[f"projected_train_minutes[{machine}]"] == pytest.approx(12 * per_update / 60)
    assert row[f"projected_time_to_target_minutes[{machine}]"] == pytest.approx(8 * per_update / 60)
    assert [row[f"projected_valid_bleu_at_{m}min[{machine}]"] for m in ("1", "1.2", "2")] == [12.0, 12.0, None]


def test_probes_of_two_machines_give_a_column_and_a_curve_each(run: Path, probe_file: Path, tmp_path: Path) -> None:
    fast = edited(probe_file, tmp_path / "fast.json", seconds_per_update=0.5, gpu="GPU A")
    slow = edited(probe_file, tmp_path / "slow.json", seconds_per_update=2.0, gpu="GPU B")
    plot = tmp_path / "bleu.png"
    result = runner.invoke(app, ["report", str(run), "--time-from", str(fast), "--time-from", str(slow),
                                 "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "| projected min on GPU A, fp32, 1 rank | projected min on GPU B, fp32, 1 rank |" in result.output
    assert "| tiny | transformer | 12 | 0.1 (0.5 s/update) | 0.4 (2 s/update) |" in result.output
    assert plot.read_bytes()[:4] == b"\x89PNG"
    twin = edited(probe_file, tmp_path / "twin.json", seconds_per_update=0.6, gpu="GPU A")
    result = runner.invoke(app, ["report", str(run), "--time-from", str(fast), "--time-from", str(twin)])
    assert result.exit_code == 1 and "both probes of tiny's shape on GPU A" in result.output


def test_runs_of_two_machines_compare_on_the_projected_clock(run: Path, probe_file: Path, tmp_path: Path) -> None:
    """Measured minutes of two CPUs do not compare, so the report refuses them; projected onto one probe they do."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run, elsewhere)
    lines = []
    for r in runlog.read(elsewhere / rundir.LOG_FILE):
        if r["event"] in ("start", "resume"):
            r.update(cpu="Other CPU (64 cores)", cpu_kind="family 99 model 1, AVX2")
        lines.append(json.dumps(r))
    (elsewhere / rundir.LOG_FILE).write_text("\n".join(lines) + "\n")
    refused = runner.invoke(app, ["report", str(run), str(elsewhere)])
    assert refused.exit_code == 1 and "--time-from" in refused.output and "Other CPU (64 cores)" in refused.output
    projected = runner.invoke(app, ["report", str(run), str(elsewhere), "--time-from", str(probe_file)])
    assert projected.exit_code == 0, projected.output
    assert "| tiny | transformer | 12 |" in projected.output and "| elsewhere | transformer | 12 |" in projected.output


# --- bench/projection_check.py

def projection_check():
    spec = importlib.util.spec_from_file_location("projection_check", ROOT / "bench" / "projection_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_check_compares_a_run_with_a_probe_of_its_kind(run: Path, probe_file: Path, tmp_path: Path,
                                                                  capsys) -> None:
    quiet = alone(run, tmp_path / "alone")
    check = projection_check()
    assert check.main([str(quiet), "--probe", str(probe_file), "--at", "0.001"]) == 0
    out = capsys.readouterr().out
    per_update = json.loads(probe_file.read_text())["seconds_per_update"]
    measured = runlog.last(runlog.read(quiet / rundir.LOG_FILE), "end")["train_seconds"] / 60
    projected = 12 * per_update / 60
    assert f"checked on {probe.machine_label(json.loads(probe_file.read_text()))}" in out
    assert (f"whole run, 12 updates: measured {measured:.2f} min, projected {projected:.2f} min "
            f"({projected / measured - 1:+.1%})") in out
    assert "best valid BLEU by 0.001 min: measured" in out


def test_projection_check_leaves_other_kinds_and_shared_runs_unchecked(run: Path, probe_file: Path, tmp_path: Path,
                                                                       capsys) -> None:
    epyc = edited(probe_file, tmp_path / "epyc.json", cpu="AMD EPYC (2 cores)", cpu_kind="family 25 model 1, AVX2")
    check = projection_check()
    check.main([str(run), "--probe", str(epyc)])
    assert "unchecked (kind not at hand): trained on" in capsys.readouterr().out
    shared = alone(run, tmp_path / "shared")
    lines = []
    for r in runlog.read(shared / rundir.LOG_FILE):
        if r["event"] == "train":  # half the cores' time went to other processes
            r["machine_busy_seconds"] = r["cpu_seconds"] + r["machine_core_seconds"] / 2
        lines.append(json.dumps(r))
    (shared / rundir.LOG_FILE).write_text("\n".join(lines) + "\n")
    check.main([str(shared), "--probe", str(probe_file)])
    assert "unchecked (the run shared its machine): other processes loaded it in 100% of its log windows" \
        in capsys.readouterr().out


def test_read_probe_accepts_what_run_probe_writes(probe_file: Path) -> None:
    assert probe.read_probe(probe_file)["format"] == probe.FORMAT
    with pytest.raises(NmtError, match="damaged"):
        probe.read_probe(edited(probe_file, probe_file.with_name("zero.json"), seconds_per_update=0))
