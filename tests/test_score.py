"""nmt score: forced decoding of given pairs, checked against the training loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_pairs
from test_cli import one_error_line, run
from test_search import model  # noqa: F401  (fixture: a small model of each kind)

from nmt.batching import collate
from nmt.data import Parallel
from nmt.loss import sequence_loss
from nmt.models.base import Seq2Seq
from nmt.score import score_batch


def random_pairs(n: int, seed: int) -> Parallel:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4, 40, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
           for _ in range(2 * n)]
    ids[n + 1] = []  # an empty target: EOS alone
    return Parallel(ids[:n], ids[n:], list(range(n)))


def test_scores_sum_to_minus_the_training_nll(model: Seq2Seq) -> None:  # noqa: F811
    pairs = random_pairs(9, seed=1)
    batch = collate(pairs, range(len(pairs)))
    with torch.no_grad():
        _, nll = sequence_loss(model, batch.src, batch.src_lens, batch.tgt_in, batch.rows, batch.targets, 0.0)
    scores = score_batch(model, pairs.src, pairs.tgt)
    assert -sum(s.log_prob for s in scores) == pytest.approx(float(nll), abs=1e-4)
    assert sum(s.tokens for s in scores) == batch.ntokens
    assert scores[1].tokens == 1 and all(s.log_prob < 0 for s in scores)


def test_each_pair_scores_the_same_alone_as_in_a_batch(model: Seq2Seq) -> None:  # noqa: F811
    pairs = random_pairs(6, seed=2)
    batched = score_batch(model, pairs.src, pairs.tgt)
    alone = [score_batch(model, [s], [t])[0] for s, t in zip(pairs.src, pairs.tgt)]
    assert [s.log_prob for s in batched] == pytest.approx([s.log_prob for s in alone], abs=1e-4)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("score")
    pairs = make_pairs(40, seed=21)
    pairs[3] = ("red dog", "")  # an empty target
    src, tgt = root / "pairs.en", root / "pairs.de"
    src.write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
    tgt.write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    return src, tgt


def score_cli(trained_run: Path, src: Path, tgt: Path, *args: str) -> list[str]:
    result = run("score", "--model", str(trained_run), "--src", str(src), "--tgt", str(tgt), *args)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_score_lines_in_input_order_whatever_the_batch_size(trained_run: Path, pair_files) -> None:
    src, tgt = pair_files
    one = [line.split("\t") for line in score_cli(trained_run, src, tgt, "--batch-size", "1")]
    many = [line.split("\t") for line in score_cli(trained_run, src, tgt, "--batch-size", "64")]
    assert len(one) == 40 and all(len(row) == 3 for row in one)
    assert [float(r[0]) for r in one] == pytest.approx([float(r[0]) for r in many], abs=2e-4)
    assert [r[1] for r in one] == [r[1] for r in many]
    assert one[3][1] == "1"  # EOS alone
    for total, tokens, mean in one:
        assert float(mean) == pytest.approx(float(total) / int(tokens), abs=1e-4)
    # The model learned the task: a correct translation scores far better than another line's.
    swapped = tgt.with_name("swapped.de")
    swapped.write_text("".join(f"{t}\n" for t in tgt.read_text(encoding="utf-8").splitlines()[::-1]),
                       encoding="utf-8")
    wrong = [line.split("\t") for line in score_cli(trained_run, src, swapped)]
    assert float(one[0][2]) > float(wrong[0][2]) + 1


def test_score_json(trained_run: Path, pair_files) -> None:
    src, tgt = pair_files
    plain = score_cli(trained_run, src, tgt)
    records = [json.loads(line) for line in score_cli(trained_run, src, tgt, "--json")]
    assert len(records) == 40 and set(records[0]) == {"log_prob", "tokens", "mean_log_prob"}
    assert [f"{r['log_prob']:.4f}" for r in records] == [line.split("\t")[0] for line in plain]


def test_mismatched_line_counts_name_both_files(trained_run: Path, pair_files, tmp_path: Path) -> None:
    src, _ = pair_files
    short = tmp_path / "short.de"
    short.write_text("ein Hund\n", encoding="utf-8")
    line = one_error_line(run("score", "-m", str(trained_run), "--src", str(src), "--tgt", str(short)))
    assert f"{src} has 40 lines but {short} has 1" in line
    missing = one_error_line(run("score", "-m", str(trained_run), "--src", str(src), "--tgt", str(tmp_path / "no")))
    assert "no such file; check the --tgt path" in missing
