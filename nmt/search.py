"""Greedy and batched beam search over the Seq2Seq contract.

The search sees a model only through ``encode``, ``init_state``, ``step``,
``state.select`` and ``state.attention``; it never asks which model it has. Its settings
are a ``SearchConfig`` (nmt/config.py), the one place that holds their defaults.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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


def apply_rules(log_probs: torch.Tensor, step: int, at_limit: torch.Tensor, min_len: int) -> torch.Tensor:
    """The (N, V) log-probs of target token ``step`` (0-based) with the module's rules applied.

    ``at_limit`` (N,) marks the rows whose sentence must end at this step.
    """
    ids = torch.arange(log_probs.size(-1), device=log_probs.device)  # (V,)
    never = (ids == PAD) | (ids == BOS) | (ids == UNK)
    if step < min_len:
        never |= ids == EOS
    forbidden = torch.where(at_limit[:, None], ids != EOS, never)  # (N, V)
    return log_probs.masked_fill(forbidden, float("-inf"))


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, cfg: SearchConfig,
                  memory: Memory | None = None) -> list[list[Hypothesis]]:
    """Most probable allowed token at every step; finished sentences leave the batch.

    ``memory`` is ``model.encode(src, src_lens)`` when the caller already has it.
    """
    n = src.size(0)
    limits = max_lengths(src_lens, cfg, model.max_positions)
    state = model.init_state(model.encode(src, src_lens) if memory is None else memory)
    alive = torch.arange(n, device=src.device)  # original sentence of each row
    tokens = torch.full((n,), BOS, dtype=torch.long, device=src.device)
    out: list[list[int]] = [[] for _ in range(n)]
    scores = [0.0] * n
    total = torch.zeros(n, device=src.device)
    for t in range(int(limits.max())):
        log_probs, state = model.step(tokens, state)  # (N, V)
        log_probs = apply_rules(log_probs, t, limits[alive] <= t + 1, cfg.min_len)
        best, tokens = log_probs.max(-1)
        total = total + best
        done = tokens == EOS
        # One transfer per step for every row, not one per token.
        for sent, tok in zip(alive.tolist(), tokens.tolist()):
            if tok != EOS:
                out[sent].append(tok)
        if bool(done.any()):
            for row in done.nonzero().flatten().tolist():
                scores[int(alive[row])] = float(total[row])
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            alive, tokens, total = alive[keep], tokens[keep], total[keep]
            state = state.select(keep)
    alpha = cfg.length_penalty
    return [[Hypothesis(out[i], scores[i] / length_penalty(len(out[i]) + 1, alpha), scores[i])]
            for i in range(n)]


def _retired(finished: list[list[Hypothesis]], next_scores: torch.Tensor, limits: torch.Tensor,
             step: int, cfg: SearchConfig) -> torch.Tensor:
    """(n_alive,) True for the sentences whose search is over after target token ``step``.

    ``finished`` holds each alive sentence's finished hypotheses, best first;
    ``next_scores`` (n_alive, k) the cumulative log-probs of the beams that go on.
    """
    device = next_scores.device
    done = limits <= step + 1
    if cfg.stop == "standard":
        return done | torch.tensor([len(f) >= cfg.beam for f in finished], device=device)
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
    # Fewer than n_best finished: any alive hypothesis would still be kept (-inf).
    worst = torch.tensor([f[cfg.n_best - 1].score if len(f) >= cfg.n_best else float("-inf")
                          for f in finished], device=device)
    return done | (bound <= worst)


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, cfg: SearchConfig,
                keep_attention: bool = False, memory: Memory | None = None) -> list[list[Hypothesis]]:
    """The ``cfg.n_best`` best hypotheses of each sentence, best first.

    ``memory`` is ``model.encode(src, src_lens)`` when the caller already has it.
    """
    device = src.device
    n, k = src.size(0), cfg.beam
    alpha, beta = cfg.length_penalty, cfg.coverage_penalty
    limits = max_lengths(src_lens, cfg, model.max_positions)
    memory = model.encode(src, src_lens) if memory is None else memory
    src_mask = memory.mask.float()  # (n, S)
    state = model.init_state(memory).select(torch.arange(n, device=device).repeat_interleave(k))
    alive = torch.arange(n, device=device)  # original sentence of each alive sentence
    scores = torch.zeros(n, k, device=device)  # (n_alive, k) cumulative log-probs
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    history = torch.full((n * k, 1), BOS, dtype=torch.long, device=device)  # (N, t + 1)
    coverage = None  # (N, S) attention summed over steps
    attn_history: list[torch.Tensor] = []  # per step, (N, S), only when keep_attention
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]

    for t in range(int(limits.max())):
        log_probs, state = model.step(history[:, -1], state)  # (N, V)
        vocab = log_probs.size(-1)
        if state.attention is not None:
            coverage = state.attention if coverage is None else coverage + state.attention
            if keep_attention:
                attn_history.append(state.attention)
        at_limit = (limits[alive] <= t + 1).repeat_interleave(k)
        log_probs = apply_rules(log_probs, t, at_limit, cfg.min_len)
        total = (scores.view(-1, 1) + log_probs).view(-1, k * vocab)  # (n_alive, k * V)
        cand_scores, cand = total.topk(2 * k, dim=-1)  # (n_alive, 2k)
        cand_beam, cand_tok = cand // vocab, cand % vocab
        cand_row = cand_beam + torch.arange(len(alive), device=device)[:, None] * k  # rows of N
        is_eos = (cand_tok == EOS) & torch.isfinite(cand_scores)

        # Finalize EOS candidates ranked within the beam.
        to_finish = is_eos[:, :k].nonzero().tolist()
        if to_finish:
            rows = [int(cand_row[i, j]) for i, j in to_finish]
            lengths = torch.tensor([t + 1] * len(rows), dtype=torch.float)
            final = cand_scores[[i for i, _ in to_finish], [j for _, j in to_finish]].float().cpu()
            ranked = final / length_penalty(lengths, alpha)
            if coverage is not None and beta:
                rows_t = torch.tensor(rows, device=device)
                sent_t = torch.tensor([i for i, _ in to_finish], device=device)
                ranked = ranked + coverage_penalty(coverage[rows_t], src_mask[alive[sent_t]], beta).cpu()
            hist = history[rows, 1:].tolist()
            for (i, _), row, h, score, lp in zip(to_finish, rows, hist, ranked.tolist(), final.tolist()):
                attn = torch.stack([a[row] for a in attn_history]) if attn_history else None
                finished[int(alive[i])].append(Hypothesis(h, score, lp, attn))
            # Keep the best k by ranking score, not the first k to arrive.
            for sent in {int(alive[i]) for i, _ in to_finish}:
                finished[sent].sort(key=lambda h: -h.score)
                del finished[sent][k:]

        # The next beams: the best k candidates that are not EOS.
        rank = torch.arange(2 * k, device=device).expand_as(cand) + is_eos * (2 * k)
        pick = rank.topk(k, dim=-1, largest=False).indices  # (n_alive, k)
        next_scores = cand_scores.gather(1, pick)  # (n_alive, k)
        done = _retired([finished[s] for s in alive.tolist()], next_scores, limits[alive], t, cfg)
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0:
            break
        pick = pick[keep]
        rows = cand_row[keep].gather(1, pick).flatten()  # (N',)
        scores = next_scores[keep]
        new_tok = cand_tok[keep].gather(1, pick).flatten()
        history = torch.cat([history[rows], new_tok[:, None]], dim=1)
        state = state.select(rows)
        if coverage is not None:
            coverage = coverage[rows]
        attn_history = [a[rows] for a in attn_history]
        alive = alive[keep]

    out = []
    for hyps in finished:
        hyps.sort(key=lambda h: -h.score)
        out.append(hyps[: cfg.n_best])
    return out


def search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, cfg: SearchConfig,
           keep_attention: bool = False, memory: Memory | None = None) -> list[list[Hypothesis]]:
    """Greedy for beam 1 (unless attention or an n-best list is wanted), beam search otherwise."""
    if cfg.beam == 1 and cfg.n_best == 1 and not keep_attention:
        return greedy_search(model, src, src_lens, cfg, memory)
    return beam_search(model, src, src_lens, cfg, keep_attention, memory)
