"""The Seq2Seq contract: all that training and search know about a model.

    features(src, src_lens, tgt_in) -> (B, T, D)                   teacher forcing, up to the output layer
    logits(features) -> (..., V)                                    the output layer
    output_weight() -> (V, D)                                       its weight W: logits = features @ W.T, no bias
    forward(src, src_lens, tgt_in) = logits(features(...))          (B, T, V) logits
    encode(src, src_lens) -> Memory                                 encoder output + padding mask
    init_state(memory, beam=1) -> DecoderState                      empty decoder state, beam rows per sentence
    step_features(tokens, state, need_attention=False)
        -> ((N, D) features, DecoderState)                          one more target token per row, before logits
    step(tokens, state, need_attention=False)
        -> ((N, V) log-probs, DecoderState)                         = log_softmax(logits(step_features(...)))

Training asks for ``features`` and ``output_weight`` and applies the output layer itself,
fused with the loss, to a chunk of target positions at a time (nmt/loss.py), so the
(tokens x vocabulary) logits of a whole batch never exist at once. ``output_weight`` is the
trained parameter (the tied embedding), whatever ``logits`` uses for decoding (an int8 copy
once quantized).

Sentences and rows. A decoder state decodes ``n`` sentences in ``N = n * beam`` rows, and
row ``r`` belongs to sentence ``r // beam``, always. ``init_state`` sets the first ``beam``
(greedy search is beam 1) and ``select`` may change it: beam search starts with one row per
sentence, since all of a sentence's beams are the same before the first token, and widens
to k rows after the first step. What is the same for every row of a sentence (the encoder
output, the attention keys and values computed from it, the source mask) is kept once per
sentence, shape (n, S, ...), and the rows read it through the row -> sentence map, so
reordering rows never copies it. What differs per row (self-attention caches, LSTM states)
has N rows.

``state.select(rows, sentences=None)`` returns the state whose row ``i`` is row
``rows[i]`` of this one. ``rows`` (N',) is a LongTensor of row indices that holds, for each
sentence of the new state in order, the same number ``k'`` of rows, all of that sentence;
``k' = N' / n'`` is the new state's ``beam``.

* Without ``sentences`` the sentences stay as they are (n' = n): a beam reorder (k' = beam,
  ``rows[i] // beam == i // beam``), or a widening of a beam-1 state (``rows[i] == i // k'``).
* With ``sentences`` (n',), given only when sentences leave the batch, the per-sentence
  tensors are re-indexed too: new sentence ``j`` is old sentence ``sentences[j]``, and
  ``rows[j * k' : (j + 1) * k']`` are rows of old sentence ``sentences[j]``.

``step(tokens, state, need_attention)``: ``tokens`` (N,) are the rows' last tokens (BOS at
the first step). With ``need_attention`` the returned state's ``attention`` is the step's
attention over the source, (N, S), zero on padding (a model with no attention gives None).
Without it ``attention`` is None and the model need not compute weights at all, so it can
use fused attention kernels that never form them.

``step_features`` is ``step`` short of the output layer: a wrapper that computes the output
layer otherwise (over a vocabulary shortlist, nmt/shortlist.py) runs the decoder through it,
and the models' ``step`` is the base class's, ``log_softmax(logits(step_features(...)))``,
so both paths run the same decoder code and nothing is computed twice.

Columns. A model's log-probs may cover only some vocabulary ids: then its ``encode`` returns a
memory whose ``columns`` (V',) holds the vocabulary id of each column of ``step``'s (N, V')
log-probs, ascending, with the special ids PAD, UNK, BOS and EOS (0-3) at their own positions
(so rules on those columns hold as they are). The tokens fed to ``step`` are then column
indices, and the search maps the tokens it outputs back through ``columns`` once at the end.
``columns`` is None (the default) when the columns are the vocabulary.

A state is a value: ``step`` and ``select`` return new states and never change what an
earlier state answers (a model may share buffers between states, copying before it would
overwrite one that an earlier state still reads).
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
    columns: torch.Tensor | None = None  # (V',) vocabulary id of each log-prob column; None: all of them


class DecoderState(Protocol):
    attention: torch.Tensor | None  # (N, S) attention of the last step, when asked for

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> DecoderState: ...


class Seq2Seq(nn.Module):
    """Base class of the models; subclasses implement the methods below but ``forward``."""

    kind: str = ""
    vocab_size: int  # rows of the output layer

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(src, src_lens, tgt_in))

    def features(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_weight(self) -> torch.Tensor:
        """The (V, D) weight of the output layer: ``logits = features @ W.T``, no bias."""
        raise NotImplementedError

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> Memory:
        raise NotImplementedError

    def init_state(self, memory: Memory, beam: int = 1) -> DecoderState:
        raise NotImplementedError

    def step_features(self, tokens: torch.Tensor, state: DecoderState,
                      need_attention: bool = False) -> tuple[torch.Tensor, DecoderState]:
        """(N, D) the decoder's output for the rows' next token, the input of ``logits``, and the new state."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: DecoderState,
             need_attention: bool = False) -> tuple[torch.Tensor, DecoderState]:
        features, state = self.step_features(tokens, state, need_attention)
        logits = self.logits(features)  # (N, V), a fresh tensor: normalized in place
        return torch.log_softmax(logits, -1, out=logits), state

    @property
    def max_positions(self) -> int:
        """Longest source or target, in tokens, the model accepts."""
        raise NotImplementedError


class Dropout(nn.Dropout):
    """``nn.Dropout`` that keeps a one-byte mask for the backward pass on every device.

    On the CPU, ``nn.Dropout`` draws its mask in the input's dtype and keeps it (4 bytes per
    element in fp32); ``torch.native_dropout``, which CUDA runs anyway, keeps booleans. With
    17 dropouts on 256-wide activations that is 51 MB less per 4,096-token batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
