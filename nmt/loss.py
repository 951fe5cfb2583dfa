"""Label-smoothed cross entropy, summed over the target tokens that are not padding, as
``F.cross_entropy(..., label_smoothing=s, ignore_index=PAD)`` defines it (Szegedy et al. 2016:
``(1 - s) * -log p(y) + s * mean_v -log p(v)``); the NLL without smoothing gives the perplexity.

``sequence_loss`` is what training and validation call: the model's ``features`` once, the
rows of the real (non-padding) target tokens picked by their positions, then the output layer,
log-softmax, loss and their gradients fused in one autograd function (``FusedOutputLoss``)
that walks the rows a chunk at a time. The (tokens x vocabulary) tensors of a whole batch
(logits, log-probabilities and their gradients: 131 MB each at 4,096 tokens and 8k pieces in
fp32, 3.2 GB at 25k tokens and 32k) never exist; at most one chunk's do.

The forward pass forms each chunk's gradient with respect to its logits right away
(``softmax - (1 - s) * onehot - s / V``, no logits kept or recomputed) and turns it into the
gradient with respect to the chunk's features and, added into one fp32 (V, D) buffer, with
respect to the output weight. The backward pass only multiplies them by the incoming gradient:
the caller runs one ``backward()`` for the whole batch, which reaches the tied weight's
gradient once (what DistributedDataParallel needs), and the rows are chunked the same way in
every run (``chunk_rows`` depends on the device kind and the vocabulary only), so the sums
are taken in the same order on every rank and after a resume.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from nmt.models.base import Seq2Seq

# The (rows x V) fp32 log-probabilities of one chunk take at most this share of a GPU's memory
# (a chunk's logits and their gradient in bf16/fp16 add half as much again) ...
CUDA_MEMORY_SHARE = 1 / 64
# ... and a chunk at most this many rows: beyond, the host work per chunk is long amortized.
CUDA_MAX_ROWS = 16384
# On the CPU: most elements of a chunk's (rows x V) logits, 16 MB in fp32.
CPU_CHUNK_ELEMENTS = 1 << 22


def chunk_rows(vocab_size: int, device: torch.device | str) -> int:
    """Target rows per chunk of the fused loss on ``device``, with a vocabulary of ``vocab_size``.

    Fixed by the device kind (its total memory, never what is free at the moment) and the
    vocabulary: the chunks decide the order in which the loss and the gradients are summed,
    which must not change between runs, resumes or ranks.
    """
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        rows = min(CUDA_MAX_ROWS, int(total * CUDA_MEMORY_SHARE) // (4 * vocab_size))
        return max(1, rows // 64 * 64 if rows >= 64 else rows)  # whole tiles of the matrix units
    return max(1, CPU_CHUNK_ELEMENTS // vocab_size)


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float,
               grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk's (smoothed loss, NLL, gradient of the loss w.r.t. the logits).

    logits: (n, V) in the compute dtype, owned by this function (pass a fresh tensor, keep no
    reference: it is freed, or overwritten when fp32, as soon as the log-probabilities exist);
    targets: (n,) ids, none of them padding. The loss and NLL are fp32 sums over the n rows,
    the log-softmax is taken in fp32. With ``grad`` the third value is
    ``softmax - (1 - smoothing) * onehot(targets) - smoothing / V`` in the logits' dtype
    (None without). Training's hook for the logits: tests patch it to see their dtype.
    """
    dtype, vocab = logits.dtype, logits.size(-1)
    if dtype == torch.float32:
        lprobs = torch.log_softmax(logits, -1, out=logits)  # (n, V) in place: one fp32 tensor per chunk
    else:
        lprobs = torch.log_softmax(logits, -1, dtype=torch.float32)  # (n, V) fp32, row sums in fp32
    del logits
    index = targets.unsqueeze(1)  # (n, 1)
    nll = -lprobs.gather(1, index).sum()
    loss = nll if smoothing == 0.0 else (1.0 - smoothing) * nll + smoothing * (-lprobs.sum() / vocab)
    if not grad:
        return loss, nll, None
    probs = lprobs.exp_()  # (n, V) in place
    if smoothing != 0.0:
        probs.sub_(smoothing / vocab)
    probs.scatter_add_(1, index, probs.new_full(index.shape, smoothing - 1.0))
    return loss, nll, probs.to(dtype)


