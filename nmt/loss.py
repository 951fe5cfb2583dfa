"""Label-smoothed cross entropy, summed over the target tokens that are not padding.

``sequence_loss`` is what training and validation call: the model's ``features`` once, then
its output layer, log-softmax and loss over slices of the real (non-padding) target tokens,
each slice's backward pass run before the next slice is formed. The (tokens x vocabulary)
tensors of a whole batch (logits, log-probabilities and their gradients, four of them, 131
MB each at 4,096 tokens and 8k pieces in fp32, 3.2 GB at 25k tokens and 32k) never exist;
at most one slice's do. Nothing is computed twice: the slices' gradients are gathered at the
features and sent through the rest of the model in one backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from nmt.models.base import Seq2Seq
from nmt.tokenizer import PAD

# Most elements of a slice's (tokens x vocabulary) logits: 16 MB in fp32.
SLICE_ELEMENTS = 1 << 22


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


def sequence_loss(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor,
                  tgt_out: torch.Tensor, smoothing: float,
                  backward: Callable[[torch.Tensor], None] | None = None,
                  autocast: AbstractContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, NLL) of a batch, as ``label_smoothed_nll(model(...), tgt_out)`` gives them.

    With ``backward`` (what runs a loss tensor's backward pass, e.g. with a loss scale), the
    gradients of the loss are accumulated into the model's parameters as ``backward(loss)``
    would, and the returned loss is detached. ``autocast`` wraps the model's forward computations.
    """
    autocast = autocast or nullcontext()
    with autocast:
        features = model.features(src, src_lens, tgt_in)  # (B, T, D)
    keep = (tgt_out != PAD).reshape(-1)  # (B*T,)
    flat = features.reshape(-1, features.size(-1))[keep]  # (K, D) real target positions
    target = tgt_out.reshape(-1)[keep]  # (K,)
    leaf = flat.detach().requires_grad_() if backward is not None else flat
    rows = max(1, SLICE_ELEMENTS // model.vocab_size)
    # The batch's gradient is formed on its own and then added to what the parameters hold
    # (earlier micro-batches), as one backward pass adds it: the sums are then taken in the
    # same order whether the micro-batches ran here or on other ranks. They are set aside
    # only when the first backward pass starts, so running out of memory before leaves them be.
    params = [p for p in model.parameters() if p.requires_grad]
    held: list[torch.Tensor | None] | None = None
    loss_sum = nll_sum = torch.zeros((), device=flat.device)
    for start in range(0, flat.size(0), rows):
        with autocast:
            logits = model.logits(leaf[start : start + rows])  # (rows, V)
        loss, nll = label_smoothed_nll(logits, target[start : start + rows], smoothing)
        del logits  # the loss keeps the log-probabilities it needs
        if backward is not None:
            if held is None:
                held = [p.grad for p in params]
                for p in params:
                    p.grad = None
            backward(loss)  # into leaf.grad and the output layer's parameters
            loss = loss.detach()
        loss_sum, nll_sum = loss_sum + loss, nll_sum + nll
    if backward is not None:
        flat.backward(leaf.grad)
        for p, grad in zip(params, held or []):
            if grad is not None:
                p.grad = grad if p.grad is None else grad.add_(p.grad)
    return loss_sum, nll_sum
