"""Several training corpora with sampling weights: per-epoch counts, seeded draws, resume, checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_pairs, tiny_recipe, write_corpus
from test_prepare import run_cli, write_pairs

from nmt import checkpoint, config
from nmt import prepare as prep
from nmt.batching import EpochBatches, WeightedCorpora, collate, make_batches
from nmt.data import read_lines
from nmt.errors import NmtError
from nmt.prepare import prepare, prepare_train, sample_corpora
from nmt.tokenizer import Tokenizer, train_tokenizer
from nmt.train import train

SIZES = {"train": 300, "bt": 200, "extra": 101}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """train (300 pairs), bt (200) and extra (101, one of them empty and one too long), valid and test."""
    root = write_corpus(tmp_path_factory.mktemp("corpora"), {"train": SIZES["train"], "valid": 20, "test": 20})
    write_pairs(root, *zip(*make_pairs(SIZES["bt"], seed=11)), stem="bt")
    extra = make_pairs(SIZES["extra"] - 2, seed=12) + [("", "leer"), ("one two three " * 30, "eins")]
    write_pairs(root, *zip(*extra), stem="extra")
    return root


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, data_dir) -> str:
    lines = [line for stem in SIZES for lang in ("en", "de") for line in read_lines(data_dir / f"{stem}.{lang}")]
    return str(train_tokenizer(lines, tmp_path_factory.mktemp("spm"), vocab_size=300).path)


def recipe(data_dir: Path, spm_model: str, train_list, **train_cfg) -> config.Config:
    raw = tiny_recipe(data_dir, **{"max_steps": 4, "valid_every": 0, "log_every": 2, **train_cfg})
    raw["data"]["train"] = train_list
    raw["tokenizer"]["reuse"] = spm_model
    raw["model"]["dropout"] = 0.2  # dropout draws random numbers: resume must restore the RNG
    return config.from_dict(raw)


WEIGHTED = [{"path": "train", "weight": 1.0}, {"path": "bt", "weight": 0.5}, {"path": "extra", "weight": 2.5}]


@pytest.fixture(scope="module")
def weighted(data_dir, spm_model) -> WeightedCorpora:
    cfg = recipe(data_dir, spm_model, WEIGHTED)
    return WeightedCorpora(prepare_train(cfg, Tokenizer(Path(spm_model))), [1.0, 0.5, 2.5])


def epoch_pairs(data: WeightedCorpora, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    batches = EpochBatches(data, 300, seed, rank, world_size).epoch(epoch)
    return [i for b in batches for i in b.tolist()]


# --- what an epoch holds

def test_each_epoch_takes_round_weight_times_pairs_of_each_corpus(weighted: WeightedCorpora) -> None:
    n_train, n_bt, n_extra = weighted.sizes
    assert n_bt == 200 and n_extra == 99  # extra's empty and over-long pairs were dropped
    assert weighted.per_epoch == [n_train, 100, 248]  # round(2.5 * 99) = round(247.5), halves up
    starts = weighted.starts
    for epoch in (1, 2, 3):
        seen = Counter(epoch_pairs(weighted, seed=3, epoch=epoch))
        corpus = {k: [i for i in seen if starts[k] <= i < starts[k + 1]] for k in range(3)}
        assert sorted(corpus[0]) == list(range(n_train)) and all(seen[i] == 1 for i in corpus[0])
        assert len(corpus[1]) == 100 and all(seen[i] == 1 for i in corpus[1])  # half of bt, each once
        assert len(corpus[2]) == 99 and Counter(seen[i] for i in corpus[2]) == {2: 49, 3: 50}  # 2*99 + 50


def test_draws_are_seeded_and_each_epoch_takes_another_subsample(weighted: WeightedCorpora) -> None:
    again = EpochBatches(weighted, 300, seed=3).epoch(2).tolist()
    assert EpochBatches(weighted, 300, seed=3).epoch(2).tolist() == again
    bt = slice(int(weighted.starts[1]), int(weighted.starts[2]))

    def bt_half(seed: int, epoch: int) -> set[int]:
        return {i for i in epoch_pairs(weighted, seed, epoch) if bt.start <= i < bt.stop}

    assert bt_half(3, 1) != bt_half(3, 2)
    assert bt_half(3, 1) != bt_half(4, 1)
    assert len(set().union(*(bt_half(3, e) for e in range(1, 6)))) > 150  # five epochs see most of bt


def test_ranks_share_an_epoch_without_overlap(weighted: WeightedCorpora) -> None:
    ranks = [EpochBatches(weighted, 300, seed=3, rank=r, world_size=2).epoch(1) for r in range(2)]
    whole = EpochBatches(weighted, 300, seed=3).epoch(1)
    assert len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    # Every batch of the epoch's draw goes to one rank (the last one dropped if the count is odd).
    assert sorted(b.tolist() for r in ranks for b in r) == sorted(whole[: 2 * len(ranks[0])].tolist())


def test_batches_gather_each_pair_from_its_own_corpus(weighted: WeightedCorpora) -> None:
    starts = weighted.starts
    idx = np.array([starts[2] + 7, 3, starts[1] + 5, starts[2] + 98])
    batch = collate(weighted, idx)
    rows = [batch.src[r, : int(n) - 1].tolist() for r, n in enumerate(batch.src_lens)]  # without EOS
    expected = [weighted.parts[2].src[7], weighted.parts[0].src[3], weighted.parts[1].src[5],
                weighted.parts[2].src[98]]
    assert sorted(rows) == sorted(ids.tolist() for ids in expected)
    assert batch.ntokens == sum(len(weighted.tgt[int(i)]) + 1 for i in idx)


def test_a_plain_train_prefix_keeps_its_cache_and_batch_order(data_dir, spm_model) -> None:
    tok = Tokenizer(Path(spm_model))
    (plain,) = prepare_train(recipe(data_dir, spm_model, "train"), tok)
    direct = prepare(data_dir / "train.en", data_dir / "train.de", tok, 40)
    assert plain.directory == direct.directory  # the same cache entry as before lists existed
    before = make_batches(plain.src_lens.astype(np.int64) + 1, plain.tgt_lens.astype(np.int64) + 1, 300, 3, 2)
    assert EpochBatches(plain, 300, seed=3).epoch(2).tolist() == before.tolist()
    # A list of that one corpus at weight 1 draws nothing: the very same batches.
    (listed,) = prepare_train(recipe(data_dir, spm_model, [{"path": "train"}]), tok)
    assert listed.directory == plain.directory
    assert EpochBatches(WeightedCorpora([listed], [1.0]), 300, seed=3).epoch(2).tolist() == before.tolist()


def test_adding_a_corpus_encodes_only_that_corpus(data_dir, spm_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NMT_CACHE", str(tmp_path / "cache"))
    tok = Tokenizer(Path(spm_model))
    prepare_train(recipe(data_dir, spm_model, [{"path": "train"}]), tok)
    encoded = []
    original = prep._encode_into
    monkeypatch.setattr(prep, "_encode_into", lambda out, src, *a: encoded.append(src.name) or original(out, src, *a))
    parts = prepare_train(recipe(data_dir, spm_model, [{"path": "train"}, {"path": "bt", "weight": 0.5}]), tok)
    assert encoded == ["bt.en"] and len(parts[1]) == 200


# --- the tokenizer's sample

def test_sentencepiece_sample_comes_from_every_corpus_by_weight(data_dir) -> None:
    corpora = config.train_corpora(config.DataConfig(dir=str(data_dir), train=[
        {"path": "train", "weight": 1.0}, {"path": "bt", "weight": 0.5}]))
    src, tgt, pairs = sample_corpora(corpora, 100, seed=1)
    assert pairs == 500 and len(src) == len(tgt) == 100
    # Shares in proportion to weight * lines: 300 and 0.5 * 200 = 100, so 75 and 25 of the 100.
    train_lines, bt_lines = set(read_lines(data_dir / "train.en")), set(read_lines(data_dir / "bt.en"))
    from_bt = sum(1 for s in src if s in bt_lines and s not in train_lines)
    assert 20 <= from_bt <= 25 and sum(1 for s in src if s in train_lines) >= 75
    assert (src, tgt) == sample_corpora(corpora, 100, seed=1)[:2]


# --- bad entries

@pytest.mark.parametrize("train_list, message", [
    ([{"path": "train"}, {"path": "bt", "weight": 0}], "recipe key data.train[1].weight must be > 0; got 0"),
    ([{"path": "train", "weight": "half"}], "data.train[0].weight must be a finite number > 0; got 'half'"),
    ([{"path": "train", "wieght": 2}], "data.train[0].wieght is not a key of a corpus entry (valid: path, weight)"),
    ([{"path": "train"}, {"weight": 0.5}], "data.train[1].path must be given: a prefix under data.dir"),
    (["train", "bt"], "data.train[0] must be a mapping such as {path: train, weight: 1.0}; got 'train'"),
    ([], "data.train must name a split, or list at least one corpus"),
    ([{"path": "bt"}, {"path": "bt", "weight": 2}], "data.train[1].path repeats data.train[0].path"),
])
def test_bad_entry_is_one_line_naming_it(tmp_path: Path, data_dir: Path, train_list, message: str) -> None:
    raw = tiny_recipe(data_dir)
    raw["data"]["train"] = train_list
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(NmtError) as err:
        config.load_recipe(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_of_an_entry_is_named_before_anything_is_read(data_dir, spm_model, tmp_path,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("NMT_CACHE", str(tmp_path / "cache"))  # nothing prepared yet
    raw = tiny_recipe(data_dir)
    raw["data"]["train"] = [{"path": "train"}, {"path": str(tmp_path / "absent"), "weight": 0.5}]
    raw["tokenizer"]["reuse"] = spm_model
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_cli("prepare", str(recipe_path), "--run", str(tmp_path / "run"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("nmt: error:")]
    assert f"data.train[1] (path {tmp_path / 'absent'}): {tmp_path / 'absent.en'}: no such file" in error
    assert not (tmp_path / "cache" / "prepared").exists()  # the first corpus was not prepared before the error


def test_cli_prepare_reports_each_corpus_and_its_pairs_per_epoch(data_dir, spm_model, tmp_path) -> None:
    raw = tiny_recipe(data_dir)
    raw["data"]["train"] = WEIGHTED
    raw["tokenizer"]["reuse"] = spm_model
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_cli("prepare", str(recipe_path), "--run", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "train[2] extra: 101 lines, 99 pairs kept, 1 dropped as empty, 1 longer than 40 tokens" in result.stdout
    assert "weight 0.5: 100 pairs per epoch" in result.stdout and "weight 2.5: 248 pairs per epoch" in result.stdout


# --- training: the log, exact resume, changed lists

def test_start_record_counts_each_corpus(data_dir, spm_model, tmp_path) -> None:
    train(recipe(data_dir, spm_model, WEIGHTED, max_steps=1), tmp_path / "run", progress_bar=False)
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start"
    kept = start["corpora"][0]["pairs"]
    assert [(c["corpus"], c["weight"], c["lines"], c["pairs"], c["pairs_per_epoch"]) for c in start["corpora"]] == [
        ("data.train[0]", 1.0, 300, kept, kept), ("data.train[1]", 0.5, 200, 200, 100),
        ("data.train[2]", 2.5, 101, 99, 248)]
    assert start["corpora"][1]["files"] == [str(data_dir / "bt.en"), str(data_dir / "bt.de")]
    assert start["train_pairs"] == kept + 200 + 99
    assert (start["corpora"][2]["dropped_empty"], start["corpora"][2]["dropped_too_long"]) == (1, 1)


def test_resume_mid_epoch_takes_the_same_following_batches(weighted: WeightedCorpora) -> None:
    batcher = EpochBatches(weighted, 300, seed=3)
    per_epoch = len(batcher.epoch(1))
    updates = batcher.updates(3)
    taken = [next(updates) for _ in range(-(-per_epoch // 3) + 2)]  # epoch 1 and two updates of epoch 2
    first = [u for u in taken if u.epoch == 1]
    assert [b.tolist() for u in first for b in u.batches] == batcher.epoch(1).tolist()
    for k in (0, len(first) // 2, len(first) - 1, len(first)):  # mid-epoch, at the end of one, in the next
        resumed = next(EpochBatches(weighted, 300, seed=3).updates(3, *taken[k].next_position))
        assert [b.tolist() for b in resumed.batches] == [b.tolist() for b in taken[k + 1].batches]


def test_two_corpora_resume_bitwise_and_a_changed_weight_is_refused(data_dir, spm_model, tmp_path) -> None:
    two = [{"path": "train"}, {"path": "bt", "weight": 0.5}]
    train(recipe(data_dir, spm_model, two, max_steps=6), tmp_path / "straight", progress_bar=False)
    train(recipe(data_dir, spm_model, two, max_steps=3), tmp_path / "resumed", progress_bar=False)
    changed = [{"path": "train"}, {"path": "bt", "weight": 0.7}]
    with pytest.raises(NmtError, match=r"trained with data.train=.*'weight': 0.5.*new --run directory"):
        train(recipe(data_dir, spm_model, changed, max_steps=6), tmp_path / "resumed", progress_bar=False)
    train(recipe(data_dir, spm_model, two, max_steps=6), tmp_path / "resumed", progress_bar=False)
    a = checkpoint.load(tmp_path / "straight" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 6
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
