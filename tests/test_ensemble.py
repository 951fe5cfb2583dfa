"""Ensembles (nmt/ensemble.py): several models, of one kind or of both, in the one search."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_pairs
from test_cli import one_error_line, run
from test_search import SMALL, EndsAt, random_source, recording_steps, tokens_of

from nmt.config import SearchConfig
from nmt.ensemble import Ensemble
from nmt.models import build_model
from nmt.models.base import Seq2Seq
from nmt.search import search
from nmt.tokenizer import BOS, train_tokenizer

torch.set_num_threads(1)

SETTINGS = [SearchConfig(beam=1), SearchConfig(beam=4, n_best=4, length_penalty=0.6),
            SearchConfig(beam=3, n_best=2, coverage_penalty=0.5)]


@pytest.fixture(scope="module")
def members() -> dict[str, Seq2Seq]:
    """A tiny Transformer and a tiny GNMT over the same 40-word vocabulary."""
    torch.manual_seed(0)
    return {kind: build_model(SMALL[kind], vocab_size=40).eval() for kind in ("transformer", "gnmt")}


def same_output(ours, theirs) -> None:
    """Equal tokens, scores and log-probs, to the last bit."""
    assert tokens_of(ours) == tokens_of(theirs)
    assert [[h.score for h in hyps] for hyps in ours] == [[h.score for h in hyps] for hyps in theirs]
    assert [[h.log_prob for h in hyps] for hyps in ours] == [[h.log_prob for h in hyps] for hyps in theirs]


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
@pytest.mark.parametrize("cfg", [*SETTINGS, SearchConfig(beam=1, n_best=3, sampling="topk:5", seed=7)],
                         ids=["greedy", "beam", "coverage", "sampling"])
def test_ensemble_of_one_model_or_of_a_model_with_itself_is_the_model(members, kind: str,
                                                                       cfg: SearchConfig) -> None:
    model = members[kind]
    src, lens = random_source([6, 2, 9, 4, 1], seed=3)
    alone = search(model, src, lens, cfg)
    same_output(search(Ensemble([model]), src, lens, cfg), alone)
    same_output(search(Ensemble([model, model]), src, lens, cfg), alone)  # log-mean-exp of equal values


def test_step_gives_the_log_of_the_members_mean_probability_and_their_mean_attention(members) -> None:
    transformer, gnmt = members["transformer"], members["gnmt"]
    ensemble = Ensemble([transformer, gnmt])
    src, lens = random_source([5, 3, 7], seed=4)
    beam = 2
    state = ensemble.init_state(ensemble.encode(src, lens), beam)
    alone = [m.init_state(m.encode(src, lens), beam) for m in (transformer, gnmt)]
    tokens = torch.full((3 * beam,), BOS)
    for t in range(3):
        log_probs, state = ensemble.step(tokens, state, need_attention=True)
        outputs = [m.step(tokens, s, need_attention=True) for m, s in zip((transformer, gnmt), alone)]
        alone = [s for _, s in outputs]
        expected = torch.logsumexp(torch.stack([lp for lp, _ in outputs]), 0) - math.log(2)
        torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3 * beam), atol=1e-5)  # a distribution
        torch.testing.assert_close(state.attention, (alone[0].attention + alone[1].attention) / 2)
        tokens = torch.randint(BOS + 1, 40, (3 * beam,), generator=torch.Generator().manual_seed(t))
    _, state = ensemble.step(tokens, state)
    assert state.attention is None  # not asked for


def test_forward_gives_the_log_probs_that_step_gives(members) -> None:
    ensemble = Ensemble(list(members.values()))
    src, lens = random_source([5, 3, 7], seed=7)
    tgt = torch.cat([torch.full((3, 1), BOS), torch.randint(BOS + 1, 40, (3, 4))], 1)  # (B, T)
    full = ensemble(src, lens, tgt)  # (B, T, V)
    state = ensemble.init_state(ensemble.encode(src, lens))
    for t in range(tgt.size(1)):
        log_probs, state = ensemble.step(tgt[:, t], state)
        torch.testing.assert_close(full[:, t], log_probs, atol=1e-4, rtol=1e-4)


class NoAttention(EndsAt):
    """``model`` that never gives attention (and ends sentences of even length early)."""

    def step(self, tokens, state, need_attention: bool = False):
        return super().step(tokens, state, need_attention=False)


def test_attention_is_the_mean_of_the_members_that_give_one(members) -> None:
    gnmt = members["gnmt"]
    src, lens = random_source([5, 3], seed=6)  # odd lengths: NoAttention ends nothing early
    tokens = torch.full((2,), BOS)
    _, gnmt_state = gnmt.step(tokens, gnmt.init_state(gnmt.encode(src, lens)), need_attention=True)
    for models, expected in [([NoAttention(gnmt), gnmt], gnmt_state.attention), ([NoAttention(gnmt)], None)]:
        ensemble = Ensemble(models)
        _, state = ensemble.step(tokens, ensemble.init_state(ensemble.encode(src, lens)), need_attention=True)
        if expected is None:
            assert state.attention is None
        else:
            torch.testing.assert_close(state.attention, expected)


def test_max_positions_is_the_smallest_of_the_members() -> None:
    import dataclasses

    short = build_model(dataclasses.replace(SMALL["gnmt"], max_positions=20), vocab_size=40)
    assert Ensemble([build_model(SMALL["transformer"], vocab_size=40), short]).max_positions == 20


@pytest.mark.parametrize("cfg", SETTINGS, ids=["greedy", "beam", "coverage"])
@pytest.mark.parametrize("ends_early", [False, True])
def test_mixed_ensemble_output_does_not_depend_on_the_batch(members, cfg: SearchConfig, ends_early: bool,
                                                            monkeypatch) -> None:
    # A Transformer with a GNMT. With ends_early every member ends the sentences of even
    # length early (EndsAt), so sentences leave the batch at different steps and each
    # member's per-sentence state must follow select(rows, sentences); otherwise they
    # leave at their own length limits.
    wrap = EndsAt if ends_early else (lambda m: m)
    ensemble = Ensemble([wrap(members["transformer"]), wrap(members["gnmt"])])
    src, lens = random_source([6, 2, 9, 4, 1, 7], seed=2)
    calls = recording_steps(ensemble, monkeypatch)
    batched = search(ensemble, src, lens, cfg)
    rows = [n for n, _, _ in calls]
    assert sum(rows[t + 1] < rows[t] for t in range(len(rows) - 1)) >= 3, rows  # sentences left
    for i, n in enumerate(lens.tolist()):
        alone = search(ensemble, src[i : i + 1, :n], lens[i : i + 1], cfg)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in alone], abs=1e-4)


# --- from the command line ------------------------------------------------------------------

@pytest.fixture(scope="module")
def copy_of_run(trained_run: Path, tmp_path_factory) -> Path:
    """Another run directory with the same model and tokenizer as ``trained_run``."""
    copy = tmp_path_factory.mktemp("ensemble") / "copy"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("checkpoints", "last.pt", "eval"))
    return copy


def test_translate_with_a_run_and_its_copy_gives_the_run_s_translations(trained_run: Path,
                                                                         copy_of_run: Path) -> None:
    text = "one red dog runs\n\nbig green tree\nthree small cats sleep\n"
    alone = run("translate", "-m", str(trained_run), "--beam", "4", input=text)
    both = run("translate", "-m", str(trained_run), "--model", str(copy_of_run), "--beam", "4", input=text)
    assert alone.exit_code == 0 and both.exit_code == 0, both.output
    assert both.stdout == alone.stdout and len(both.stdout.splitlines()) == 4


def test_eval_with_several_models_saves_beside_the_first_run(trained_run: Path, copy_of_run: Path,
                                                             corpus: Path) -> None:
    result = run("eval", "-m", str(trained_run), "-m", str(copy_of_run), "--src", str(corpus / "test.en"),
                 "--ref", str(corpus / "test.de"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("BLEU|")
    assert list((trained_run / "eval").glob("test.en.best.beam3+copy.json"))


def test_members_with_different_tokenizers_are_refused_in_one_line(trained_run: Path, copy_of_run: Path,
                                                                   tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(copy_of_run, other)
    lines = [s for pair in make_pairs(300, seed=9) for s in pair]
    train_tokenizer(lines, other, vocab_size=320)
    result = run("translate", "-m", str(trained_run), "-m", str(other), input="one dog\n")
    line = one_error_line(result)
    assert str(trained_run) in line and str(other) in line and "spm.model" in line
    line = one_error_line(run("eval", "-m", str(other), "-m", str(trained_run), "--src", "x", "--ref", "y"))
    assert "SentencePiece" in line
