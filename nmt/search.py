"""Greedy and batched beam search over the Seq2Seq contract.

The search sees a model only through ``encode``, ``init_state``, ``step``,
``state.select`` and ``state.attention`` (nmt/models/base.py); it never asks which model it
has. It keeps the rows of a sentence together (row r is beam r % k of sentence r // k), so
a model keeps what a sentence's beams share once per sentence; it tells ``select`` which
sentences stay only when some leave, and asks ``step`` for attention only when it uses it
(coverage penalty, ``keep_attention``). Its settings are a ``SearchConfig``
(nmt/config.py), the one place that holds their defaults.

A model whose log-probs cover only some vocabulary ids (a shortlist, nmt/shortlist.py) says
so by the ``columns`` of its memory: the search then works on column indices throughout
(the special ids keep their own columns, so the rules below hold as written) and maps the
tokens it outputs to vocabulary ids once at the end; sampling draws by vocabulary id.

Rules applied to every step's log-probs, in greedy and beam search alike (another decoder
that must give nmt's output, e.g. an exported model, applies the same ones):

* PAD, BOS and UNK are never generated: their log-probs become -inf (no renormalization).
* EOS is not allowed before ``min_len`` target tokens (default 1, so a non-empty input
  never gets an empty translation).
* A sentence may have at most ``min(a * |src| + b, max_positions)`` target tokens, EOS
  included (``max_len_a``, ``max_len_b``; raised to ``min_len + 1`` where the model's
  positions allow); at that limit only EOS is allowed, whatever ``min_len`` says.
* Greedy search takes the most probable token that remains.

Beam search keeps ``batch * beam`` rows, takes the top ``2 * beam`` candidates over
``beam * vocab`` per sentence (so end-of-sentence candidates cannot empty the beam),
finalizes EOS candidates that rank within the beam and drops a sentence from the batch
when its stopping rule says so, or at its length limit. Finished hypotheses are ranked by

    log P(Y|X) / lp(Y) + cp(X; Y),   lp(Y) = ((5 + |Y|) / 6) ** alpha,
    cp = beta * sum_i log(min(sum_j a_ij, 1))                            (Wu et al. 2016)

where ``a_ij`` is the attention on source token i at target step j (from
``state.attention``; the coverage term is 0 for a model that gives none). Stopping rules
(``stop``):

* ``standard``: a sentence is done once it has ``beam`` finished hypotheses (the rule of
  fairseq and OpenNMT-py), even if a hypothesis still alive would rank above them.
* ``exact``: a sentence is done once it has ``n_best`` finished hypotheses and no alive
  hypothesis can still rank above the worst of them (the bound is argued in
  ``_retired``). The output is then the best the beam can reach; it may take more steps.

Sampling (``cfg.sampling``, for back-translation) draws each sentence's ``n_best``
translations instead: at each step the allowed log-probs (the rules above apply) are divided
by ``temperature``, cut to the top k tokens or to the smallest set holding probability p
(``topk:K``, ``topp:P``), renormalized, and a token is drawn. The randomness of a draw
comes from a counter-based hash of (``seed``, the sentence's input line, the sample, the
step, the token) through the Gumbel-max trick, so the samples do not depend on the batch
size, on the other sentences of a batch or on the order of the input. Samples come in draw
order, not ranked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from nmt.models.base import Memory, Seq2Seq
from nmt.tokenizer import BOS, EOS, PAD, UNK

if TYPE_CHECKING:
    from nmt.config import SearchConfig

NEVER_GENERATED = (PAD, BOS, UNK)


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # the ranking score (length- and coverage-normalized)
    log_prob: float
    attention: torch.Tensor | None = None  # (len(tokens) + 1, S) if the model gives attention


def length_penalty(length: int | torch.Tensor, alpha: float):
    return ((5.0 + length) / 6.0) ** alpha


def coverage_penalty(coverage: torch.Tensor, src_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * sum over real source tokens of log(min(total attention, 1)); (N, S) -> (N,)."""
    clipped = coverage.clamp(min=1e-10, max=1.0).log()
    return beta * (clipped * src_mask).sum(-1)


def max_lengths(src_lens: torch.Tensor, cfg: SearchConfig, limit: int) -> torch.Tensor:
    """Most target tokens (EOS included) allowed per sentence: a * |src| + b, capped."""
    lengths = (src_lens.float() * cfg.max_len_a + cfg.max_len_b).long()
    return lengths.clamp(min=cfg.min_len + 1).clamp(min=1, max=limit)


