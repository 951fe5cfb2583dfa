"""Greedy and batched beam search over the Seq2Seq contract.

The search sees a model only through ``encode``, ``init_state``, ``step``,
``state.select`` and ``state.attention``; it never asks which model it has.

Beam search keeps ``batch * beam`` rows, takes the top ``2 * beam`` candidates over
``beam * vocab`` per sentence (so end-of-sentence candidates cannot empty the beam),
finalizes EOS candidates that rank within the beam, and drops a sentence from the batch
once it has ``beam`` finished hypotheses or reaches its length limit. Finished
hypotheses are ranked by

    log P(Y|X) / lp(Y) + cp(X; Y),   lp(Y) = ((5 + |Y|) / 6) ** alpha,
    cp = beta * sum_i log(min(sum_j a_ij, 1))                            (Wu et al. 2016)

where ``a_ij`` is the attention on source token i at target step j (from
``state.attention``; the coverage term is 0 for a model that gives none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmt.models.base import Seq2Seq
from nmt.tokenizer import BOS, EOS


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


def max_lengths(src_lens: torch.Tensor, a: float, b: int, limit: int) -> torch.Tensor:
    """Most target tokens (EOS included) allowed per sentence: a * |src| + b, capped."""
    return (src_lens.float() * a + b).long().clamp(min=1, max=limit)


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, max_len_a: float = 1.5,
                  max_len_b: int = 10, length_alpha: float = 0.0) -> list[list[Hypothesis]]:
    """Most probable next token at every step; finished sentences leave the batch."""
    n = src.size(0)
    limits = max_lengths(src_lens, max_len_a, max_len_b, model.max_positions)
    state = model.init_state(model.encode(src, src_lens))
    alive = torch.arange(n, device=src.device)  # original sentence of each row
    tokens = torch.full((n,), BOS, dtype=torch.long, device=src.device)
    out: list[list[int]] = [[] for _ in range(n)]
    scores = [0.0] * n
    total = torch.zeros(n, device=src.device)
    for t in range(int(limits.max())):
        log_probs, state = model.step(tokens, state)  # (N, V)
        at_limit = limits[alive] <= t + 1
        log_probs[at_limit, :EOS] = float("-inf")
        log_probs[at_limit, EOS + 1 :] = float("-inf")
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
    return [[Hypothesis(out[i], scores[i] / length_penalty(len(out[i]) + 1, length_alpha), scores[i])]
            for i in range(n)]


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, beam: int = 5,
                length_alpha: float = 0.6, coverage_beta: float = 0.0, max_len_a: float = 1.5,
                max_len_b: int = 10, n_best: int = 1,
                keep_attention: bool = False) -> list[list[Hypothesis]]:
    """The ``n_best`` best hypotheses of each sentence, best first."""
    device = src.device
    n, k = src.size(0), beam
    limits = max_lengths(src_lens, max_len_a, max_len_b, model.max_positions)
    memory = model.encode(src, src_lens)
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
        log_probs[at_limit, :EOS] = float("-inf")
        log_probs[at_limit, EOS + 1 :] = float("-inf")
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
            ranked = final / length_penalty(lengths, length_alpha)
            if coverage is not None and coverage_beta:
                rows_t = torch.tensor(rows, device=device)
                sent_t = torch.tensor([i for i, _ in to_finish], device=device)
                ranked = ranked + coverage_penalty(coverage[rows_t], src_mask[alive[sent_t]],
                                                   coverage_beta).cpu()
            hist = history[rows, 1:].tolist()
            for (i, _), row, h, score, lp in zip(to_finish, rows, hist, ranked.tolist(), final.tolist()):
                attn = torch.stack([a[row] for a in attn_history]) if attn_history else None
                finished[int(alive[i])].append(Hypothesis(h, score, lp, attn))
            # Keep the best k by ranking score, not the first k to arrive.
            for sent in {int(alive[i]) for i, _ in to_finish}:
                finished[sent].sort(key=lambda h: -h.score)
                del finished[sent][k:]

        # Sentences with a full set of finished hypotheses, or at their limit, are done.
        done = torch.tensor([len(finished[int(s)]) >= k for s in alive.tolist()], device=device)
        done |= limits[alive] <= t + 1
        # The next beams: the best k candidates that are not EOS.
        rank = torch.arange(2 * k, device=device).expand_as(cand) + is_eos * (2 * k)
        pick = rank.topk(k, dim=-1, largest=False).indices  # (n_alive, k)
        keep = (~done).nonzero().flatten()
        if keep.numel() == 0:
            break
        pick = pick[keep]
        rows = cand_row[keep].gather(1, pick).flatten()  # (N',)
        scores = cand_scores[keep].gather(1, pick)
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
        out.append(hyps[:n_best])
    return out


def search(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, beam: int = 1,
           **kwargs) -> list[list[Hypothesis]]:
    """Greedy for beam 1 (unless attention is wanted), beam search otherwise."""
    if beam == 1 and not kwargs.get("keep_attention") and kwargs.get("n_best", 1) == 1:
        return greedy_search(model, src, src_lens, kwargs.get("max_len_a", 1.5),
                             kwargs.get("max_len_b", 10), kwargs.get("length_alpha", 0.0))
    return beam_search(model, src, src_lens, beam=beam, **kwargs)
