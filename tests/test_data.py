"""Tokenizer, reading parallel text, and token-budget batching."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest

from nmt.batching import EpochBatches, collate, make_batches, shard
from nmt.data import decode_lines, load_parallel, read_lines, read_parallel
from nmt.errors import NmtError
from nmt.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus) -> Tokenizer:
    lines = read_lines(corpus / "train.en") + read_lines(corpus / "train.de")
    return train_tokenizer(lines, tmp_path_factory.mktemp("spm"), vocab_size=300)


# --- tokenizer

@pytest.mark.parametrize("text", ["ein Hund 🐕 läuft", "猫が寝ている", "tab\tbell\x07end", "Ünïcödé ∑ ≠ ∞"])
def test_no_unknown_token_for_any_input(tokenizer: Tokenizer, text: str) -> None:
    (ids,) = tokenizer.encode([text])
    assert UNK not in ids
    assert tokenizer.decode([ids]) == [text]


def test_special_ids(tokenizer: Tokenizer) -> None:
    sp = tokenizer.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD, UNK, BOS, EOS)
    assert len(tokenizer) == 300


def test_foreign_tokenizer_file(tmp_path: Path) -> None:
    path = tmp_path / "spm.model"
    path.write_bytes(b"not a model")
    with pytest.raises(NmtError, match="not a readable SentencePiece model"):
        Tokenizer(path)


# --- reading

def test_mismatched_line_counts_name_both_files(tmp_path: Path) -> None:
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "a.de").write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(NmtError) as err:
        read_parallel(tmp_path / "a.en", tmp_path / "a.de")
    assert "a.en has 3 lines" in str(err.value) and "a.de has 2" in str(err.value)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.en"
    path.write_bytes(b"fine\nalso fine\ncaf\xe9 latin-1\n")
    with pytest.raises(NmtError, match=r"bad.en:3: invalid UTF-8"):
        read_lines(path)


@pytest.mark.parametrize("policy, second", [("replace", "caf\ufffd"), ("skip-empty", "")])
def test_bad_line_policies_keep_every_line(policy: str, second: str, nmt_log) -> None:
    data = b"one\ncaf\xe9\r\nthree\n"
    with nmt_log.at_level("WARNING", logger="nmt"):
        lines = decode_lines(data, "in.en", policy)
    assert lines == ["one", second, "three"]
    assert "in.en:2: invalid UTF-8" in nmt_log.text and "in.en:1" not in nmt_log.text
    with pytest.raises(NmtError, match=r"in.en:2: invalid UTF-8"):
        decode_lines(data, "in.en")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NmtError, match="no such file"):
        read_lines(tmp_path / "absent.en")


def test_crlf_and_bom_are_not_part_of_lines(tmp_path: Path) -> None:
    path = tmp_path / "win.en"
    path.write_bytes("\ufeffone\r\ntwo\r\n".encode())
    assert read_lines(path) == ["one", "two"]


def test_empty_and_overlong_pairs_dropped_and_counted(tmp_path: Path, tokenizer, nmt_log) -> None:
    (tmp_path / "t.en").write_text("one two\n\nred dog\n" + "cat " * 2500 + "\nbig house\n", encoding="utf-8")
    (tmp_path / "t.de").write_text("eins zwei\nleer\n\nKatze\ngroß Haus\n", encoding="utf-8")
    with nmt_log.at_level("INFO", logger="nmt"):
        data = load_parallel(tmp_path / "t.en", tmp_path / "t.de", tokenizer, max_len=50)
    assert data.index == [0, 4]
    assert "2 dropped as empty, 1 dropped as longer than 50" in nmt_log.text


# --- files on disk

def test_checkpoint_rename_is_made_durable(tmp_path: Path, monkeypatch) -> None:
    from nmt import checkpoint

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync dir" if stat.S_ISDIR(st.st_mode) else "fsync file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save({"model": {}}, tmp_path / "last.pt")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync file", "replace", "fsync dir"]  # data on disk, rename, then the rename itself
    assert events[-1][1] == tmp_path.stat().st_ino


# --- batching

def list_batches(src_lens: list[int], tgt_lens: list[int], max_tokens: int, seed: int,
                 epoch: int) -> list[list[int]]:
    """The batcher as it was written with Python lists: the order numpy must keep."""
    rng = random.Random(seed * 100_003 + epoch)
    cost = [max(s, t) for s, t in zip(src_lens, tgt_lens)]
    ties = [rng.random() for _ in cost]
    order = sorted(range(len(cost)), key=lambda i: (cost[i], src_lens[i], ties[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, cost[i])
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], cost[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def test_batches_respect_padded_budget_and_cover_every_pair_once() -> None:
    src = [3 + (i * 7) % 40 for i in range(500)]
    tgt = [2 + (i * 5) % 45 for i in range(500)]
    batches = make_batches(src, tgt, max_tokens=300, seed=1, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) * max(max(src[i], tgt[i]) for i in b) <= 300


@pytest.mark.parametrize("seed,epoch,max_tokens", [(1, 1, 300), (7, 4, 64), (3, 2, 4096), (100_000, 1, 50)])
def test_numpy_batches_are_the_list_batches(seed: int, epoch: int, max_tokens: int) -> None:
    rng = random.Random(seed)
    src = [rng.randint(2, 60) for _ in range(3000)]  # some pairs longer than a budget of 50
    tgt = [rng.randint(2, 60) for _ in range(3000)]
    assert make_batches(src, tgt, max_tokens, seed, epoch).tolist() == list_batches(src, tgt, max_tokens, seed, epoch)


def test_batch_order_deterministic_per_epoch_and_reshuffled() -> None:
    lens = [5 + i % 30 for i in range(400)]
    first = make_batches(lens, lens, 256, seed=7, epoch=1).tolist()
    assert first == make_batches(np.array(lens), np.array(lens), 256, seed=7, epoch=1).tolist()
    assert first != make_batches(lens, lens, 256, seed=7, epoch=2).tolist()
    assert first != make_batches(lens, lens, 256, seed=8, epoch=1).tolist()


def test_shards_are_disjoint_and_equal_in_number() -> None:
    batches = [[i] for i in range(11)]
    shards = [shard(batches, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat)) == 9


def test_numpy_shards_split_one_epoch_without_overlap() -> None:
    lens = [4 + i % 23 for i in range(1000)]
    epoch = make_batches(lens, lens, 200, seed=2, epoch=5)
    shards = [shard(epoch, r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(epoch) // 3
    seen = [i for s in shards for b in s for i in b.tolist()]
    assert len(seen) == len(set(seen))
    assert sorted(b.tolist() for s in shards for b in s) == sorted(epoch[: 3 * len(shards[0])].tolist())


def test_collate_adds_bos_eos_and_counts_target_tokens(corpus, tokenizer) -> None:
    data = load_parallel(corpus / "valid.en", corpus / "valid.de", tokenizer)
    batch = collate(data, [0, 1, 2])
    assert (batch.tgt_in[:, 0] == BOS).all()
    assert batch.ntokens == sum(len(data.tgt[i]) + 1 for i in range(3))
    for row in range(3):
        n = int(batch.src_lens[row])
        assert batch.src[row, n - 1] == EOS and (batch.src[row, n:] == PAD).all()
    assert list(batch.src_lens) == sorted(batch.src_lens.tolist(), reverse=True)


def test_epoch_batches_rank_sharding(corpus, tokenizer) -> None:
    data = load_parallel(corpus / "train.en", corpus / "train.de", tokenizer)
    ranks = [EpochBatches(data, 400, seed=1, rank=r, world_size=2).epoch(3) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_validation_shards_hold_every_batch_once() -> None:
    batches = [[i] for i in range(11)]
    shards = [shard(batches, r, 3, drop_last=False) for r in range(3)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(11))


def test_updates_walk_the_epochs_in_order_and_resume_from_any_position(corpus, tokenizer) -> None:
    data = load_parallel(corpus / "train.en", corpus / "train.de", tokenizer)
    batcher = EpochBatches(data, 400, seed=1)
    per_epoch = len(batcher.epoch(1))
    updates = batcher.updates(3)
    taken = [next(updates) for _ in range(-(-per_epoch // 3) + 2)]  # epoch 1 and two updates of epoch 2
    first = [u for u in taken if u.epoch == 1]
    # Groups of 3 batches in the epoch's order; the last is shorter: an update never spans two epochs.
    assert [b.tolist() for u in first for b in u.batches] == batcher.epoch(1).tolist()
    assert first[-1].next_position == (2, 0) and taken[len(first)].epoch == 2
    assert [u.target_tokens for u in taken] == [sum(collate(data, b).ntokens for b in u.batches) for u in taken]
    for k in (0, len(first) - 1, len(first)):  # mid-epoch, at the end of one, in the next
        resumed = next(batcher.updates(3, *taken[k].next_position))
        assert [b.tolist() for b in resumed.batches] == [b.tolist() for b in taken[k + 1].batches]