def _forbid(log_probs: torch.Tensor, step: int, min_len: int, never: torch.Tensor) -> torch.Tensor:
    """Apply the column rules to the (N, V) log-probs of target token ``step``, in place:
    ``never`` (PAD, BOS, UNK) and, before ``min_len``, EOS get -inf. Returns EOS's log-probs
    (N,) as they were, for the rows at their length limit, where EOS is allowed regardless.
    """
    eos = log_probs[:, EOS].clone()
    log_probs.index_fill_(1, never, float("-inf"))
    if step < min_len:
        log_probs[:, EOS] = float("-inf")
    return eos


def _vocabulary_ids(tokens: torch.Tensor, memory: Memory) -> torch.Tensor:
    """``tokens`` (column indices of the model's log-probs) as vocabulary ids: the same tensor
    unless the memory has ``columns`` (a shortlist)."""
    return tokens if memory.columns is None else memory.columns[tokens]


def _rows_until_eos(model: Seq2Seq, state, limits: torch.Tensor, cfg: SearchConfig, choose,
                    attention_width: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decode one hypothesis per row, each row leaving the batch when it ends (greedy, sampling).

    ``choose(log_probs, alive, t)`` picks each row's token from its allowed (N, V) log-probs;
    ``alive`` maps rows to their original row. Returns the tokens (R, T, EOS included), each
    row's log-prob as it ended (R,), and with ``attention_width`` S the attention (R, T, S), or
    None for a model without attention. One host sync per step: which rows go on.
    """
    device = limits.device
    rows, steps = limits.size(0), int(limits.max())
    never = torch.tensor(NEVER_GENERATED, device=device)
    alive = torch.arange(rows, device=device)  # original row of each row
    row_limits = limits  # (N,)
    tokens = torch.full((rows,), BOS, dtype=torch.long, device=device)  # (N,) last token of each row
    total = torch.zeros(rows, device=device)  # (N,) cumulative log-probs
    out = torch.full((rows, steps), EOS, dtype=torch.long, device=device)
    final = torch.zeros(rows, device=device)
    attention = torch.zeros(rows, steps, attention_width, device=device) if attention_width else None
    for t in range(steps):
        log_probs, state = model.step(tokens, state, attention is not None)  # (N, V)
        if attention is not None:
            if state.attention is None:  # a model without attention
                attention = None
            else:
                attention[alive, t] = state.attention
        eos = _forbid(log_probs, t, cfg.min_len, never)
        tokens = choose(log_probs, alive, t)
        at_limit = row_limits <= t + 1  # these rows may only end
        tokens = tokens.masked_fill(at_limit, EOS)
        total = total + torch.where(at_limit, eos, log_probs.gather(1, tokens[:, None]).squeeze(1))
        out[alive, t] = tokens
        final[alive] = total
        keep = (tokens != EOS).nonzero().flatten()  # the step's one host sync: who goes on
        if keep.numel() < alive.numel():
            if keep.numel() == 0:
                break
            alive, tokens, total, row_limits = alive[keep], tokens[keep], total[keep], row_limits[keep]
            state = state.select(keep, keep)
    return out, final, attention


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, cfg: SearchConfig,
                  memory: Memory | None = None) -> list[list[Hypothesis]]:
    """Most probable allowed token at every step; finished sentences leave the batch.

    ``memory`` is ``model.encode(src, src_lens)`` when the caller already has it. Host
    syncs: the longest limit once, then one per step (which rows go on), and the tokens
    and scores copied out once at the end.
    """
    limits = max_lengths(src_lens, cfg, model.max_positions)  # (n,)
    memory = model.encode(src, src_lens) if memory is None else memory
    state = model.init_state(memory, beam=1)
    out, final, _ = _rows_until_eos(model, state, limits, cfg, lambda log_probs, alive, t: log_probs.argmax(-1))
    alpha = cfg.length_penalty
    out_rows, finals = _vocabulary_ids(out, memory).tolist(), final.tolist()
    hyps = []
    for row, log_prob in zip(out_rows, finals):
        words = row[: row.index(EOS)]
        hyps.append([Hypothesis(words, log_prob / length_penalty(len(words) + 1, alpha), log_prob)])
    return hyps


@dataclass
class _Finished:
    """The best ``k`` finished hypotheses of every sentence, kept on the device, best first.

    A slot whose score is -inf is empty. ``add`` merges a step's new hypotheses in with a
    stable sort, so among equal scores the earlier (and within a step, the better-ranked
    candidate) comes first.
    """

    score: torch.Tensor  # (n, k) ranking score
    log_prob: torch.Tensor  # (n, k)
    tokens: torch.Tensor  # (n, k, T) without BOS; PAD after the last word
    length: torch.Tensor  # (n, k) words, EOS not counted
    attention: torch.Tensor | None  # (n, k, T, S), only when kept

    @classmethod
    def empty(cls, n: int, k: int, steps: int, src_len: int | None, device: torch.device) -> _Finished:
        attention = None if src_len is None else torch.zeros(n, k, steps, src_len, device=device)
        return cls(torch.full((n, k), float("-inf"), device=device), torch.zeros(n, k, device=device),
                   torch.full((n, k, steps), PAD, dtype=torch.long, device=device),
                   torch.zeros(n, k, dtype=torch.long, device=device), attention)

    def add(self, sentences: torch.Tensor, score: torch.Tensor, log_prob: torch.Tensor, tokens: torch.Tensor,
            length: int, attention: torch.Tensor | None) -> torch.Tensor:
        """Merge (n', k) new hypotheses (score -inf where none) of ``sentences`` (n',);
        returns the sentences' merged scores (n', k)."""
        k = score.size(1)
        scores = torch.cat([self.score[sentences], score], 1)  # (n', 2k)
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (n', k)

        def merged(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            both = torch.cat([old[sentences], new], 1)  # (n', 2k, ...)
            return both.gather(1, order.view(*order.shape, *[1] * (both.dim() - 2)).expand(-1, -1, *both.shape[2:]))

        best = scores.gather(1, order)
        self.score[sentences] = best
        self.log_prob[sentences] = merged(self.log_prob, log_prob)
        self.tokens[sentences] = merged(self.tokens, tokens)
        self.length[sentences] = merged(self.length, torch.full_like(self.length[sentences], length))
        if self.attention is not None and attention is not None:
            self.attention[sentences] = merged(self.attention, attention)
        return best

    def hypotheses(self, n_best: int) -> list[list[Hypothesis]]:
        """Each sentence's n_best hypotheses, best first (one copy to the host)."""
        scores, log_probs = self.score.tolist(), self.log_prob.tolist()
        tokens, lengths = self.tokens.tolist(), self.length.tolist()
        out = []
        for i, row in enumerate(scores):
            out.append([Hypothesis(tokens[i][j][: lengths[i][j]], score, log_probs[i][j],
                                   None if self.attention is None else self.attention[i, j, : lengths[i][j] + 1])
                        for j, score in enumerate(row[:n_best]) if score > float("-inf")])
        return out