def _fused_forward(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float,
                   chunk: int, dtype: torch.dtype, grad_features: bool, grad_weight: bool):
    """(loss, NLL, gradient w.r.t. ``features`` or None, fp32 gradient w.r.t. ``weight`` or None).

    features (K, D), weight (V, D), targets (K,); the matrix products in ``dtype``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 row, not {chunk}")
    with torch.autocast(features.device.type, enabled=False):  # dtypes are chosen here, explicitly
        w = weight.to(dtype)  # (V, D) the one cast of the output weight per call
        x = features.to(dtype)  # (K, D)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        nll_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        grad = grad_features or grad_weight
        gx = torch.empty_like(x) if grad_features else None  # (K, D)
        gw = None  # (V, D) fp32, from the first chunk on
        for start in range(0, x.size(0), chunk):
            x_c = x[start : start + chunk]  # (n, D)
            loss, nll, g = chunk_loss(torch.mm(x_c, w.t()), targets[start : start + chunk], smoothing, grad)
            loss_sum += loss
            nll_sum += nll
            if g is None:
                continue
            if gx is not None:
                torch.mm(g, w, out=gx[start : start + chunk])
            if grad_weight:
                if gw is None:
                    gw = torch.mm(g.t(), x_c).float()
                elif dtype == torch.float32:
                    gw.addmm_(g.t(), x_c)
                else:
                    gw.add_(torch.mm(g.t(), x_c))  # the chunk's share in the compute dtype, summed in fp32
            del g
    return loss_sum, nll_sum, gx, gw


class FusedOutputLoss(torch.autograd.Function):
    """(smoothed loss, NLL) of ``features @ weight.T`` against ``targets``; see the module docstring.

    ``apply(features, weight, targets, smoothing, chunk, dtype)``: features (K, D), weight
    (V, D), targets (K,); the loss is differentiable, the NLL is not. The gradients are formed
    in the forward pass; the backward pass can run once.
    """

    @staticmethod
    def forward(ctx, features, weight, targets, smoothing, chunk, dtype):
        loss, nll, gx, gw = _fused_forward(features, weight, targets, smoothing, chunk, dtype,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = (gx, gw)
        ctx.dtypes = (features.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_nll):
        if ctx.grads is None:
            raise RuntimeError("the fused loss's gradients were handed on already: its backward runs once")
        gx, gw = ctx.grads
        ctx.grads = None  # handed on, not kept: the weight's gradient can become .grad without a copy
        # Cast first: a wider dtype takes the loss scale (a GradScaler's 65536) with room to spare.
        if gx is not None:
            gx = gx.to(ctx.dtypes[0]).mul_(grad_loss)
        if gw is not None:
            gw = gw.to(ctx.dtypes[1]).mul_(grad_loss)
        return gx, gw, None, None, None, None


def fused_loss(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float,
               chunk: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, NLL), fp32 sums, of the logits ``features @ weight.T`` (K, V) against ``targets`` (K,).

    The matrix products run in ``dtype`` (default the weight's). The loss is differentiable when
    grad mode is on and an input needs a gradient; otherwise only the sums are computed.
    """
    dtype = dtype or weight.dtype
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        return FusedOutputLoss.apply(features, weight, targets, smoothing, chunk, dtype)
    loss, nll, _, _ = _fused_forward(features, weight, targets, smoothing, chunk, dtype, False, False)
    return loss, nll


def sequence_loss(model: Seq2Seq, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor,
                  rows: torch.Tensor, targets: torch.Tensor, smoothing: float,
                  autocast: AbstractContextManager | None = None,
                  chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, NLL) of a batch: ``F.cross_entropy(model(...), tgt_out, label_smoothing=smoothing,
    ignore_index=PAD, reduction="sum")`` and the same without smoothing, computed without the (tokens x
    vocabulary) logits of the whole batch.

    rows (K,): the positions ``b * T + t`` of the real target tokens in the flattened (B, T)
    target, ascending; targets (K,): their ids (``Batch.rows``, ``Batch.targets``). Both results
    are fp32 scalars; the loss is differentiable when grad mode is on (the caller runs one
    ``backward()`` on it, e.g. ``scaler.scale(loss * scale).backward()``), the NLL is detached.
    ``autocast`` wraps the model's forward computations: under it the output layer runs in the
    autocast dtype, its weight cast once per call. ``chunk``: rows per chunk of the output
    layer, by default ``chunk_rows(V, device)``.
    """
    autocast = autocast or nullcontext()
    weight = model.output_weight()  # (V, D)
    with autocast:
        features = model.features(src, src_lens, tgt_in)  # (B, T, D)
        device_type = features.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        flat = features.reshape(-1, features.size(-1)).index_select(0, rows)  # (K, D) real target positions
        return fused_loss(flat, weight, targets, smoothing,
                          chunk_rows(weight.size(0), flat.device) if chunk is None else chunk, dtype)
