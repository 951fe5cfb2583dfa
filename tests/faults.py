"""Fault injection for the trainer's tests: a model that runs out of memory on large batches."""

from __future__ import annotations

import torch

# What PyTorch's CPU allocator raises when an allocation fails.
CPU_OOM = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes. "
           "Error code 12 (Cannot allocate memory)")


class _FailInBackward(torch.autograd.Function):
    """Identity forward; its backward runs out of memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(CPU_OOM)


def fail_above(model: torch.nn.Module, sentences: int, phase: str = "forward") -> dict:
    """Make ``model`` run out of memory on every batch of more than ``sentences`` pairs.

    ``phase="forward"`` fails at the start of the forward pass. ``phase="backward"`` fails in
    the backward pass at the encoder output, after the decoder's parameters have already had
    their gradients added. Returns a counter of the failures, filled as they happen.
    """
    count = {"failures": 0}
    encode = model.encode

    def faulty_encode(src: torch.Tensor, src_lens: torch.Tensor):
        too_big = src.size(0) > sentences and torch.is_grad_enabled()
        if too_big and phase == "forward":
            count["failures"] += 1
            raise RuntimeError(CPU_OOM)
        memory = encode(src, src_lens)
        if too_big and phase == "backward":
            count["failures"] += 1
            memory.states = _FailInBackward.apply(memory.states)
        return memory

    model.encode = faulty_encode  # the instance attribute wins over the method; the state dict is unchanged
    return count
