"""Checks on the real Multi30k files; skipped when NMT_DATA does not hold them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import shared_data

from nmt import config
from nmt.batching import make_batches
from nmt.data import read_parallel
from nmt.download import download_multi30k
from nmt.tokenizer import UNK, train_tokenizer

ROOT = shared_data()
pytestmark = pytest.mark.skipif(ROOT is None, reason="NMT_DATA does not hold multi30k/ (nmt data multi30k)")


def test_present_files_match_pinned_checksums_and_need_no_download() -> None:
    # A base URL nobody listens on: any download attempt would fail the test.
    assert download_multi30k(ROOT, base_url="http://127.0.0.1:9", progress=False) == ROOT / "multi30k"


def test_recipe_paths_resolve_to_aligned_files() -> None:
    cfg = config.load_recipe(Path(__file__).resolve().parent.parent / "recipes/multi30k/quick.yaml")
    for split, n in (("train", 29000), ("valid", 1014), ("test", 1000)):
        src, tgt = read_parallel(*config.split_paths(cfg.data, split))
        assert len(src) == len(tgt) == n


def test_tokenizer_gives_back_the_raw_test_text(tmp_path) -> None:
    src, tgt = read_parallel(ROOT / "multi30k/train.en", ROOT / "multi30k/train.de")
    tok = train_tokenizer(src[:3000] + tgt[:3000], tmp_path, vocab_size=2000)
    test_src, test_tgt = read_parallel(ROOT / "multi30k/test2016.en", ROOT / "multi30k/test2016.de")
    # Characters no training line has: without byte fallback they would come back as <unk>.
    unseen = "Zoë ordered crème brûlée in 東京 🍮 for ½ price"
    assert not any(ch in "".join(src[:3000] + tgt[:3000]) for ch in "東京🍮½")
    lines = [line.strip() for line in test_src + test_tgt] + [unseen]
    ids = tok.encode(lines)
    assert tok.decode(ids) == lines
    assert not any(UNK in seq for seq in ids)
    lens = [len(s) + 1 for s in ids[:1000]]
    batches = make_batches(lens, [len(t) + 1 for t in ids[1000:2000]], 4096, seed=1, epoch=1)
    assert sum(len(b) for b in batches) == 1000