def _candidates(log_probs: torch.Tensor, scores: torch.Tensor, at_limit: torch.Tensor, step: int, min_len: int,
                never: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best ``count`` continuations of each sentence over its k rows, best first: their
    cumulative log-probs, rows (of N) and tokens, each (n, count); where there are fewer
    than ``count`` (k * V, at the first step of a tiny vocabulary), the rest are -inf.

    ``log_probs`` (N, V) of target token ``step`` (overwritten: the vocabulary-wide passes
    run in place), ``scores`` (n, k) the rows' cumulative log-probs, ``at_limit`` (n,) the
    sentences that must end at this step.
    """
    n, k = scores.shape
    vocab = log_probs.size(-1)
    eos = _forbid(log_probs, step, min_len, never)  # (N,)
    row_limit = at_limit.repeat_interleave(k)  # (N,)
    row_scores = scores.view(-1)  # (N,)
    # A row at its limit may only end: every other token gets -inf, EOS its own log-prob.
    total = log_probs.add_(row_scores.masked_fill(row_limit, float("-inf"))[:, None])  # (N, V)
    total[:, EOS] = torch.where(row_limit, eos + row_scores, total[:, EOS])
    cand_scores, cand = total.view(n, k * vocab).topk(min(count, k * vocab), dim=-1)  # (n, count)
    if cand.size(1) < count:  # the missing ones: -inf, on the sentence's first row, token PAD
        cand_scores = F.pad(cand_scores, (0, count - cand.size(1)), value=float("-inf"))
        cand = F.pad(cand, (0, count - cand.size(1)), value=PAD)
    rows = cand // vocab + torch.arange(n, device=cand.device)[:, None] * k
    return cand_scores, rows, cand % vocab


def _retired(best: torch.Tensor, next_scores: torch.Tensor, limits: torch.Tensor, step: int,
             cfg: SearchConfig) -> torch.Tensor:
    """(n_alive,) True for the sentences whose search is over after target token ``step``.

    ``best`` (n_alive, k) holds each alive sentence's finished scores, best first (-inf for
    an empty slot); ``next_scores`` (n_alive, k) the cumulative log-probs of the beams that go on.
    """
    done = limits <= step + 1
    if cfg.stop == "standard":
        return done | torch.isfinite(best[:, cfg.beam - 1])  # beam finished hypotheses
    # The exact rule. An alive beam has step + 1 tokens and cumulative log-prob s <= 0; any
    # hypothesis it leads to ends with a length L in [step + 2, limit] (EOS included) and a
    # log-prob s' <= s, since every further token adds a log-prob <= 0 (the rules only
    # remove tokens, they never renormalize). lp(L) > 0, so s' / lp(L) <= s / lp(L), and as
    # s <= 0 this grows with lp(L): it is at most s / max(lp(step + 2), lp(limit)) because lp
    # is monotone in L (increasing for alpha >= 0, decreasing for alpha < 0). The coverage
    # term beta * sum_i log(min(c_i, 1)) is <= 0 (beta >= 0, checked in the config) and only
    # rises towards 0 as coverage c_i accumulates, so 0 is the best it can still reach (an
    # attention need not sum to 1 under the model contract, so nothing tighter holds). Beams that leave the
    # beam later cannot finish at all. Hence no alive beam can beat the bound
    #     max_beams(s) / max(lp(step + 2), lp(limit)) + 0,
    # and once that is <= the n_best-th finished score, nothing alive can change the output
    # (a tie would rank after the hypothesis already there: the sort is stable).
    alpha = cfg.length_penalty
    lp_max = length_penalty(limits.float(), alpha).clamp(min=length_penalty(step + 2, alpha))
    bound = next_scores.max(-1).values / lp_max  # (n_alive,)
    # Fewer than n_best finished: the slot is -inf, and any alive hypothesis would still be kept.
    return done | (bound <= best[:, cfg.n_best - 1])


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, cfg: SearchConfig,
                keep_attention: bool = False, memory: Memory | None = None) -> list[list[Hypothesis]]:
    """The ``cfg.n_best`` best hypotheses of each sentence, best first.

    ``memory`` is ``model.encode(src, src_lens)`` when the caller already has it. Rows are
    sentence-major: row r belongs to alive sentence r // k (k = 1 at the first step). Host syncs: the longest limit
    once, one per step (which sentences go on, which decides the shape of the next step),
    and the finished hypotheses copied out once at the end; everything else stays on the
    device.
    """
    device = src.device
    n, k = src.size(0), cfg.beam
    alpha, beta = cfg.length_penalty, cfg.coverage_penalty
    limits = max_lengths(src_lens, cfg, model.max_positions)  # (n,)
    steps = int(limits.max())
    memory = model.encode(src, src_lens) if memory is None else memory
    need_attention = beta > 0 or keep_attention
    # All k beams of a sentence are the same before the first token: the first step decodes
    # one row per sentence, and its 2k best continuations give the k beams (select widens).
    state = model.init_state(memory, beam=1)
    never = torch.tensor(NEVER_GENERATED, device=device)
    src_mask = memory.mask.float()  # (n_alive, S)
    alive = torch.arange(n, device=device)  # original sentence of each alive sentence
    sent_limits = limits  # (n_alive,)
    scores = torch.zeros(n, 1, device=device)  # (n_alive, rows per sentence) cumulative log-probs
    history = torch.full((n, steps + 1), PAD, dtype=torch.long, device=device)  # (N, T + 1)
    history[:, 0] = BOS
    coverage = None  # (N, S) attention summed over steps, for the coverage penalty
    attn_history = torch.zeros(n, steps, src.size(1), device=device) if keep_attention else None  # (N, T, S)
    finished = _Finished.empty(n, k, steps, src.size(1) if keep_attention else None, device)

    for t in range(steps):
        log_probs, state = model.step(history[:, t], state, need_attention)  # (N, V)
        if need_attention and state.attention is None:  # a model without attention
            need_attention, attn_history, finished.attention = False, None, None
        if beta > 0:
            coverage = state.attention if coverage is None else coverage + state.attention
        if attn_history is not None:
            attn_history[:, t] = state.attention
        cand_scores, cand_row, cand_tok = _candidates(log_probs, scores, sent_limits <= t + 1, t, cfg.min_len,
                                                      never, 2 * k)  # (n_alive, 2k) each
        is_eos = (cand_tok == EOS) & torch.isfinite(cand_scores)

        # Finalize the EOS candidates ranked within the beam.
        ends = is_eos[:, :k]  # (n_alive, k)
        ending_rows = cand_row[:, :k]
        log_prob = cand_scores[:, :k].masked_fill(~ends, float("-inf"))
        ranked = log_prob / length_penalty(torch.tensor(t + 1.0), alpha)
        if coverage is not None:
            ranked = ranked + coverage_penalty(coverage[ending_rows], src_mask[:, None, :], beta)
        best = finished.add(alive, ranked.masked_fill(~ends, float("-inf")), log_prob,
                            history[ending_rows, 1:], t,
                            None if attn_history is None else attn_history[ending_rows])

        # The next beams: the best k candidates that are not EOS.
        rank = torch.arange(2 * k, device=device).expand_as(cand_tok) + is_eos * (2 * k)
        pick = rank.topk(k, dim=-1, largest=False).indices  # (n_alive, k)
        next_scores = cand_scores.gather(1, pick)  # (n_alive, k)
        done = _retired(best, next_scores, sent_limits, t, cfg)
        keep = (~done).nonzero().flatten()  # the step's one host sync: which sentences go on
        if keep.numel() == 0:
            break
        rows, new_tok = cand_row.gather(1, pick), cand_tok.gather(1, pick)  # (n_alive, k)
        sentences = None
        if keep.numel() < len(alive):  # sentences leave: re-index what is kept per sentence
            sentences = keep
            rows, new_tok, next_scores = rows[keep], new_tok[keep], next_scores[keep]
            alive, sent_limits, src_mask = alive[keep], sent_limits[keep], src_mask[keep]
        rows = rows.flatten()  # (N',)
        scores = next_scores
        history = history.index_select(0, rows)
        history[:, t + 1] = new_tok.flatten()
        state = state.select(rows, sentences)
        if coverage is not None:
            coverage = coverage.index_select(0, rows)
        if attn_history is not None:
            attn_history = attn_history.index_select(0, rows)

    finished.tokens = _vocabulary_ids(finished.tokens, memory)  # PAD after the last word stays PAD
    return finished.hypotheses(cfg.n_best)


_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor, x: torch.Tensor | int) -> torch.Tensor:
    """A 32-bit hash of ``h`` and ``x`` (int64 values in [0, 2^32)), elementwise. The
    multipliers are below 2^31, so no product of two 32-bit values leaves int64."""
    h = h ^ x
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    return h ^ (h >> 16)


def _mix(h: torch.Tensor, x: torch.Tensor | int) -> torch.Tensor:
    """``_mix32`` of ``h`` and a 64-bit ``x`` >= 0, a half at a time."""
    return _mix32(_mix32(h, x & _M32), (x >> 32) & _M32)


def sample_keys(seed: int, lines: torch.Tensor, samples: int, steps: int) -> torch.Tensor:
    """(n * samples, steps) int64 keys: row i * samples + j, column t is the key of the draw of
    sample j of the sentence on input line ``lines[i]`` at target token t."""
    device = lines.device
    key = _mix(_mix(torch.zeros((), dtype=torch.long, device=device), seed & ((1 << 64) - 1)), lines)  # (n,)
    key = _mix(key[:, None], torch.arange(samples, device=device)).flatten()  # (n * samples,)
    return _mix(key[:, None], torch.arange(steps, device=device))  # (N, T)


def _gumbel(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gumbel noise (N, K) for the draws ``keys`` (N,) and the vocabulary ids ``tokens`` (N, K)."""
    bits = _mix32(keys[:, None], tokens)
    u = ((bits >> 8).float() + 0.5) / (1 << 24)  # 24 bits: exact in float32, never 0 or 1
    return -(-u.log()).log()


