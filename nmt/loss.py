"""Label-smoothed cross entropy, summed over the target tokens that are not padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmt.tokenizer import PAD


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor,
                       smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, plain NLL), both summed over non-pad tokens.

    logits: (B, T, V); target: (B, T). The smoothing mass is spread over the vocabulary
    (Szegedy et al. 2016); the NLL is what perplexity is computed from.
    """
    flat_logits = logits.reshape(-1, logits.size(-1)).float()  # (B*T, V)
    flat_target = target.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_target, ignore_index=PAD,
                           label_smoothing=smoothing, reduction="sum")
    if smoothing == 0.0:
        return loss, loss.detach()
    with torch.no_grad():
        nll = F.cross_entropy(flat_logits, flat_target, ignore_index=PAD, reduction="sum")
    return loss, nll
