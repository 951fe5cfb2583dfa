"""Sampling (nmt/search.py ``sample_search``): the distribution drawn from, the search rules,
and draws fixed by (seed, line, sample, step) whatever the batch.

The distribution tests draw thousands of samples from a ``TableModel`` (tests/test_search.py)
whose probabilities are known, and compare frequencies with the probabilities worked out
in comments, with a tolerance of several standard deviations.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_pairs
from test_cli import one_error_line, run
from test_search import EndsAt, TableModel, model, random_source, source  # noqa: F401  (model: fixture)

from nmt.config import SearchConfig
from nmt.errors import NmtError
from nmt.models.base import Seq2Seq
from nmt.search import _draw, greedy_search, sample_keys, sample_search, search
from nmt.tokenizer import BOS, EOS, PAD, UNK

A, B, C = 4, 5, 6
X = 10
DRAWS = 4000

# One token, then EOS: P(A) = 0.5, P(B) = 0.3, P(C) = 0.2.
ONE_TOKEN = {(X,): {A: 0.5, B: 0.3, C: 0.2}}


def frequencies(cfg: SearchConfig, table=ONE_TOKEN) -> dict[int, float]:
    """How often each first token comes out in DRAWS samples of one sentence."""
    src, lens = source([X])
    (samples,) = sample_search(TableModel(table), src, lens, cfg)
    assert len(samples) == DRAWS
    counts = Counter(h.tokens[0] for h in samples)
    return {t: counts[t] / DRAWS for t in (A, B, C)}


def sampling(rule: str, **kwargs) -> SearchConfig:
    return SearchConfig(sampling=rule, n_best=DRAWS, seed=5, **kwargs)


def test_full_sampling_follows_the_model() -> None:
    f = frequencies(sampling("topp:1"))
    assert f[A] == pytest.approx(0.5, abs=0.03) and f[B] == pytest.approx(0.3, abs=0.03)
    assert f[C] == pytest.approx(0.2, abs=0.03)


def test_top_k_keeps_the_k_most_probable_and_renormalizes() -> None:
    # topk:2 keeps A and B: 0.5 / 0.8 = 0.625 and 0.375.
    f = frequencies(sampling("topk:2"))
    assert f[C] == 0 and f[A] == pytest.approx(0.625, abs=0.03)


def test_top_p_keeps_the_smallest_set_holding_p() -> None:
    # topp:0.7: A holds 0.5 < 0.7, A and B 0.8 >= 0.7, so C is left out; topp:0.45: A alone.
    f = frequencies(sampling("topp:0.7"))
    assert f[C] == 0 and f[A] == pytest.approx(0.625, abs=0.03)
    assert frequencies(sampling("topp:0.45"))[A] == 1


def test_temperature_sharpens_before_the_cut() -> None:
    # T = 0.5 squares the probabilities: 0.25, 0.09, 0.04 over 0.38 = 0.658, 0.237, 0.105.
    f = frequencies(sampling("topp:1", temperature=0.5))
    assert f[A] == pytest.approx(0.658, abs=0.03) and f[C] == pytest.approx(0.105, abs=0.03)
    # T = 2 flattens them (square roots): 0.707, 0.548, 0.447 over 1.702 = 0.415, 0.322, 0.263.
    assert frequencies(sampling("topp:1", temperature=2.0))[A] == pytest.approx(0.415, abs=0.03)


def test_pad_bos_unk_never_min_len_and_length_limit_apply() -> None:
    # The special tokens hold most of the mass, EOS is likely at once, and the sentence never
    # ends by itself: min_len 2 holds EOS back for two tokens, the limit (1 * 1 + 3) ends it.
    table = {(X,): {PAD: 0.3, BOS: 0.3, UNK: 0.2, EOS: 0.1, A: 0.1}}
    cfg = SearchConfig(sampling="topp:1", n_best=200, seed=1, min_len=2, max_len_a=1.0, max_len_b=3)
    src, lens = source([X])
    (samples,) = sample_search(TableModel(table, default={EOS: 0.5, A: 0.2, UNK: 0.3}), src, lens, cfg)
    lengths = Counter(len(h.tokens) for h in samples)
    assert set(lengths) <= {2, 3} and lengths[2] and lengths[3]  # not before 2, not beyond 3 + EOS
    assert all(t == A for h in samples for t in h.tokens)


def test_top_k_1_is_greedy_search(model: Seq2Seq) -> None:  # noqa: F811
    src, lens = random_source([6, 2, 9, 4], seed=3)
    greedy = greedy_search(model, src, lens, SearchConfig(beam=1))
    sampled = search(model, src, lens, SearchConfig(sampling="topk:1", temperature=0.7, seed=9))
    assert [[h.tokens for h in s] for s in sampled] == [[h.tokens for h in s] for s in greedy]
    assert [s[0].log_prob for s in sampled] == pytest.approx([s[0].log_prob for s in greedy], abs=1e-4)


def test_draws_depend_on_the_line_not_on_the_batch(model: Seq2Seq) -> None:  # noqa: F811
    # The same sentences alone, in another order, or with others: the same samples, as long
    # as each keeps its line number; another seed or another line number changes them.
    src, lens = random_source([6, 2, 9, 4, 1, 7], seed=2)
    cfg = SearchConfig(sampling="topp:0.95", n_best=3, seed=4)
    ends_at = EndsAt(model)  # samples end at different steps: rows leave the batch
    lines = torch.arange(100, 106)
    batched = sample_search(ends_at, src, lens, cfg, lines=lines)
    for i, n in enumerate(lens.tolist()):
        alone = sample_search(ends_at, src[i : i + 1, :n], lens[i : i + 1], cfg, lines=lines[i : i + 1])
        assert [h.tokens for h in alone[0]] == [h.tokens for h in batched[i]]
    flipped = sample_search(ends_at, src.flip(0), lens.flip(0), cfg, lines=lines.flip(0))
    assert [[h.tokens for h in s] for s in flipped[::-1]] == [[h.tokens for h in s] for s in batched]
    other_lines = sample_search(ends_at, src, lens, cfg, lines=lines + 1)
    other_seed = sample_search(ends_at, src, lens, SearchConfig(sampling="topp:0.95", n_best=3, seed=5), lines=lines)
    tokens = [[h.tokens for h in s] for s in batched]
    assert [[h.tokens for h in s] for s in other_lines] != tokens
    assert [[h.tokens for h in s] for s in other_seed] != tokens
    assert any(len({tuple(h.tokens) for h in s}) > 1 for s in batched)  # the samples of a line differ


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_top_p_draws_of_a_row_do_not_depend_on_the_rows_beside_it(p: float) -> None:
    # A flat row's nucleus reaches beyond the top 64 and 1024 tokens, a peaked row's does not:
    # together they are cut from a full sort, alone from a top-k; the draws must agree.
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(5, 3000, generator=g).mul(0.1).log_softmax(-1)
    peaked = torch.randn(5, 3000, generator=g).mul(8).log_softmax(-1)
    rows = torch.cat([flat, peaked])
    for step in range(3):
        keys = sample_keys(11, torch.arange(10), 1, 3)[:, step]
        together = _draw(rows, keys, ("topp", p), 1.0)
        alone = [_draw(rows[i : i + 1], keys[i : i + 1], ("topp", p), 1.0) for i in range(10)]
        assert together.tolist() == torch.cat(alone).tolist()


# --- the command line

def sample_text(trained_run: Path, *args: str, text: str) -> str:
    result = run("translate", "--model", str(trained_run), "--sampling", "topp:0.9", "--temperature", "1.2",
                 *args, input=text)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_samples_do_not_depend_on_batch_size_or_chunks(trained_run: Path) -> None:
    text = "".join(f"{src}\n" for src, _ in make_pairs(30, seed=12))
    one = sample_text(trained_run, "--seed", "7", "--n-best", "2", "--batch-size", "1", text=text)
    many = sample_text(trained_run, "--seed", "7", "--n-best", "2", "--batch-size", "64", "--chunk-lines", "5",
                       text=text)
    rows = [line.split(" ||| ") for line in one.split("\n")[:-1]]  # a sample may hold control characters
    other = [line.split(" ||| ") for line in many.split("\n")[:-1]]
    assert [r[:2] for r in rows] == [r[:2] for r in other]  # the scores may differ in the last digit
    assert [float(r[2]) for r in rows] == pytest.approx([float(r[2]) for r in other], abs=1e-3)
    assert [int(r[0]) for r in rows] == [i for i in range(30) for _ in range(2)]
    first = "".join(text.splitlines(keepends=True)[:4])
    assert one.split("\n")[:8] != sample_text(trained_run, "--seed", "8", "--n-best", "2", text=first).split("\n")[:8]


def test_samples_come_in_draw_order(trained_run: Path) -> None:
    # Sample j of a line is the same draw whatever the number of samples asked for.
    text = "red dog runs\nsmall green tree\n"
    first = sample_text(trained_run, "--seed", "3", text=text).split("\n")[:-1]
    three = [line.split(" ||| ")[1] for line in sample_text(trained_run, "--seed", "3", "--n-best", "3",
                                                             text=text).split("\n")[:-1]]
    assert first == [three[0], three[3]]


@pytest.mark.parametrize("args, expected", [
    (["--sampling", "topp:1.5"], "'topp:1.5': P must be above 0 and at most 1"),
    (["--sampling", "topp:0"], "'topp:0': P must be above 0"),
    (["--sampling", "topk:0"], "'topk:0': K must be at least 1"),
    (["--sampling", "topk:x"], "'topk:x': K must be a whole number"),
    (["--sampling", "nucleus"], "'nucleus': choose none, topk:K"),
    (["--sampling", "topk:5", "--temperature", "0"], "--temperature) 0.0: must be above 0"),
    (["--sampling", "topk:5", "--temperature", "-1"], "--temperature) -1.0: must be above 0"),
    (["--sampling", "topk:5", "--beam", "4"], "--beam 4 with --sampling topk:5"),
])
def test_bad_sampling_options_are_one_line(trained_run: Path, args: list[str], expected: str) -> None:
    assert expected in one_error_line(run("translate", "--model", str(trained_run), *args, input="red dog\n"))


def test_recipe_sampling_key_is_checked() -> None:
    with pytest.raises(NmtError, match="search.sampling"):
        SearchConfig(sampling="topk:-2")
    assert SearchConfig(sampling="topp:0.9").sampling_rule() == ("topp", 0.9)
