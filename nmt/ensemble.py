"""Several models decoding as one: an ensemble that speaks the Seq2Seq contract.

At every step each member gives its log-probs for the next token and the ensemble's are
the log of the members' mean probability,

    log p(y) = log (1/M) sum_m p_m(y) = logsumexp_m log p_m(y) - log M,

so the search (greedy or beam, nmt/search.py) runs on an ensemble as on any model, with
one batch of rows for all members. Members may be of different kinds (a Transformer with a
GNMT); they must share the vocabulary, i.e. the SentencePiece model, which ``load_ensemble``
checks. The ensemble's memory and decoder state hold one part per member, and ``select``
hands the rows (and the sentences that stay) on to every part. When the search asks for
attention it gets the mean over the members that give one (None when none does).

With a vocabulary shortlist (nmt/shortlist.py) every member is shortlisted on its own: each
computes the same columns and per-sentence lists from the same source, so the members'
restricted log-probs cover the same columns and are averaged as they are, and the
ensemble's memory hands on the first member's ``columns``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nmt.errors import NmtError
from nmt.models.base import DecoderState, Memory, Seq2Seq


def log_mean_exp(log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of ``exp(x)`` over the tensors ``x`` (all of one shape), computed so that
    equal inputs give back exactly themselves (an ensemble of a model with itself is the model).
    """
    if len(log_probs) == 1:
        return log_probs[0]
    stacked = torch.stack(list(log_probs))  # (M, ...)
    top = stacked.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # -inf everywhere stays -inf
    return top + (stacked - top).exp().mean(0).log()


@dataclass
class EnsembleMemory:
    parts: list[Memory]  # one per member
    mask: torch.Tensor  # (B, S) True at real source tokens (the same for every member)
    columns: torch.Tensor | None = None  # (V',) the members' log-prob columns (the same for every member)


@dataclass
class EnsembleState:
    parts: tuple[DecoderState, ...]  # one per member
    attention: torch.Tensor | None = None  # (N, S) the members' mean, when asked for

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> EnsembleState:
        return EnsembleState(tuple(part.select(rows, sentences) for part in self.parts),
                             None if self.attention is None else self.attention.index_select(0, rows))


class Ensemble(Seq2Seq):
    """The members' probabilities averaged at every step; accepts what every member accepts."""

    kind = "ensemble"

    def __init__(self, members: Sequence[Seq2Seq]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    @property
    def max_positions(self) -> int:
        return min(m.max_positions for m in self.members)

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """(B, T, V) the ensemble's log-probs (as logits, they give its distribution)."""
        return log_mean_exp([m(src, src_lens, tgt_in).log_softmax(-1) for m in self.members])

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> EnsembleMemory:
        parts = [m.encode(src, src_lens) for m in self.members]
        return EnsembleMemory(parts, parts[0].mask, parts[0].columns)

    def init_state(self, memory: EnsembleMemory, beam: int = 1) -> EnsembleState:
        return EnsembleState(tuple(m.init_state(part, beam) for m, part in zip(self.members, memory.parts)))

    def step(self, tokens: torch.Tensor, state: EnsembleState,
             need_attention: bool = False) -> tuple[torch.Tensor, EnsembleState]:
        outputs = [m.step(tokens, part, need_attention) for m, part in zip(self.members, state.parts)]
        log_probs = log_mean_exp([lp for lp, _ in outputs])  # (N, V)
        parts = tuple(part for _, part in outputs)
        attention = None
        if need_attention:
            given = [part.attention for part in parts if part.attention is not None]
            attention = torch.stack(given).mean(0) if given else None  # (N, S)
        return log_probs, EnsembleState(parts, attention)


def load_ensemble(run_dirs: Sequence[Path], which: str = "best", device: str | torch.device = "cpu",
                  int8: bool | None = None, shortlist: str | None = None):
    """(config, tokenizer, model) of one run (``load_run``'s) or of an ensemble of several.

    The config, and so the search settings (``search.yaml`` included), are the first run's;
    ``int8`` resolves as for the first run and then holds for every member. ``which`` (best,
    last, averaged) names the checkpoint of each run. ``shortlist`` ("FIRST,BEST", or "none")
    overrides the config's ``search.shortlist``; where one is set, every member decodes over
    the first run's shortlist table (``nmt.shortlist``; the members share its tokenizer), and
    the returned ``cfg.search.shortlist`` says which.
    """
    from dataclasses import replace

    from nmt.files import sha256
    from nmt.rundir import MODEL_FILE, NAMED_CHECKPOINTS, load_run

    runs = [Path(r) for r in run_dirs]
    if len(runs) > 1 and which not in NAMED_CHECKPOINTS:
        raise NmtError(f"--checkpoint {which}: a checkpoint file is one model; with several --model "
                       "give best, last or averaged (that checkpoint of each run)")
    first = runs[0] / MODEL_FILE
    for run in runs[1:]:
        other = run / MODEL_FILE
        if first.is_file() and other.is_file() and sha256(first) != sha256(other):
            raise NmtError(f"{runs[0]} and {run} have different SentencePiece models ({MODEL_FILE}): an "
                           "ensemble's members must share one (train them with tokenizer.reuse=RUN)")
    cfg, tokenizer, model = load_run(runs[0], which, device, int8)
    if shortlist is not None:
        cfg.search = replace(cfg.search, shortlist=shortlist)
    sizes = cfg.search.shortlist_sizes()
    members = [model] + [load_run(run, which, device, cfg.search.int8)[2] for run in runs[1:]]
    if sizes is not None:
        from nmt.shortlist import Shortlisted, load_table

        table = load_table(runs[0], sizes)
        members = [Shortlisted(m, table, *sizes).eval() for m in members]
    return cfg, tokenizer, members[0] if len(members) == 1 else Ensemble(members).eval()
