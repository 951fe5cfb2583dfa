"""Label-smoothed cross entropy, summed over the target tokens that are not padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmt.tokenizer import PAD


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor,
                       smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, plain NLL), both fp32 sums over non-pad tokens; the NLL is detached.

    logits: (B, T, V); target: (B, T). The smoothing mass is spread over the vocabulary
    (Szegedy et al. 2016), as ``F.cross_entropy(..., label_smoothing=smoothing)`` defines it:
    ``(1 - smoothing) * -log p(y) + smoothing * mean_v -log p(v)``. The NLL is what
    perplexity is computed from.

    One log-softmax serves both, in the logits' own dtype: with bf16/fp16 logits of a
    25k-token batch and a 32k vocabulary, an fp32 copy alone would be 3.2 GB, and the
    log-probabilities kept for backward another 3.2 GB. The kernel accumulates its row sums
    in fp32; the sums over the vocabulary and over tokens below are taken in fp32 too.
    """
    lprobs = F.log_softmax(logits.reshape(-1, logits.size(-1)), dim=-1)  # (B*T, V), logits' dtype
    flat_target = target.reshape(-1)  # (B*T,)
    keep = flat_target != PAD  # (B*T,) padding positions add nothing, whatever their logits
    nll = -lprobs.gather(1, flat_target.unsqueeze(1)).squeeze(1).float()  # (B*T,); PAD=0 is a valid index
    nll = torch.where(keep, nll, 0.0).sum()
    if smoothing == 0.0:
        return nll, nll.detach()
    uniform = -lprobs.sum(dim=-1, dtype=torch.float32) / lprobs.size(-1)  # (B*T,) mean over the vocabulary
    uniform = torch.where(keep, uniform, 0.0).sum()
    return (1.0 - smoothing) * nll + smoothing * uniform, nll.detach()
