"""Parallel batches (``--workers``): the same output as one batch at a time, for every path."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_pairs
from test_cli import one_error_line, run

import nmt.translate
from nmt import config
from nmt.ensemble import load_ensemble
from nmt.errors import NmtError
from nmt.rundir import load_run
from nmt.translate import in_parallel, translate, translate_each

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    out = [src for src, _ in make_pairs(40, seed=31)]
    out[3] = out[20] = ""  # empty lines stay empty, whichever worker has their neighbours
    return out


def outputs(results) -> list:
    """What a user sees of each translation: texts, tokens, scores, alignments, line numbers."""
    return [(r.line, r.texts, [(h.tokens, h.score, h.log_prob) for h in r.hypotheses], r.alignments)
            for r in results]


# Small batches, so that there are many for the workers to share.
SETTINGS = {"beam": dict(beam=3), "greedy": dict(beam=1), "n-best": dict(beam=4, n_best=3),
            "sampling": dict(sampling="topk:5", n_best=2)}


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_two_workers_give_one_workers_output(trained_run: Path, lines: list[str], setting: dict) -> None:
    cfg, tokenizer, model = load_run(trained_run)
    search = dataclasses.replace(cfg.search, max_sentences=3, **setting)
    one = translate(model, tokenizer, lines, search, first_line=5)
    assert outputs(translate(model, tokenizer, lines, search, first_line=5, workers=2)) == outputs(one)
    assert outputs(translate(model, tokenizer, lines, search, first_line=5, workers=3)) == outputs(one)


def test_alignments_and_several_settings_at_once(trained_run: Path, lines: list[str]) -> None:
    cfg, tokenizer, model = load_run(trained_run)
    cfgs = [dataclasses.replace(cfg.search, max_sentences=4, beam=b) for b in (1, 3)]
    one = translate_each(model, tokenizer, lines, cfgs, keep_attention=True)
    two = translate_each(model, tokenizer, lines, cfgs, keep_attention=True, workers=2)
    assert [outputs(d.translations) for d in two] == [outputs(d.translations) for d in one]
    assert any(t.alignments[0] for t in two[1].translations)


def test_int8_ensemble_with_workers(trained_run: Path, lines: list[str]) -> None:
    cfg, tokenizer, model = load_ensemble([trained_run, trained_run], int8=True)
    search = dataclasses.replace(cfg.search, max_sentences=3)
    assert outputs(translate(model, tokenizer, lines, search, workers=2)) == \
        outputs(translate(model, tokenizer, lines, search))


def test_workers_share_the_intra_op_threads() -> None:
    torch.set_num_threads(4)
    try:
        counts = [n for _, n in in_parallel(lambda _: torch.get_num_threads(), list(range(6)), 2)]
        assert counts == [2] * 6
        assert torch.get_num_threads() == 4  # given back after the call
    finally:
        torch.set_num_threads(1)


def test_results_come_back_for_every_item_as_each_is_done() -> None:
    release = threading.Event()

    def slow_first(k: int) -> int:
        if k == 0:
            release.wait(timeout=60)
        return k * k

    got = []
    for item, result in in_parallel(slow_first, [0, 1, 2, 3], 2):
        got.append((item, result))
        release.set()  # item 0 ends only once another item is handed back
    assert sorted(got) == [(0, 0), (1, 1), (2, 4), (3, 9)] and got[0][0] != 0


def test_an_error_in_a_worker_stops_the_rest(trained_run: Path, lines: list[str], monkeypatch) -> None:
    cfg, tokenizer, model = load_run(trained_run)
    search = dataclasses.replace(cfg.search, max_sentences=1)  # one batch per line: 38 batches
    calls = []
    real = nmt.translate.search

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker failed")
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(nmt.translate, "search", failing)
    with pytest.raises(RuntimeError, match="worker failed"):
        translate(model, tokenizer, lines, search, workers=2)
    assert len(calls) < 10  # the batches not yet started were dropped


# --- the command line

@pytest.fixture(scope="module")
def source_text(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


@pytest.mark.parametrize("options", [["--beam", "3"], ["--beam", "1"], ["--beam", "3", "--n-best", "2"]],
                         ids=["beam", "greedy", "n-best"])
def test_streaming_with_workers_equals_one_worker(trained_run: Path, source_text: str, options) -> None:
    common = ["translate", "-m", str(trained_run), "--chunk-lines", "9", "--batch-size", "2", *options]
    one = run(*common, input=source_text)
    two = run(*common, "--workers", "2", input=source_text)
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert two.stdout == one.stdout and len(one.stdout.splitlines()) > 0


def test_eval_with_workers_scores_and_saves_the_same(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    test, ref = config.split_paths(load_run(trained_run)[0].data, "test")
    one = run("eval", "-m", str(run_dir), "--src", str(test), "--ref", str(ref))
    hyps = next((run_dir / "eval").glob("*.hyp")).read_text()
    two = run("eval", "-m", str(run_dir), "--src", str(test), "--ref", str(ref), "--workers", "2")
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert two.stdout == one.stdout
    assert next((run_dir / "eval").glob("*.hyp")).read_text() == hyps


def test_an_error_in_a_worker_is_one_line(trained_run: Path, source_text: str, monkeypatch) -> None:
    def failing(*args, **kwargs):
        raise NmtError("the search failed")

    monkeypatch.setattr(nmt.translate, "search", failing)
    result = run("translate", "-m", str(trained_run), "--batch-size", "2", "--workers", "2", input=source_text)
    assert one_error_line(result) == "nmt: error: the search failed"


def test_workers_below_one_are_refused(trained_run: Path) -> None:
    assert "--workers 0" in one_error_line(run("translate", "-m", str(trained_run), "--workers", "0", input="a\n"))
    assert "--workers 0" in one_error_line(run("eval", "-m", str(trained_run), "--src", "x", "--ref", "y",
                                               "--workers", "0"))


# --- the ctranslate2 engine: --workers is its inter_threads

def test_ctranslate2_workers_are_inter_threads_with_the_same_output(trained_run: Path, source_text: str,
                                                                     tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    from nmt.export import ExportedModel, export_ctranslate2

    export_ctranslate2(trained_run, tmp_path / "ct2")
    one = ExportedModel(tmp_path / "ct2", device="cpu", threads=2)
    two = ExportedModel(tmp_path / "ct2", device="cpu", threads=2, workers=2)
    assert (one.translator.num_translators, two.translator.num_translators) == (1, 2)
    search = dataclasses.replace(one.search, max_sentences=3, n_best=2)
    text = source_text.splitlines()
    assert outputs(two.translate(text, search)) == outputs(one.translate(text, search))
    command = ["translate", "--engine", "ctranslate2", "-m", str(tmp_path / "ct2"), "--batch-size", "2",
               "--chunk-lines", "9"]
    assert run(*command, "--workers", "2", input=source_text).stdout == run(*command, input=source_text).stdout
