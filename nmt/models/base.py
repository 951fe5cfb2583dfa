"""The Seq2Seq contract: all that training and search know about a model.

    forward(src, src_lens, tgt_in) -> (B, T, V) logits        teacher forcing
    encode(src, src_lens) -> Memory                             encoder output + padding mask
    init_state(memory) -> DecoderState                          empty decoder state
    step(tokens, state) -> ((B, V) log-probs, DecoderState)     one more target token

``DecoderState.select(index)`` keeps/reorders rows (beams, finished sentences) and
``DecoderState.attention`` is the last step's attention over the source, (B, S), or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class Memory:
    states: torch.Tensor  # (B, S, D) encoder output
    mask: torch.Tensor  # (B, S) True at real source tokens


class DecoderState(Protocol):
    attention: torch.Tensor | None  # (B, S) attention of the last step, if the model has one

    def select(self, index: torch.Tensor) -> DecoderState: ...


class Seq2Seq(nn.Module):
    """Base class of the models; subclasses implement the four methods below."""

    kind: str = ""

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> Memory:
        raise NotImplementedError

    def init_state(self, memory: Memory) -> DecoderState:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        raise NotImplementedError

    @property
    def max_positions(self) -> int:
        """Longest source or target, in tokens, the model accepts."""
        raise NotImplementedError


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
