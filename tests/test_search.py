"""Greedy and beam search (nmt/search.py) against models whose answers are known by hand.

Most tests use ``TableModel``: a Seq2Seq with no parameters whose next-token
distribution is looked up in a dict keyed by the context (first source token, *target
tokens so far). A token an entry does not list has probability 0, and a context with no
entry ends the sentence, so every expected answer below is worked out in a comment.
The rest use a small randomly initialised Transformer, where the answer is not known
but two ways of searching must agree (beam 1 and greedy, batched and one by one).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import pytest
import torch

from nmt.config import GNMTConfig, SearchConfig, TransformerConfig
from nmt.models import build_model
from nmt.models.base import DecoderState, Memory, Seq2Seq
from nmt.search import Hypothesis, beam_search, greedy_search, length_penalty, search
from nmt.tokenizer import BOS, EOS, PAD, UNK

# A long CPU training may share the machine: keep these tests on one core.
torch.set_num_threads(1)

A, B, C, D, E = 4, 5, 6, 7, 8  # target words
X, Y = 10, 11  # source words: the first source token picks the table rows
VOCAB = 12

Context = tuple[int, ...]
Table = dict[Context, dict[int, float]]


@dataclass
class TableState:
    contexts: list[Context]  # per row: (first source token, *target tokens so far)
    beam: int
    attention: torch.Tensor | None = None  # (N, S) when the model has attention and it was asked for

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> TableState:
        # The contract's row -> sentence map: a reorder keeps rows within their sentence,
        # and when sentences leave, the rows come in order of the sentences kept.
        # A widening (beam 1 to k rows per sentence) follows the same map.
        picked = rows.tolist()
        owner = list(range(len(self.contexts) // self.beam)) if sentences is None else sentences.tolist()
        k = len(picked) // len(owner)  # rows per new sentence
        assert k >= 1 and len(picked) == k * len(owner)
        assert all(r // self.beam == owner[i // k] for i, r in enumerate(picked)), "a row left its sentence"
        attention = None if self.attention is None else self.attention[rows]
        return TableState([self.contexts[i] for i in picked], k, attention)


class TableModel(Seq2Seq):
    """Next-token probabilities from ``table[context]`` (``default`` for unlisted contexts).

    ``attention[context]`` is the step's attention over the source, when given and asked
    for. ``rows`` records how many rows each ``step`` call decoded, to see sentences leave
    the batch, and ``asked`` whether it was asked for attention.
    """

    def __init__(self, table: Table, attention: dict[Context, list[float]] | None = None,
                 default: dict[int, float] | None = None, max_positions: int = 64):
        super().__init__()
        self.table, self.attend = table, attention
        self.default = default if default is not None else {EOS: 1.0}
        self._max_positions = max_positions
        self.rows: list[int] = []
        self.asked: list[bool] = []

    @property
    def max_positions(self) -> int:
        return self._max_positions

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> Memory:
        # The "encoder output" is the source ids themselves: all the table needs.
        return Memory(src[:, :, None].float(), src != PAD)

    def init_state(self, memory: Memory, beam: int = 1) -> TableState:
        return TableState([(int(s),) for s in memory.states[:, 0, 0].tolist() for _ in range(beam)], beam)

    def step(self, tokens: torch.Tensor, state: TableState,
             need_attention: bool = False) -> tuple[torch.Tensor, TableState]:
        self.rows.append(len(tokens))
        self.asked.append(need_attention)
        # The first step is fed BOS, which is not part of the context.
        contexts = [c if t == BOS else (*c, t) for c, t in zip(state.contexts, tokens.tolist(), strict=True)]
        probs = torch.zeros(len(contexts), VOCAB)
        for row, context in enumerate(contexts):
            for token, p in self.table.get(context, self.default).items():
                probs[row, token] = p
        attention = None
        if self.attend is not None and need_attention:
            # Rows of dead beams (reached through probability 0) have contexts nobody listed.
            width = len(next(iter(self.attend.values())))
            attention = torch.tensor([self.attend.get(c, [0.0] * width) for c in contexts])
        return probs.log(), TableState(contexts, state.beam, attention)


def source(*rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded source batch and its lengths."""
    src = torch.full((len(rows), max(map(len, rows))), PAD)
    for i, row in enumerate(rows):
        src[i, : len(row)] = torch.tensor(row)
    return src, torch.tensor([len(row) for row in rows])