def _draw(log_probs: torch.Tensor, keys: torch.Tensor, rule: tuple[str, float], temperature: float,
          columns: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) tokens drawn from the (N, V) allowed log-probs (-inf: not allowed), one per key (N,).

    Gumbel-max over the tokens the rule keeps: each token's tempered log-prob plus noise
    hashed from (key, token id), the largest wins. That draws from the kept tokens'
    renormalized distribution, and a tiny change of the log-probs (another batch size
    rounds differently) changes a draw only when two noisy scores are that close. With
    ``columns`` (a shortlist's, see ``_vocabulary_ids``) the noise is hashed from the vocabulary
    id, not from the column, whose index depends on the other sentences of the batch.
    """
    kind, value = rule
    scaled = log_probs / temperature
    vocab = scaled.size(-1)
    if kind == "topk":
        scaled, tokens = scaled.topk(min(int(value), vocab), dim=-1)  # (N, K)
    elif value >= 1:  # every allowed token
        tokens = torch.arange(vocab, device=scaled.device).expand_as(scaled)
    else:
        # The nucleus lies among the most probable few tokens but for the flattest of
        # distributions: look among the top 64, then 1024, and sort everything only when
        # some row needs it (a host sync per try: a full sort costs far more).
        norm = scaled.logsumexp(-1, keepdim=True)  # (N, 1)
        for k in (64, 1024, vocab):
            top, tokens = scaled.topk(min(k, vocab), dim=-1)  # (N, K), most probable first
            probs = (top - norm).exp()
            cdf = probs.cumsum(-1)
            if k >= vocab or bool((cdf[:, -1] >= value).all()):
                break
        # The smallest nucleus: a token is kept while the mass before it is below p.
        scaled = top.masked_fill(cdf - probs >= value, float("-inf"))
    ids = tokens if columns is None else columns[tokens]
    pick = (scaled + _gumbel(keys, ids)).argmax(-1, keepdim=True)  # (N, 1)
    return tokens.gather(1, pick).squeeze(1)


@torch.no_grad()
def sample_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, cfg: SearchConfig,
                  keep_attention: bool = False, memory: Memory | None = None,
                  lines: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """``cfg.n_best`` translations drawn for each sentence, in draw order (see the module's doc).

    ``lines`` (n,) are the sentences' line numbers in the input (default 0..n-1): with the
    seed they fix the draws. Each sample decodes in its own row, and a row leaves the batch
    when its sample ends. Host syncs as in ``greedy_search``, and for top-p below 1 one more
    per step (whether the nucleus lies within the top 64 tokens; see ``_draw``).
    """
    device = src.device
    n, k = src.size(0), cfg.n_best
    rule = cfg.sampling_rule()
    assert rule is not None, "sample_search needs cfg.sampling"
    lines = torch.arange(n, device=device) if lines is None else lines.to(device)
    limits = max_lengths(src_lens, cfg, model.max_positions).repeat_interleave(k)  # (n * k,)
    steps = int(limits.max())
    # Every sample its own sentence (rows then leave one by one, as in greedy search): with
    # several samples the source is encoded once per sample, since a model's memory is its own.
    if k > 1:
        memory = model.encode(src.repeat_interleave(k, 0), src_lens.repeat_interleave(k))
    elif memory is None:
        memory = model.encode(src, src_lens)
    state = model.init_state(memory, beam=1)
    keys = sample_keys(cfg.seed, lines, k, steps)  # (n * k, T)
    out, final, attention = _rows_until_eos(
        model, state, limits, cfg,
        lambda log_probs, alive, t: _draw(log_probs, keys[alive, t], rule, cfg.temperature, memory.columns),
        src.size(1) if keep_attention else 0)
    alpha = cfg.length_penalty
    hyps: list[list[Hypothesis]] = [[] for _ in range(n)]
    for r, (row, log_prob) in enumerate(zip(_vocabulary_ids(out, memory).tolist(), final.tolist())):
        words = row[: row.index(EOS)]
        attn = None if attention is None else attention[r, : len(words) + 1]
        hyps[r // k].append(Hypothesis(words, log_prob / length_penalty(len(words) + 1, alpha), log_prob, attn))
    return hyps


def search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, cfg: SearchConfig,
           keep_attention: bool = False, memory: Memory | None = None,
           lines: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Sampling when ``cfg.sampling`` asks for it (``lines``: see ``sample_search``); else greedy
    for beam 1 (unless attention or an n-best list is wanted), beam search otherwise."""
    if cfg.sampling != "none":
        return sample_search(model, src, src_lens, cfg, keep_attention, memory, lines)
    if cfg.beam == 1 and cfg.n_best == 1 and not keep_attention:
        return greedy_search(model, src, src_lens, cfg, memory)
    return beam_search(model, src, src_lens, cfg, keep_attention, memory)
