"""The training loss: the definition PyTorch gives label smoothing, padding ignored, and the whole
batch's logits never formed at once; the fused output layer + loss gives the plain path's loss and
gradients, casts the output weight once and forms no gradient under no_grad."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nmt import loss as loss_module
from nmt.loss import chunk_rows, sequence_loss
from nmt.models import build_model
from nmt.tokenizer import PAD


class LargeTensors(TorchDispatchMode):
    """Records every newly allocated tensor of at least ``numel`` elements: (op, dtype, shape).

    With ``width``, also the most tensors of shape (..., width) alive at once (``most_alive``):
    each such allocation is watched until it is freed.
    """

    def __init__(self, numel: int, width: int | None = None):
        super().__init__()
        self.numel, self.width = numel, width
        self.seen: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self.alive: list[weakref.ref] = []
        self.most_alive = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:
                continue  # views allocate nothing
            if t.numel() >= self.numel:
                self.seen.append((str(func), t.dtype, tuple(t.shape)))
            if self.width is not None and t.dim() >= 1 and t.size(-1) == self.width:
                self.alive = [ref for ref in self.alive if ref() is not None] + [weakref.ref(t)]
                self.most_alive = max(self.most_alive, len(self.alive))
        return out


# --- the fused output layer + loss of training and validation

SMOOTHING = 0.1


def tiny(kind: str):
    """A small model of ``kind`` in training mode, a padded batch for it, and its real target rows."""
    from tests.test_models import SMALL, VOCAB

    torch.manual_seed(0)
    model = build_model(SMALL[kind], VOCAB).train()
    return model, *batches(seed=1)[0]


def batches(seed: int, n: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """``n`` padded batches: (src, src_lens, tgt_in, tgt_out, rows, targets), as the collator makes them."""
    from tests.test_models import batch

    out = []
    for i in range(n):
        src, src_lens = batch([7, 5, 2][: 3 - i], seed=seed + 2 * i)
        tgt, _ = batch([6, 8, 3][: 3 - i], seed=seed + 2 * i + 1)
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
        rows = (tgt_out.reshape(-1) != PAD).nonzero().squeeze(1)  # (K,) ascending
        out.append((src, src_lens, tgt_in, tgt_out, rows, tgt_out.reshape(-1)[rows]))
    return out


def plain_loss(model, src, src_lens, tgt_in, tgt_out, smoothing: float = SMOOTHING):
    """The reference: the whole batch's logits and ``F.cross_entropy``."""
    logits = model(src, src_lens, tgt_in)
    flat, target = logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1)
    loss = F.cross_entropy(flat, target, label_smoothing=smoothing, ignore_index=PAD, reduction="sum")
    nll = F.cross_entropy(flat.detach(), target, ignore_index=PAD, reduction="sum")
    return loss, nll


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("smoothing", [0.0, SMOOTHING])
@pytest.mark.parametrize("chunk", [3, None])  # several chunks; one
@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_fused_loss_and_every_gradient_equal_the_plain_path(kind: str, chunk: int | None, smoothing: float) -> None:
    """Loss, NLL and every parameter's gradient (the tied embedding's included) equal those of
    ``F.cross_entropy`` over the whole batch's logits, padding ignored, over any chunking."""
    model, src, src_lens, tgt_in, tgt_out, rows, targets = tiny(kind)
    assert rows.numel() < tgt_out.numel()  # there is padding
    torch.manual_seed(1)  # the same dropout masks for both passes
    expected, expected_nll = plain_loss(model, src, src_lens, tgt_in, tgt_out, smoothing)
    expected.backward()
    grads = gradients(model)

    torch.manual_seed(1)
    loss, nll = sequence_loss(model, src, src_lens, tgt_in, rows, targets, smoothing, chunk=chunk)
    assert loss.dtype == nll.dtype == torch.float32 and loss.dim() == nll.dim() == 0
    assert loss.requires_grad and not nll.requires_grad
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert nll.item() == pytest.approx(expected_nll.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_gradients_accumulated_over_two_micro_batches_equal_the_plain_path(kind: str) -> None:
    """One backward pass per micro-batch, their gradients summed in the parameters, with a scale
    on the loss as the trainer has: the plain path's gradients."""
    model, *_ = tiny(kind)
    micro = batches(seed=5, n=2)
    torch.manual_seed(1)
    for src, src_lens, tgt_in, tgt_out, _, _ in micro:
        (plain_loss(model, src, src_lens, tgt_in, tgt_out)[0] * 0.5).backward()
    grads = gradients(model)

    torch.manual_seed(1)
    for src, src_lens, tgt_in, _, rows, targets in micro:
        loss, _ = sequence_loss(model, src, src_lens, tgt_in, rows, targets, SMOOTHING, chunk=4)
        (loss * 0.5).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_one_chunks_logits_at_a_time(kind: str) -> None:
    """No (rows x V) tensor of more than a chunk's rows is allocated, forward or backward, and in
    fp32 only one is alive at a time (logits, log-probabilities and their gradient share it)."""
    from tests.test_models import VOCAB

    model, src, src_lens, tgt_in, _, rows, targets = tiny(kind)
    with LargeTensors(4 * VOCAB, width=VOCAB) as mode:
        loss, _ = sequence_loss(model, src, src_lens, tgt_in, rows, targets, SMOOTHING, chunk=3)
        loss.backward()
    shapes = [shape for _, _, shape in mode.seen if shape[-1] == VOCAB]
    assert shapes == [], shapes  # none of over 3 rows
    assert mode.most_alive == 1


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_bf16_autocast_casts_the_output_weight_once_per_micro_batch(kind: str, monkeypatch) -> None:
    """Under bf16 autocast the logits are bf16 and the tied weight is cast once per call (not once
    per chunk): forward and backward of each micro-batch; its gradient stays fp32."""
    model, src, src_lens, tgt_in, _, rows, targets = tiny(kind)
    weight = model.output_weight()
    dtypes = set()
    hook = loss_module.chunk_loss
    monkeypatch.setattr(loss_module, "chunk_loss",
                        lambda logits, *args: dtypes.add(logits.dtype) or hook(logits, *args))

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0] is weight:
                WeightCasts.count += 1
            return func(*args, **(kwargs or {}))

    autocast = torch.autocast("cpu", torch.bfloat16)
    for micro_batch in (1, 2):
        with WeightCasts():
            loss, nll = sequence_loss(model, src, src_lens, tgt_in, rows, targets, SMOOTHING,
                                      autocast=autocast, chunk=3)
            loss.backward()
        assert WeightCasts.count == micro_batch
    assert dtypes == {torch.bfloat16}
    assert loss.dtype == nll.dtype == weight.grad.dtype == torch.float32
    model.zero_grad(set_to_none=True)
    expected, _ = sequence_loss(model.eval(), src, src_lens, tgt_in, rows, targets, SMOOTHING, chunk=3)
    with torch.no_grad():
        reduced, _ = sequence_loss(model, src, src_lens, tgt_in, rows, targets, SMOOTHING, autocast=autocast)
    assert reduced.item() == pytest.approx(expected.item(), rel=2e-2)


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_no_grad_gives_the_same_loss_and_forms_no_gradient(kind: str) -> None:
    """Validation: the loss and NLL of the training path, bit for bit, and no (V, D) gradient buffer."""
    model, src, src_lens, tgt_in, _, rows, targets = tiny(kind)
    model.eval()
    shape = tuple(model.output_weight().shape)
    with LargeTensors(1) as mode:
        loss, nll = sequence_loss(model, src, src_lens, tgt_in, rows, targets, SMOOTHING, chunk=3)
    assert [seen for seen in mode.seen if seen[2] == shape] == [("aten.mm.default", torch.float32, shape)]
    with torch.no_grad(), LargeTensors(1) as mode:
        loss_ng, nll_ng = sequence_loss(model, src, src_lens, tgt_in, rows, targets, SMOOTHING, chunk=3)
    assert [seen for seen in mode.seen if seen[2] == shape] == []
    assert not loss_ng.requires_grad
    assert torch.equal(loss_ng, loss.detach()) and torch.equal(nll_ng, nll)


def test_chunk_rows_follow_the_device_kind_and_the_vocabulary(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert chunk_rows(32000, cpu) == 2**22 // 32000
    assert chunk_rows(2**23, cpu) == 1

    class Properties:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    gpu = torch.device("cuda", 0)
    rows = chunk_rows(32000, gpu)
    assert rows % 64 == 0 and rows * 32000 * 4 <= Properties.total_memory / 64 and rows > 8000
    assert chunk_rows(32000, gpu) == rows  # what is free at the moment plays no part
    assert chunk_rows(100, gpu) == loss_module.CUDA_MAX_ROWS
    assert chunk_rows(2**30, gpu) == 1
