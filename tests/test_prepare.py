"""Prepared corpora: equal to direct encoding, reused, rebuilt when stale or damaged, never partial."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_pairs, tiny_recipe
from typer.testing import CliRunner

from cli.main import app
from nmt import prepare as prep
from nmt.batching import EpochBatches, collate
from nmt.corpus import PreparedCorpus
from nmt.data import load_parallel, read_lines
from nmt.errors import NmtError
from nmt.files import sha256 as file_sha256
from nmt.prepare import prepare, sample_pairs
from nmt.tokenizer import Tokenizer, train_tokenizer

MAX_LEN = 40


def write_pairs(root: Path, src: list[str], tgt: list[str], stem: str = "train") -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{stem}.en").write_text("".join(f"{s}\n" for s in src), encoding="utf-8")
    (root / f"{stem}.de").write_text("".join(f"{t}\n" for t in tgt), encoding="utf-8")
    return root / f"{stem}.en", root / f"{stem}.de"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """3,000 pairs, two of them with an empty side and one longer than MAX_LEN."""
    pairs = make_pairs(3000, seed=5)
    src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
    src[10], tgt[20] = "", "   "
    src[30] = "one two three " * 30
    root = tmp_path_factory.mktemp("prepare-corpus")
    write_pairs(root, src, tgt)
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory, corpus_dir) -> Tokenizer:
    lines = read_lines(corpus_dir / "train.en") + read_lines(corpus_dir / "train.de")
    return train_tokenizer(lines, tmp_path_factory.mktemp("spm-a"), vocab_size=300)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch, tmp_path):
    """Chunks and read blocks far smaller than the corpus, so their seams are crossed; a cache per test."""
    monkeypatch.setattr(prep, "CHUNK_PAIRS", 700)
    monkeypatch.setattr(prep, "BLOCK_BYTES", 5000)
    monkeypatch.setenv("NMT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def log_records(nmt_log):
    with nmt_log.at_level("INFO", logger="nmt"):
        yield nmt_log


def assert_same_pairs(corpus: PreparedCorpus, src: Path, tgt: Path, tokenizer: Tokenizer) -> None:
    direct = load_parallel(src, tgt, tokenizer, MAX_LEN)
    assert len(corpus) == len(direct)
    assert corpus.index.tolist() == direct.index
    assert [corpus.src[i].tolist() for i in range(len(corpus))] == direct.src
    assert [corpus.tgt[i].tolist() for i in range(len(corpus))] == direct.tgt
    assert corpus.src_lens.tolist() == [len(s) for s in direct.src]


def cache_entries(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "prepared"
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


# --- what is prepared

def test_prepared_arrays_equal_direct_encoding_with_the_same_counts(corpus_dir, tok, log_records) -> None:
    src, tgt = corpus_dir / "train.en", corpus_dir / "train.de"
    corpus = prepare(src, tgt, tok, MAX_LEN)
    assert_same_pairs(corpus, src, tgt, tok)
    h = corpus.header
    assert h["lines"] == 3000 and h["dropped_empty"] == 2 and h["dropped_too_long"] >= 1
    assert h["pairs"] + h["dropped_empty"] + h["dropped_too_long"] == 3000 and 30 not in corpus.index
    counts = [r.getMessage() for r in log_records.records if "dropped as empty" in r.getMessage()]
    assert len(counts) == 2 and counts[0] == counts[1]  # prepare's line, then load_parallel's
    # Plain .npy files: anyone can map them, with the dtypes the header names.
    tokens = np.load(corpus.directory / "src.tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.uint16 and h["dtypes"]["tokens"] == "uint16"
    assert h["tokenizer_sha256"] == file_sha256(tok.path)


def test_progress_without_a_terminal_is_log_lines_with_rate_and_eta(corpus_dir, tok, monkeypatch,
                                                                   log_records) -> None:
    monkeypatch.setattr(prep, "LOG_EVERY_S", 0.0)
    prepare(corpus_dir / "train.en", corpus_dir / "train.de", tok, MAX_LEN)
    progress = [r.getMessage() for r in log_records.records if r.getMessage().startswith("encoding train.en")]
    assert len(progress) >= 3 and all("lines/s, ETA" in line for line in progress)


def test_second_prepare_reuses_without_encoding(corpus_dir, tok, monkeypatch) -> None:
    src, tgt = corpus_dir / "train.en", corpus_dir / "train.de"
    first = prepare(src, tgt, tok, MAX_LEN)

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(prep, "_encode_chunk", no_encoding)
    again = prepare(src, tgt, tok, MAX_LEN)
    assert again.directory == first.directory and len(again) == len(first)


def test_edited_source_file_is_rebuilt(corpus_dir, tok, tmp_path, log_records) -> None:
    src, tgt = shutil.copy(corpus_dir / "train.en", tmp_path), shutil.copy(corpus_dir / "train.de", tmp_path)
    src, tgt = Path(src), Path(tgt)
    before = prepare(src, tgt, tok, MAX_LEN)
    lines = read_lines(src)
    # An edit in the middle that keeps the size: only the mtime tells.
    k = next(i for i in range(1500, 3000) if "red" in lines[i].split())
    lines[k] = " ".join("big" if w == "red" else w for w in lines[k].split())
    stat = src.stat()
    src.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert src.stat().st_size == stat.st_size
    after = prepare(src, tgt, tok, MAX_LEN)
    assert f"{src.resolve()} changed: rebuilding prepared data" in log_records.text
    assert after.directory == before.directory  # the same files and tokenizer: replaced in place
    assert_same_pairs(after, src, tgt, tok)


def test_other_tokenizer_gets_its_own_data_and_never_the_old(corpus_dir, tok, tmp_path, log_records) -> None:
    src, tgt = corpus_dir / "train.en", corpus_dir / "train.de"
    first = prepare(src, tgt, tok, MAX_LEN)
    other = train_tokenizer(read_lines(src) + read_lines(tgt), tmp_path / "spm-b", vocab_size=320)
    second = prepare(src, tgt, other, MAX_LEN)
    assert second.directory != first.directory
    assert_same_pairs(second, src, tgt, other)
    # Even found under the other tokenizer's name, data made with the first one is not used.
    shutil.rmtree(second.directory)
    shutil.copytree(first.directory, second.directory)
    third = prepare(src, tgt, other, MAX_LEN)
    assert "the tokenizer changed" in log_records.text
    assert_same_pairs(third, src, tgt, other)


def damage_truncated(d: Path) -> None:
    path = d / "src.tokens.npy"
    os.truncate(path, path.stat().st_size - 10)


def damage_json(d: Path) -> None:
    (d / "header.json").write_text('{"format": 1, "pairs": ', encoding="utf-8")


def damage_missing(d: Path) -> None:
    (d / "tgt.lengths.npy").unlink()


def damage_count(d: Path) -> None:
    header = json.loads((d / "header.json").read_text())
    header["pairs"] += 5
    (d / "header.json").write_text(json.dumps(header))


@pytest.mark.parametrize("damage", [damage_truncated, damage_json, damage_missing, damage_count])
def test_damaged_data_is_one_warning_and_rebuilt(corpus_dir, tok, log_records, damage) -> None:
    src, tgt = corpus_dir / "train.en", corpus_dir / "train.de"
    damage(prepare(src, tgt, tok, MAX_LEN).directory)
    log_records.clear()
    corpus = prepare(src, tgt, tok, MAX_LEN)
    warnings = [r for r in log_records.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreadable prepared data" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert_same_pairs(corpus, src, tgt, tok)


# --- bad input, found while streaming

def test_mismatched_line_counts_name_file_and_line(tmp_path, tok) -> None:
    pairs = make_pairs(2000, seed=1)
    src, tgt = write_pairs(tmp_path, [s for s, _ in pairs], [t for _, t in pairs[:1999]], stem="a")
    with pytest.raises(NmtError) as err:
        prepare(src, tgt, tok, MAX_LEN)
    message = str(err.value)
    assert f"{src}:2000: no matching line in {tgt}" in message
    assert "has 2000 lines" in message and "has 1999" in message
    assert not cache_entries(tmp_path)


def test_missing_file_is_named(corpus_dir, tmp_path) -> None:
    with pytest.raises(NmtError, match=r"absent.de: no such file"):
        sample_pairs(corpus_dir / "train.en", tmp_path / "absent.de", 10, seed=1)
    with pytest.raises(NmtError, match=r"absent.en: no such file"):
        sample_pairs(tmp_path / "absent.en", corpus_dir / "train.de", 10, seed=1)


def test_invalid_utf8_names_its_line(tmp_path, tok) -> None:
    pairs = make_pairs(3000, seed=2)
    src, tgt = write_pairs(tmp_path, [s for s, _ in pairs], [t for _, t in pairs], stem="bad")
    lines = src.read_bytes().split(b"\n")
    lines[1233] = b"caf\xe9 " + lines[1233]
    src.write_bytes(b"\n".join(lines))
    with pytest.raises(NmtError, match=r"bad.en:1234: invalid UTF-8"):
        prepare(src, tgt, tok, MAX_LEN)


def test_full_disk_leaves_nothing_and_says_so_in_one_line(corpus_dir, tok, tmp_path, monkeypatch) -> None:
    writes = []
    real_append = prep._NpyWriter.append

    def append(self, values):
        writes.append(1)
        if len(writes) > 20:  # well into the encoding
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, values)

    monkeypatch.setattr(prep._NpyWriter, "append", append)
    with pytest.raises(NmtError) as err:
        prepare(corpus_dir / "train.en", corpus_dir / "train.de", tok, MAX_LEN)
    assert "no space left" in str(err.value) and "nothing was kept" in str(err.value)
    assert "\n" not in str(err.value)
    assert cache_entries(tmp_path) == []  # no directory, no temp directory
    monkeypatch.setattr(prep._NpyWriter, "append", real_append)
    assert_same_pairs(prepare(corpus_dir / "train.en", corpus_dir / "train.de", tok, MAX_LEN),
                      corpus_dir / "train.en", corpus_dir / "train.de", tok)


def test_two_processes_preparing_at_once_share_one_result(corpus_dir, tok, tmp_path) -> None:
    code = ("import sys; from pathlib import Path; from nmt.prepare import prepare; from nmt.tokenizer import "
            "Tokenizer; c = prepare(Path(sys.argv[1]), Path(sys.argv[2]), Tokenizer(Path(sys.argv[3])), 40); "
            "print(c.directory, len(c))")
    args = [sys.executable, "-c", code, str(corpus_dir / "train.en"), str(corpus_dir / "train.de"), str(tok.path)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert len(cache_entries(tmp_path)) == 1
    assert_same_pairs(PreparedCorpus.open(Path(outputs[0][0].split()[0])), corpus_dir / "train.en",
                      corpus_dir / "train.de", tok)


# --- the tokenizer's sample

def test_sample_is_seeded_aligned_and_drawn_from_the_whole_corpus(corpus_dir) -> None:
    src, tgt = corpus_dir / "train.en", corpus_dir / "train.de"
    all_src, all_tgt = read_lines(src), read_lines(tgt)
    s, t, n = sample_pairs(src, tgt, 300, seed=4)
    assert n == 3000 and len(s) == len(t) == 300
    where = [all_src.index(line) for line in s]
    assert all(all_tgt[i].strip() == line for i, line in zip(where, t))  # pairs stay pairs
    assert min(where) < 1000 and max(where) >= 2000  # not just the first lines read
    assert (s, t) == sample_pairs(src, tgt, 300, seed=4)[:2]
    assert s != sample_pairs(src, tgt, 300, seed=5)[0]
    assert sample_pairs(src, tgt, 5000, seed=4)[0] == [line.strip() for line in all_src]


def test_sentencepiece_sample_is_cut_to_its_character_budget(corpus_dir) -> None:
    s, t, _ = sample_pairs(corpus_dir / "train.en", corpus_dir / "train.de", 3000, seed=1)
    assert prep._within_characters(s, t, 10**9, seed=1) == (s, t)
    cut_s, cut_t = prep._within_characters(s, t, 20_000, seed=1)
    assert 17_000 < sum(map(len, cut_s)) + sum(map(len, cut_t)) < 23_000
    assert set(zip(cut_s, cut_t)) <= set(zip(s, t))  # pairs kept whole


def test_small_corpus_trains_the_tokenizer_nmt_train_would(corpus_dir, tmp_path) -> None:
    from nmt import config

    cfg = config.from_dict(tiny_recipe(corpus_dir))
    tokenizer = prep.run_tokenizer(cfg, tmp_path / "run")
    src, tgt = read_lines(corpus_dir / "train.en"), read_lines(corpus_dir / "train.de")
    direct = train_tokenizer([s.strip() for s in src] + [t.strip() for t in tgt], tmp_path / "direct",
                             cfg.tokenizer.vocab_size, seed=cfg.train.seed, threads=os.cpu_count() or 1)
    assert tokenizer.path == tmp_path / "run" / "spm.model"
    pieces = [(tokenizer.sp.IdToPiece(i), tokenizer.sp.GetScore(i)) for i in range(len(tokenizer))]
    assert pieces == [(direct.sp.IdToPiece(i), direct.sp.GetScore(i)) for i in range(len(direct))]


# --- one batcher for both corpora

def test_prepared_and_in_memory_corpora_give_the_same_batches(corpus_dir, tok) -> None:
    src, tgt = corpus_dir / "train.en", corpus_dir / "train.de"
    mapped, listed = prepare(src, tgt, tok, MAX_LEN), load_parallel(src, tgt, tok, MAX_LEN)
    for rank in range(2):
        a = EpochBatches(mapped, 500, seed=3, rank=rank, world_size=2).epoch(2)
        b = EpochBatches(listed, 500, seed=3, rank=rank, world_size=2).epoch(2)
        assert a.tolist() == b.tolist()
    batcher = EpochBatches(mapped, 500, seed=3)
    assert batcher.target_tokens(a[:3]) == sum(collate(mapped, idx).ntokens for idx in a[:3])
    for idx in a[:5]:
        x, y = collate(mapped, idx), collate(listed, idx.tolist())
        for name in ("src", "src_lens", "tgt_in", "tgt_out"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert x.ntokens == y.ntokens


def test_every_pair_once_per_epoch_within_the_budget(corpus_dir, tok) -> None:
    corpus = prepare(corpus_dir / "train.en", corpus_dir / "train.de", tok, MAX_LEN)
    batches = EpochBatches(corpus, 300, seed=1).epoch(1)
    assert sorted(i for b in batches for i in b.tolist()) == list(range(len(corpus)))
    for b in batches:
        batch = collate(corpus, b)
        assert max(batch.src.numel(), batch.tgt_out.numel()) <= 300


# --- nmt prepare

def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def write_recipe(tmp_path: Path, corpus_dir: Path, **tokenizer) -> Path:
    recipe = tiny_recipe(corpus_dir)
    recipe["tokenizer"].update(tokenizer)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_cli_prepares_train_and_valid_then_reuses(corpus_dir, tmp_path) -> None:
    write_pairs(corpus_dir, *zip(*make_pairs(50, seed=9)), stem="valid")
    recipe, run = write_recipe(tmp_path, corpus_dir), tmp_path / "run"
    first = run_cli("prepare", str(recipe), "--run", str(run))
    assert first.exit_code == 0, first.output
    for stage in ("read+sample", "SentencePiece", "encode", "write", "total"):
        assert stage in first.stdout
    kept = len(load_parallel(corpus_dir / "train.en", corpus_dir / "train.de", Tokenizer(run / "spm.model"), 40))
    assert f"train: 3,000 lines, {kept:,} pairs kept, 2 dropped as empty" in first.stdout
    assert "valid: 50 lines" in first.stdout
    assert (run / "spm.model").is_file()  # where nmt train looks for it
    again = run_cli("prepare", str(recipe), "--run", str(run))
    assert again.exit_code == 0, again.output
    assert "trained" not in again.stdout and again.stdout.count("reused") == 2


def test_cli_uses_the_reused_tokenizer(corpus_dir, tok, tmp_path) -> None:
    write_pairs(corpus_dir, *zip(*make_pairs(50, seed=9)), stem="valid")
    recipe = write_recipe(tmp_path, corpus_dir, reuse=str(tok.path))
    result = run_cli("prepare", str(recipe), "--run", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "trained" not in result.stdout
    assert file_sha256(tmp_path / "run" / "spm.model") == file_sha256(tok.path)


def test_cli_full_disk_is_one_error_line(corpus_dir, tok, tmp_path, monkeypatch) -> None:
    def full(self, values):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep._NpyWriter, "append", full)
    recipe = write_recipe(tmp_path, corpus_dir, reuse=str(tok.path))
    result = run_cli("prepare", str(recipe), "--run", str(tmp_path / "run"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("nmt: error:")]
    assert len(errors) == 1 and "no space left" in errors[0]