def tokens_of(result: list[list[Hypothesis]]) -> list[list[list[int]]]:
    return [[h.tokens for h in hyps] for hyps in result]


# Greedy takes A (0.5 > 0.4) and then C: P(A C) = 0.5 * 0.4 = 0.2.
# Beam 2 keeps A and B (EOS, 0.1, ranks third: outside the beam, not finished); at step 2
# the candidates are BC 0.36, AC 0.2, AD 0.175, AE 0.125, BD 0.04, so the beams are BC and
# AC; both end at step 3, and B C (0.36) beats A C (0.2).
BEAM_BEATS_GREEDY: Table = {
    (X,): {A: 0.5, B: 0.4, EOS: 0.1},
    (X, A): {C: 0.4, D: 0.35, E: 0.25},
    (X, A, C): {EOS: 1.0},
    (X, B): {C: 0.9, D: 0.1},
    (X, B, C): {EOS: 1.0},
}


def test_beam_finds_a_more_probable_sentence_than_greedy() -> None:
    model = TableModel(BEAM_BEATS_GREEDY)
    src, lens = source([X])
    greedy = greedy_search(model, src, lens, SearchConfig(beam=1))
    beam = beam_search(model, src, lens, SearchConfig(beam=2, length_penalty=0.0))
    assert tokens_of(greedy) == [[[A, C]]]
    assert greedy[0][0].log_prob == pytest.approx(math.log(0.2))
    assert tokens_of(beam) == [[[B, C]]]
    assert beam[0][0].log_prob == pytest.approx(math.log(0.36))
    assert beam[0][0].score == pytest.approx(math.log(0.36))  # alpha 0: the score is log P


def test_search_picks_greedy_for_beam_1_and_beam_search_otherwise() -> None:
    model = TableModel(BEAM_BEATS_GREEDY)
    src, lens = source([X])
    assert tokens_of(search(model, src, lens, SearchConfig(beam=1))) == [[[A, C]]]
    assert tokens_of(search(model, src, lens, SearchConfig(beam=2, length_penalty=0.0))) == [[[B, C]]]


@pytest.fixture(scope="module")
def transformer() -> Seq2Seq:
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, heads=2, ffn=64, encoder_layers=1, decoder_layers=1, max_positions=64)
    model = build_model(cfg, vocab_size=40).eval()
    # Untrained, it almost never ends a sentence before the length limit; a larger EOS
    # embedding (tied to the output layer) makes hypotheses end at different steps too.
    with torch.no_grad():
        model.embed.weight[EOS] *= 1.8
    return model


