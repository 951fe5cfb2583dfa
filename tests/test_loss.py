"""The training loss: the definition PyTorch gives label smoothing, padding ignored, one log-softmax,
and the whole batch's logits never formed at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nmt import loss as loss_module
from nmt.loss import label_smoothed_nll, sequence_loss
from nmt.models import build_model
from nmt.tokenizer import PAD


def padded_batch(vocab: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (3, 6, V) and targets with padding; the logits at padded positions are huge."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, vocab, generator=gen) * 4
    target = torch.randint(4, vocab, (3, 6), generator=gen)
    target[0, 4:] = PAD
    target[2, 1:] = PAD
    logits[target == PAD] = 1e4  # whatever sits under padding must not count
    return logits, target


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_loss_and_gradient_equal_cross_entropy_with_padding_ignored(smoothing: float) -> None:
    logits, target = padded_batch()
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    loss, nll = label_smoothed_nll(ours, target, smoothing)
    flat, flat_target = theirs.reshape(-1, theirs.size(-1)), target.reshape(-1)
    expected = F.cross_entropy(flat, flat_target, ignore_index=PAD, label_smoothing=smoothing, reduction="sum")
    expected_nll = F.cross_entropy(flat.detach(), flat_target, ignore_index=PAD, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert nll.item() == pytest.approx(expected_nll.item(), rel=1e-5)
    assert not nll.requires_grad
    loss.backward()
    expected.backward()
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)
    assert ours.grad[target == PAD].abs().max() == 0


def test_bf16_logits_give_the_fp32_loss_closely() -> None:
    logits, target = padded_batch()
    loss, nll = label_smoothed_nll(logits.bfloat16(), target, 0.1)
    ref_loss, ref_nll = label_smoothed_nll(logits, target, 0.1)
    assert loss.dtype == nll.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-2)
    assert nll.item() == pytest.approx(ref_nll.item(), rel=1e-2)


class LargeTensors(TorchDispatchMode):
    """Records every newly allocated tensor of at least ``numel`` elements: (op, dtype, shape)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel \
                    and t.untyped_storage().data_ptr() not in inputs:  # views allocate nothing
                self.seen.append((str(func), t.dtype, tuple(t.shape)))
        return out


def test_one_log_softmax_in_the_logits_dtype_and_no_fp32_copy() -> None:
    """With bf16 logits of (tokens x vocabulary), the loss allocates one such tensor in bf16."""
    logits, target = padded_batch(vocab=512)
    logits = logits.bfloat16().requires_grad_()
    with LargeTensors(target.numel() * logits.size(-1)) as mode:
        loss, _ = label_smoothed_nll(logits, target, 0.1)
    assert len(mode.seen) == 1 and mode.seen[0][1] == torch.bfloat16, mode.seen
    with LargeTensors(target.numel() * logits.size(-1)) as mode:
        loss.backward()
    assert all(dtype == torch.bfloat16 for _, dtype, _ in mode.seen), mode.seen


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_loss_over_slices_equals_the_whole_batch_loss_and_never_forms_its_logits(kind, monkeypatch) -> None:
    """Training's loss (output layer applied a few target tokens at a time, one backward pass
    through the rest) gives the loss and every parameter's gradient of the plain whole-batch
    loss, and no tensor as large as (target tokens x vocabulary) is ever allocated."""
    from tests.test_models import SMALL, VOCAB, batch

    torch.manual_seed(0)
    model = build_model(SMALL[kind], VOCAB).train()
    torch.manual_seed(1)  # the same dropout masks for both passes
    src, src_lens = batch([7, 5, 2])
    tgt, _ = batch([6, 8, 3], seed=2)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    state = torch.random.get_rng_state()
    expected, expected_nll = label_smoothed_nll(model(src, src_lens, tgt_in), tgt_out, 0.1)
    expected.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    monkeypatch.setattr(loss_module, "SLICE_ELEMENTS", 3 * VOCAB)  # 3 target tokens per slice
    torch.random.set_rng_state(state)
    with LargeTensors(4 * VOCAB) as mode:
        loss, nll = sequence_loss(model, src, src_lens, tgt_in, tgt_out, 0.1, lambda part: part.backward())
    assert [shape for _, _, shape in mode.seen if shape[-1] == VOCAB] == []  # no logits of over 3 tokens
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert nll.item() == pytest.approx(expected_nll.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name