def random_source(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return source(*(torch.randint(EOS + 1, 40, (n,), generator=g).tolist() for n in lengths))


def test_beam_1_is_greedy(transformer: Seq2Seq) -> None:
    model = TableModel(BEAM_BEATS_GREEDY)
    src, lens = source([X])
    one = SearchConfig(beam=1)
    assert tokens_of(beam_search(model, src, lens, one)) == tokens_of(greedy_search(model, src, lens, one))

    src, lens = random_source([3, 7, 5, 1, 9], seed=1)
    greedy = greedy_search(transformer, src, lens, one)
    beam = beam_search(transformer, src, lens, one)
    assert tokens_of(beam) == tokens_of(greedy)
    for g, b in zip(greedy, beam, strict=True):
        assert b[0].log_prob == pytest.approx(g[0].log_prob, abs=1e-4)


# --- both models through the search: rows, sentences, attention -----------------------------

SMALL = {
    "transformer": TransformerConfig(d_model=32, heads=2, ffn=64, encoder_layers=1, decoder_layers=1,
                                     max_positions=64),
    "gnmt": GNMTConfig(embed_dim=16, hidden=32, encoder_layers=2, decoder_layers=2, max_positions=64),
}


@pytest.fixture(scope="module", params=list(SMALL))
def model(request) -> Seq2Seq:
    torch.manual_seed(0)
    return build_model(SMALL[request.param], vocab_size=40).eval()


class Wrapped(Seq2Seq):
    """A model around ``model``: the same encoder, a decoder state of its own."""

    def __init__(self, model: Seq2Seq):
        super().__init__()
        self.model = model

    @property
    def max_positions(self) -> int:
        return self.model.max_positions

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> Memory:
        return self.model.encode(src, src_lens)


@dataclass
class EndsAtState:
    inner: DecoderState
    ends: torch.Tensor  # (n,) per sentence: the target token that must be EOS (0: none)
    beam: int
    position: int = 0

    @property
    def attention(self) -> torch.Tensor | None:
        return self.inner.attention

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> EndsAtState:
        ends = self.ends if sentences is None else self.ends[sentences]
        return EndsAtState(self.inner.select(rows, sentences), ends, len(rows) // len(ends), self.position)


class EndsAt(Wrapped):
    """``model``, except that every hypothesis of a sentence of even length n ends with
    target token n / 2 + 1 (EOS gets all the probability): sentences leave the batch at
    known, different steps, the others at their length limits (untrained models seldom
    end a sentence themselves). Its own per-sentence tensor follows ``select`` too."""

    def init_state(self, memory: Memory, beam: int = 1) -> EndsAtState:
        lengths = memory.mask.sum(1)
        ends = torch.where(lengths % 2 == 0, lengths // 2 + 1, 0)
        return EndsAtState(self.model.init_state(memory, beam), ends, beam)

    def step(self, tokens: torch.Tensor, state: EndsAtState, need_attention: bool = False):
        log_probs, inner = self.model.step(tokens, state.inner, need_attention)
        at_end = (state.ends == state.position + 1).repeat_interleave(state.beam)  # (N,)
        only_eos = torch.full_like(log_probs, float("-inf"))
        only_eos[:, EOS] = 0.0
        log_probs = torch.where(at_end[:, None], only_eos, log_probs)
        return log_probs, EndsAtState(inner, state.ends, state.beam, state.position + 1)


def recording_steps(model: Seq2Seq, monkeypatch) -> list[tuple[int, bool, bool]]:
    """Record (rows, need_attention, attention given) for every ``step`` of ``model``."""
    calls: list[tuple[int, bool, bool]] = []
    step = model.step

    def recorded(tokens, state, need_attention=False):
        log_probs, state = step(tokens, state, need_attention)
        calls.append((len(tokens), need_attention, state.attention is not None))
        return log_probs, state

    monkeypatch.setattr(model, "step", recorded)
    return calls


@pytest.mark.parametrize("beam, beta, stop", [(1, 0.0, "standard"), (4, 0.0, "standard"), (4, 0.5, "standard"),
                                              (4, 0.5, "exact")])
def test_batched_search_equals_one_sentence_at_a_time(model: Seq2Seq, beam: int, beta: float, stop: str,
                                                      monkeypatch) -> None:
    # Sentences leave the batch at different steps (three end early, the others at their
    # own length limits), and the rows and per-sentence memory of the survivors are reindexed.
    src, lens = random_source([6, 2, 9, 4, 1, 7], seed=2)
    cfg = SearchConfig(beam=beam, n_best=beam, length_penalty=0.6, coverage_penalty=beta, stop=stop)
    calls = recording_steps(model, monkeypatch)
    ends_at = EndsAt(model)
    batched = search(ends_at, src, lens, cfg)
    rows = [n for n, _, _ in calls]
    left = {t + 1 for t in range(len(rows) - 1) if rows[t + 1] < rows[t]}  # tokens decoded when some left
    assert {2, 3, 4} <= left and len(left) >= 4, rows  # lengths 2, 4, 6 end early, the others later
    for i, n in enumerate(lens.tolist()):
        alone = search(ends_at, src[i : i + 1, :n], lens[i : i + 1], cfg)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in alone], abs=1e-4)


@dataclass
class RowState:
    inner: DecoderState  # a beam-1 state: one "sentence" per row
    beam: int

    @property
    def attention(self) -> torch.Tensor | None:
        return self.inner.attention

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> RowState:
        return RowState(self.inner.select(rows, rows), self.beam)


class MemoryPerRow(Wrapped):
    """The way the search ran before sentences kept their memory once: every row gets its
    own copy of its sentence's encoder output, and each select copies it with the row."""

    def init_state(self, memory: Memory, beam: int = 1) -> RowState:
        rows = torch.arange(memory.states.size(0)).repeat_interleave(beam)
        return RowState(self.model.init_state(Memory(memory.states[rows], memory.mask[rows])), beam)

    def step(self, tokens: torch.Tensor, state: RowState, need_attention: bool = False):
        log_probs, inner = self.model.step(tokens, state.inner, need_attention)
        return log_probs, RowState(inner, state.beam)


@pytest.mark.parametrize("beam, beta, keep_attention", [(1, 0.0, False), (4, 0.0, False), (4, 0.5, False),
                                                        (3, 0.0, True)])
def test_memory_kept_per_sentence_gives_what_memory_per_row_gives(model: Seq2Seq, beam: int, beta: float,
                                                                  keep_attention: bool) -> None:
    src, lens = random_source([6, 2, 9, 4, 1, 7, 3], seed=5)
    cfg = SearchConfig(beam=beam, n_best=beam, length_penalty=0.6, coverage_penalty=beta)
    ours = search(EndsAt(model), src, lens, cfg, keep_attention)
    reference = search(EndsAt(MemoryPerRow(model)), src, lens, cfg, keep_attention)
    assert tokens_of(ours) == tokens_of(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        assert [h.score for h in mine] == pytest.approx([h.score for h in theirs], abs=1e-5)
        assert [h.log_prob for h in mine] == pytest.approx([h.log_prob for h in theirs], abs=1e-5)
        if keep_attention:
            for a, b in zip(mine, theirs, strict=True):
                torch.testing.assert_close(a.attention, b.attention, atol=1e-5, rtol=1e-5)


def test_attention_is_asked_for_only_when_the_search_uses_it(model: Seq2Seq, monkeypatch) -> None:
    src, lens = random_source([6, 2, 9], seed=6)
    calls = recording_steps(model, monkeypatch)
    for cfg, keep in ((SearchConfig(beam=1), False), (SearchConfig(beam=3), False),
                      (SearchConfig(beam=3, coverage_penalty=0.5), False), (SearchConfig(beam=3), True)):
        calls.clear()
        search(model, src, lens, cfg, keep)
        wanted = cfg.coverage_penalty > 0 or keep
        assert calls and all(asked == given == wanted for _, asked, given in calls)


def test_coverage_penalty_is_computed_from_the_attention_the_model_gives(model: Seq2Seq) -> None:
    # The scores with beta > 0 are log P / lp + beta * sum_i log min(coverage_i, 1), the
    # coverage summed over the attention rows each hypothesis comes back with.
    # Fewer target tokens than source tokens (EndsAt), so that the coverage stays below 1.
    src, lens = random_source([6, 2, 10], seed=7)
    beta, alpha = 0.5, 0.6
    model = EndsAt(model)
    hyps = search(model, src, lens, SearchConfig(beam=3, n_best=3, length_penalty=alpha, coverage_penalty=beta),
                  keep_attention=True)
    plain = search(model, src, lens, SearchConfig(beam=3, n_best=3, length_penalty=alpha))
    penalized = 0
    for sentence, n in zip(hyps, lens.tolist(), strict=True):
        for h in sentence:
            coverage = h.attention.sum(0)[:n].clamp(min=1e-10, max=1.0)  # over the real source tokens
            expected = h.log_prob / length_penalty(len(h.tokens) + 1, alpha) + beta * coverage.log().sum()
            assert h.score == pytest.approx(float(expected), abs=1e-4)
            penalized += float(coverage.log().sum()) < -1e-3
    assert penalized  # the term did something
    assert [[h.score for h in s] for s in hyps] != [[h.score for h in s] for s in plain]


@pytest.mark.parametrize("beam", [1, 4])
def test_search_waits_for_the_host_once_per_step(model: Seq2Seq, beam: int, monkeypatch) -> None:
    """Reading a value off the device (``.item()``, ``bool()``, ``nonzero``) stalls a GPU
    pipeline: the search does it once per step (which rows go on), plus once to size the
    search; the hypotheses are copied out at the end with ``.tolist()``."""
    src, lens = random_source([6, 2, 9, 4, 1, 7], seed=2)
    calls = recording_steps(model, monkeypatch)
    memory = model.encode(src, lens)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        search(model, src, lens, SearchConfig(beam=beam), memory=memory)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::nonzero", 0) + counts.get("aten::_local_scalar_dense", 0) <= len(calls) + 1


def test_n_best_is_sorted_distinct_and_starts_with_the_1_best(transformer: Seq2Seq) -> None:
    src, lens = random_source([5, 8, 3], seed=3)
    best = beam_search(transformer, src, lens, SearchConfig(beam=4))
    n_best = beam_search(transformer, src, lens, SearchConfig(beam=4, n_best=3))
    for one, hyps in zip(best, n_best, strict=True):
        assert len(hyps) == 3
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 3
        assert hyps[0].tokens == one[0].tokens

    # By hand (see BEAM_BEATS_GREEDY): B C (0.36) then A C (0.2).
    model = TableModel(BEAM_BEATS_GREEDY)
    hyps = beam_search(model, *source([X]), SearchConfig(beam=2, length_penalty=0.0, n_best=2))[0]
    assert [h.tokens for h in hyps] == [[B, C], [A, C]]
    assert [h.log_prob for h in hyps] == pytest.approx([math.log(0.36), math.log(0.2)])


# With min_len 0, beam 3 keeps A, B and finishes the empty sentence (EOS, 0.1, ranks third) at step 1;
# step 2 keeps BC 0.36, AC 0.2, AD 0.175, and at step 3 all three end. The 3 most probable
# finished sentences are B C, A C, A D; the empty one (0.1) is worse than all of them.
def test_n_best_keeps_the_best_finished_hypotheses() -> None:
    model = TableModel(BEAM_BEATS_GREEDY)  # (X, A, D) is unlisted: it ends with P 1
    hyps = beam_search(model, *source([X]), SearchConfig(beam=3, length_penalty=0.0, n_best=3, min_len=0))[0]
    assert [h.tokens for h in hyps] == [[B, C], [A, C], [A, D]]


# A ends at once with P 0.55; B C D ends after three words with P 0.45. Lengths count EOS:
# alpha 0:  log 0.55 = -0.598 beats log 0.45 = -0.799: A wins.
# alpha 2:  A: -0.598 / (7/6)^2 = -0.439;  B C D: -0.799 / (9/6)^2 = -0.355: B C D wins.
SHORT_OR_LONG: Table = {
    (X,): {A: 0.55, B: 0.45},
    (X, A): {EOS: 1.0},
    (X, B): {C: 1.0},
    (X, B, C): {D: 1.0},
    (X, B, C, D): {EOS: 1.0},
}


def test_length_penalty_favours_longer_sentences_as_alpha_grows() -> None:
    assert length_penalty(1, 0.0) == 1.0
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    model = TableModel(SHORT_OR_LONG)
    src, lens = source([X])
    short = beam_search(model, src, lens, SearchConfig(beam=2, length_penalty=0.0, n_best=2))[0]
    assert [h.tokens for h in short] == [[A], [B, C, D]]
    long = beam_search(model, src, lens, SearchConfig(beam=2, length_penalty=2.0, n_best=2))[0]
    assert [h.tokens for h in long] == [[B, C, D], [A]]
    assert long[0].score == pytest.approx(math.log(0.45) / 2.25)
    assert long[0].log_prob == pytest.approx(math.log(0.45))  # the raw log P is kept unchanged


# Every context prefers A, and EOS is possible but never chosen unless forced.
NEVER_ENDS = {A: 0.7, B: 0.2999, EOS: 1e-4}


@pytest.mark.parametrize("beam", [1, 2])
def test_max_length_forces_eos(beam: int) -> None:
    # max_lengths counts EOS: a * |src| + b = 3 target tokens is two words and the EOS.
    model = TableModel({}, default=NEVER_ENDS)
    hyps = search(model, *source([X, Y, Y]), SearchConfig(beam=beam, max_len_a=0.0, max_len_b=3))
    assert tokens_of(hyps) == [[[A, A]]]
    assert hyps[0][0].log_prob == pytest.approx(math.log(0.7 * 0.7 * 1e-4), rel=1e-4)

    # Each sentence of a batch has its own limit: 1 * |src| + 1 = 2 and 4 tokens.
    hyps = search(model, *source([X], [X, Y, Y]), SearchConfig(beam=beam, max_len_a=1.0, max_len_b=1))
    assert tokens_of(hyps) == [[[A]], [[A, A, A]]]

    # The model's max_positions caps the limit too.
    model = TableModel({}, default=NEVER_ENDS, max_positions=3)
    assert tokens_of(search(model, *source([X]), SearchConfig(beam=beam, max_len_a=0.0, max_len_b=10))) == [[[A, A]]]


# Source X Y. A (P 0.6) attends to X at both steps and leaves Y with 0.2 attention;
# B (P 0.4) attends to X, then to Y. With alpha 0 the scores are
# beta 0: A log 0.6 = -0.51 beats B log 0.4 = -0.92;
# beta 5: A -0.51 + 5 log min(0.2, 1) = -8.56; B -0.92 + 5 log 1 = -0.92: B wins.
COVERAGE_TABLE: Table = {(X,): {A: 0.6, B: 0.4}, (X, A): {EOS: 1.0}, (X, B): {EOS: 1.0}}
COVERAGE_ATTENTION = {(X,): [1.0, 0.0], (X, A): [0.8, 0.2], (X, B): [0.0, 1.0]}


def test_coverage_penalty_favours_the_sentence_that_covers_the_source() -> None:
    model = TableModel(COVERAGE_TABLE, attention=COVERAGE_ATTENTION)
    src, lens = source([X, Y])
    plain = beam_search(model, src, lens, SearchConfig(beam=2, length_penalty=0.0, coverage_penalty=0.0))
    assert tokens_of(plain) == [[[A]]]
    covered = beam_search(model, src, lens, SearchConfig(beam=2, length_penalty=0.0, coverage_penalty=5.0,
                                                         n_best=2))[0]
    assert [h.tokens for h in covered] == [[B], [A]]
    assert [h.score for h in covered] == pytest.approx([math.log(0.4), math.log(0.6) + 5 * math.log(0.2)])


def test_keep_attention_returns_one_row_per_target_token() -> None:
    model = TableModel(COVERAGE_TABLE, attention=COVERAGE_ATTENTION)
    hyps = beam_search(model, *source([X, Y]), SearchConfig(beam=2, length_penalty=0.0, n_best=2),
                       keep_attention=True)[0]
    by_tokens = {tuple(h.tokens): h.attention for h in hyps}
    # One row per token, EOS included: the steps that chose B, then EOS.
    assert torch.equal(by_tokens[(B,)], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(by_tokens[(A,)], torch.tensor([[1.0, 0.0], [0.8, 0.2]]))


# Step 1 (with min_len 0): A 0.5, EOS 0.3, B 0.2; EOS ranks second, inside beam 2, so the
# empty sentence finishes, and A and B are the beams. Step 2: A and B both end (0.5 and 0.2).
# With beta 5 the empty sentence and A leave Y unattended (5 log 1e-10 = -115) and B
# covers X and Y: B is by far the best, and the search did reach it.
def test_coverage_best_is_not_dropped_when_the_beam_fills() -> None:
    model = TableModel({(X,): {A: 0.5, EOS: 0.3, B: 0.2}, (X, A): {EOS: 1.0}, (X, B): {EOS: 1.0}},
                       attention={(X,): [1.0, 0.0], (X, A): [1.0, 0.0], (X, B): [0.0, 1.0]})
    cfg = SearchConfig(beam=2, length_penalty=0.0, coverage_penalty=5.0, min_len=0)
    hyps = beam_search(model, *source([X, Y]), cfg)
    assert tokens_of(hyps) == [[[B]]]


# Sentence X ends after one word (A or B, then EOS); sentence Y after five (A B C D E).
# With a limit of 6 tokens the Y sentence ends at step 6 either way.
TWO_LENGTHS: Table = {
    (X,): {A: 0.6, B: 0.4},
    (X, A): {EOS: 1.0},
    (X, B): {EOS: 1.0},
    (Y,): {A: 1.0},
    (Y, A): {B: 1.0},
    (Y, A, B): {C: 1.0},
    (Y, A, B, C): {D: 1.0},
    (Y, A, B, C, D): {E: 1.0},
    (Y, A, B, C, D, E): {EOS: 1.0},
}


@pytest.mark.parametrize("beam, rows", [
    (1, [2, 2, 1, 1, 1, 1]),  # greedy: X ends at step 2, then only Y is decoded
    (2, [2, 4, 2, 2, 2, 2]),  # beam 2: one row per sentence at first, then 2; X has two finished after step 2
])
def test_finished_sentences_leave_the_batch(beam: int, rows: list[int]) -> None:
    model = TableModel(TWO_LENGTHS)
    hyps = search(model, *source([X], [Y]), SearchConfig(beam=beam, max_len_a=0.0, max_len_b=6))
    assert [h[0].tokens for h in hyps] == [[A], [A, B, C, D, E]]
    assert model.rows == rows


# --- rules every search follows: no empty output, no special tokens -------------------------

# The empty sentence is the most probable (EOS 0.9 at once); A then EOS is next (0.1).
ENDS_AT_ONCE: Table = {(X,): {EOS: 0.9, A: 0.1}, (X, A): {EOS: 0.6, B: 0.4}, (X, A, B): {EOS: 1.0}}


@pytest.mark.parametrize("beam", [1, 3])
def test_non_empty_input_never_gets_an_empty_translation(beam: int) -> None:
    model = TableModel(ENDS_AT_ONCE)
    src, lens = source([X, Y])
    assert tokens_of(search(model, src, lens, SearchConfig(beam=beam))) == [[[A]]]  # min_len 1
    assert tokens_of(search(model, src, lens, SearchConfig(beam=beam, min_len=0))) == [[[]]]
    # min_len 2 forbids EOS after A too: A B (0.04) is the only sentence left.
    assert tokens_of(search(model, src, lens, SearchConfig(beam=beam, min_len=2))) == [[[A, B]]]


# PAD, BOS and UNK take most of the probability at every step; A, B and EOS share the rest.
SPECIALS_FIRST: Table = {
    (X,): {PAD: 0.4, UNK: 0.3, BOS: 0.2, A: 0.06, B: 0.04},
    (X, A): {UNK: 0.9, EOS: 0.1},
    (X, B): {BOS: 0.5, PAD: 0.4, EOS: 0.1},
}


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_pad_bos_and_unk_are_never_generated(beam: int) -> None:
    model = TableModel(SPECIALS_FIRST)
    hyps = search(model, *source([X]), SearchConfig(beam=beam, length_penalty=0.0, min_len=0))
    # A EOS (0.06 * 0.1) beats B EOS (0.04 * 0.1); greedy takes A, then EOS, as well.
    assert tokens_of(hyps) == [[[A]]]
    assert hyps[0][0].log_prob == pytest.approx(math.log(0.006), rel=1e-5)


# The worked example of the stopping rule (alpha 0.6, beam 2, min_len 0 to let EOS in at once):
# step 1 A .45, EOS .30, B .25: the empty sentence finishes, log .30 / lp(1) = -1.204, and A,
# B go on; step 2 B C .25, A EOS .2475, A D .2025: A finishes (-1.396 / lp(2) = -1.273) and
# with two finished hypotheses the standard rule retires the sentence: the empty one wins,
# while B C, one step from its EOS (P 1), scores -1.386 / lp(3) = -1.167. Its bound at
# step 2, -1.386 / lp(limit) with lp(limit) > 1, is above -1.204: the exact rule goes on.
WORKED: Table = {
    (X,): {A: 0.45, EOS: 0.30, B: 0.25},
    (X, A): {EOS: 0.55, D: 0.45},
    (X, B): {C: 1.0},
    (X, B, C): {EOS: 1.0},
}


def test_exact_stopping_rule_finds_what_the_standard_rule_misses() -> None:
    model = TableModel(WORKED)
    src, lens = source([X])
    standard = beam_search(model, src, lens, SearchConfig(beam=2, min_len=0))
    assert tokens_of(standard) == [[[]]]
    assert standard[0][0].score == pytest.approx(math.log(0.3), abs=1e-4)
    exact = beam_search(model, src, lens, SearchConfig(beam=2, min_len=0, stop="exact"))
    assert tokens_of(exact) == [[[B, C]]]
    assert exact[0][0].score == pytest.approx(math.log(0.25) / length_penalty(3, 0.6), abs=1e-4)
    # A wider beam finds it under the standard rule; by default (min_len 1) the empty
    # sentence is not allowed and B C wins at beam 2 as well.
    assert tokens_of(beam_search(model, src, lens, SearchConfig(beam=3, min_len=0))) == [[[B, C]]]
    assert tokens_of(beam_search(model, src, lens, SearchConfig(beam=2))) == [[[B, C]]]


def test_exact_rule_retires_a_sentence_once_nothing_alive_can_win() -> None:
    # A ends with P 0.9 at step 2; the B branch can reach at most log 0.1 / lp(limit), which
    # is below log 0.9 / lp(2): the sentence leaves the batch after step 2, not at its limit.
    model = TableModel({(X,): {A: 0.9, B: 0.1}, (X, A): {EOS: 1.0}}, default={C: 1.0})
    hyps = beam_search(model, *source([X]), SearchConfig(beam=2, stop="exact", max_len_a=0.0, max_len_b=6))
    assert tokens_of(hyps) == [[[A]]]
    assert len(model.rows) == 2


# --- the exact rule against exhaustive search ------------------------------------------------

def random_table(rng: random.Random, words: int, limit: int, src_len: int) -> tuple[Table, dict]:
    """Next-token tables for every context up to ``limit`` target tokens, with attention.

    Half the contexts allow 2 to 5 tokens among the real ones, EOS and the special ids; the
    other half are sure of one token (real or EOS), so that a hypothesis that looks poor can
    still finish without losing more probability: what an exact stopping rule must reckon with.
    """
    real = list(range(EOS + 1, EOS + 1 + words))
    table: Table = {}
    attention: dict[Context, list[float]] = {}
    contexts: list[Context] = [(X,)]
    while contexts:
        context = contexts.pop()
        sure = rng.random() < 0.5
        support = [rng.choice([*real, EOS])] if sure else rng.sample([*real, EOS, PAD, BOS, UNK], rng.randint(2, 5))
        weights = [rng.random() for _ in support]
        table[context] = {tok: w / sum(weights) for tok, w in zip(support, weights)}
        attention[context] = [rng.random() for _ in range(src_len)]
        if len(context) < limit:  # len(context) - 1 target tokens so far
            contexts += [(*context, tok) for tok in support if tok in real]
    return table, attention


def exhaustive(table: Table, attention: dict, limit: int, cfg: SearchConfig,
               src_len: int) -> tuple[list[tuple[float, list[int]]], int]:
    """Every sentence the rules allow, as (score, tokens), best first, and the most
    candidates any step of a beam search can have (a beam this wide prunes nothing)."""
    done: list[tuple[float, list[int]]] = []
    candidates = [0] * limit

    def walk(prefix: list[int], log_prob: float, coverage: list[float]) -> None:
        context = (X, *prefix)
        step = len(prefix)
        coverage = [c + a for c, a in zip(coverage, attention.get(context, [0.0] * src_len))]
        for tok, p in table.get(context, {EOS: 1.0}).items():
            if step + 1 == limit:
                allowed = tok == EOS
            else:
                allowed = tok not in (PAD, BOS, UNK) and not (tok == EOS and step < cfg.min_len)
            if not allowed or p == 0:
                continue
            candidates[step] += 1
            if tok == EOS:
                cp = cfg.coverage_penalty * sum(math.log(min(max(c, 1e-10), 1.0)) for c in coverage)
                done.append(((log_prob + math.log(p)) / length_penalty(step + 1, cfg.length_penalty) + cp, prefix))
            else:
                walk([*prefix, tok], log_prob + math.log(p), coverage)

    walk([], 0.0, [0.0] * src_len)
    return sorted(done, key=lambda d: -d[0]), max(candidates)


def test_exact_rule_with_a_full_beam_returns_the_exhaustive_best() -> None:
    # A beam as wide as the most candidates of any step prunes nothing, so the search can
    # miss the best sentence only by retiring too early: that is what this checks.
    retired_early = 0
    for seed in range(200):
        rng = random.Random(seed)
        words, limit, src_len = rng.randint(4, 6), rng.randint(5, 6), rng.randint(1, 3)
        table, attention = random_table(rng, words, limit, src_len)
        cfg = SearchConfig(beam=1, length_penalty=rng.choice([0.0, 0.6, 1.0, 2.0, 3.0]),
                           coverage_penalty=rng.choice([0.0, 0.0, 0.3, 1.0]), min_len=rng.choice([0, 1, 2]),
                           max_len_a=0.0, max_len_b=limit, stop="exact")
        sentences, width = exhaustive(table, attention, limit, cfg, src_len)
        if not sentences:
            continue
        model = TableModel(table, attention=attention)
        cfg = dataclasses.replace(cfg, beam=max(width, 2))
        (hyps,) = beam_search(model, *source([X] + [Y] * (src_len - 1)), cfg)
        assert hyps, f"seed {seed}: no hypothesis"
        best_score, best = sentences[0]
        assert hyps[0].score == pytest.approx(best_score, abs=1e-5), f"seed {seed}"
        if len(sentences) == 1 or sentences[1][0] < best_score - 1e-4:  # not a near tie
            assert hyps[0].tokens == best, f"seed {seed}"
        retired_early += len(model.rows) < limit
    # The bound was put to work: many sentences left before their length limit.
    assert retired_early >= 20


def test_exact_rule_never_returns_a_worse_best_than_the_standard_rule(transformer: Seq2Seq) -> None:
    # It stops only when nothing alive can win, and keeps what it has finished, best first.
    src, lens = random_source([6, 2, 9, 4, 1, 7, 3, 5], seed=4)
    for alpha in (0.0, 1.0, 2.0):
        cfg = SearchConfig(beam=3, length_penalty=alpha, coverage_penalty=0.2)
        standard = beam_search(transformer, src, lens, cfg)
        exact = beam_search(transformer, src, lens, dataclasses.replace(cfg, stop="exact"))
        for s, e in zip(standard, exact, strict=True):
            assert e[0].score >= s[0].score - 1e-5
