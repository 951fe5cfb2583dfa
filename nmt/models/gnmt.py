"""GNMT (Wu et al. 2016) in the form of NVIDIA's GNMT v2, over the shared Seq2Seq contract.

Encoder: a bidirectional LSTM layer (on packed sequences, so padding never enters the
backward direction), then unidirectional layers, residual connections from the third
layer on. Decoder: the first LSTM layer reads the target embeddings and its output
queries a normalized Bahdanau attention over the encoder states; the attention context
is concatenated to the input of every upper layer and to the classifier's input.

Because decoder layer 1 does not depend on the attention, training runs every layer
over the whole sequence with ``nn.LSTM`` and computes the attention for all target
positions at once: no Python loop over time steps. ``step`` runs the same modules on
one position, carrying every layer's (h, c). In decoding, the encoder output and the
attention keys are kept once per sentence: the k beams of a sentence are its k queries,
as the T target positions are in training, so nothing is copied per beam.

The classifier maps [output; context] linearly to the embedding size, so the output
projection can share the embedding matrix. (A tanh there, as in Luong et al. 2015's
attentional vector, bounds every logit by the embedding norms and stalls training with
tied embeddings initialised at +-0.1.)
Shapes: B batch, S source length, T target length, H hidden size, E embedding size;
in decoding n sentences, k beams each, N = n * k rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from nmt.config import GNMTConfig
from nmt.models.base import Dropout, Memory, Seq2Seq
from nmt.tokenizer import PAD


def lstm_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as an LSTM must get it: under CPU bf16 autocast, in bf16, because oneDNN has no
    LSTM kernel for an fp32 input with bf16 weights on CPUs without native bf16 (AVX2)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return x.to(torch.get_autocast_dtype("cpu"))
    return x


# ``train.lstm_dtype``: the dtype of the LSTMs where they cannot run under autocast (see ``run_lstm``).
LSTM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def outside_autocast(device_type: str) -> bool:
    """Whether LSTMs must run outside autocast: on CUDA under autocast, whose wrapper of cuDNN's RNN
    casts its inputs and weights to fp16 whatever the autocast dtype (``AutocastRNN.cpp`` in
    PyTorch's ``aten/src/ATen/cudnn``): under bf16 that is fp16 without loss scaling, where the
    gradients of a loss divided by an update's tokens (about 1e-6 per element) underflow."""
    return device_type == "cuda" and torch.is_autocast_enabled("cuda")


def _cast(x, dtype: torch.dtype):
    if isinstance(x, PackedSequence):
        return x._replace(data=x.data.to(dtype))
    if isinstance(x, tuple):
        return tuple(t.to(dtype) for t in x)
    return None if x is None else x.to(dtype)


def run_lstm(lstm: nn.LSTM, x, hx=None, dtype: torch.dtype = torch.float32):
    """``lstm(x, hx)`` under the precision rules: on CUDA under autocast, outside it in ``dtype`` (fp32,
    TF32 where cuDNN allows it, or bf16 with bf16 copies of the weights, made once per call);
    elsewhere under autocast as it is (bf16 on the CPU)."""
    device_type = x.data.device.type if isinstance(x, PackedSequence) else x.device.type
    if not outside_autocast(device_type):
        return lstm(lstm_input(x) if isinstance(x, torch.Tensor) else x, hx)
    with torch.autocast(device_type, enabled=False):
        x, hx = _cast(x, dtype), _cast(hx, dtype)
        if dtype == torch.float32:
            return lstm(x, hx)
        weights = {name: p.to(dtype) for name, p in lstm.named_parameters()}
        return torch.func.functional_call(lstm, weights, (x, hx))


class NormalizedBahdanauAttention(nn.Module):
    """score(q, k) = g * (v / |v|) . tanh(W_q q + W_k k + b)   (Salimans & Kingma 2016 norm).

    Computed as g / |v| * (2 v . sigmoid(2z) - sum(v)), z = W_q q + W_k k + b, which is the
    same since tanh(z) = 2 sigmoid(2z) - 1: the (B, T, S, H) tensor, the largest of a
    decoding step, then takes one sigmoid, where tanh costs several times more on the CPU.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.v = nn.Parameter(torch.empty(hidden).uniform_(-0.1, 0.1))
        self.g = nn.Parameter(torch.tensor(1.0))

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return 2 * self.key(memory)  # (B, S, H): 2 W_k k, computed once per sentence

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, T, H), keys (from ``keys``)/memory (B, S, H), mask (B, S) -> context (B, T, H),
        weights (B, T, S)."""
        v = self.g * self.v / self.v.norm()
        hidden = (2 * self.query(query)).unsqueeze(2) + keys.unsqueeze(1)  # (B, T, S, H)
        hidden = hidden.add_(2 * self.bias).sigmoid_()  # sigmoid(2z), in place
        scores = 2 * (hidden @ v) - v.sum()  # (B, T, S): v . tanh(z)
        weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        return weights @ memory, weights


class Encoder(nn.Module):
    def __init__(self, cfg: GNMTConfig):
        super().__init__()
        h = cfg.hidden
        self.bidir = nn.LSTM(cfg.embed_dim, h, batch_first=True, bidirectional=True)
        self.layers = nn.ModuleList(
            nn.LSTM(2 * h if i == 0 else h, h, batch_first=True) for i in range(cfg.encoder_layers - 1))
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, lens: torch.Tensor, lstm_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``lens`` (B,) on the host, as training's batches keep them (a copy from a GPU would wait);
        longest first, as training's batches come, is packed without sorting."""
        lens = lens if lens.device.type == "cpu" else lens.cpu()
        try:  # sorting would copy an index to the device and wait for it
            packed = pack_padded_sequence(lstm_input(x), lens, batch_first=True, enforce_sorted=True)
        except RuntimeError:  # not longest first (decoding's batches are sorted shortest first)
            packed = pack_padded_sequence(lstm_input(x), lens, batch_first=True, enforce_sorted=False)
        # The initial state given: made from the packed batch sizes, it would be read from a tensor.
        zeros = packed.data.new_zeros(2, x.size(0), self.bidir.hidden_size)  # (2 directions, B, H)
        out = run_lstm(self.bidir, packed, (zeros, zeros), dtype=lstm_dtype)[0]
        x, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))  # (B, S, 2H)
        for i, layer in enumerate(self.layers):
            y, _ = run_lstm(layer, self.drop(x), dtype=lstm_dtype)  # (B, S, H)
            x = x + y if i >= 1 else y  # residual from the third layer on
        return x


@dataclass
class GNMTState:
    """Decoder state for incremental decoding: n sentences of k (``beam``) rows each."""

    hidden: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, N, H) h and c
    keys: torch.Tensor  # (n, S, H) attention keys, per sentence
    memory: torch.Tensor  # (n, S, H) encoder output, per sentence
    mask: torch.Tensor  # (n, S)
    beam: int
    attention: torch.Tensor | None = None  # (N, S) attention of the last step, when asked for

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> GNMTState:
        keys, memory, mask = self.keys, self.memory, self.mask
        if sentences is not None:
            keys, memory, mask = (t.index_select(0, sentences) for t in (keys, memory, mask))
        return GNMTState(
            hidden=[(h.index_select(1, rows), c.index_select(1, rows)) for h, c in self.hidden],
            keys=keys, memory=memory, mask=mask, beam=len(rows) // mask.size(0),
            attention=None if self.attention is None else self.attention.index_select(0, rows),
        )


class GNMT(Seq2Seq):
    kind = "gnmt"

    def __init__(self, cfg: GNMTConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        h, e = cfg.hidden, cfg.embed_dim
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, e, padding_idx=PAD)  # source, target and output
        self.encoder = Encoder(cfg)
        self.decoder_first = nn.LSTM(e, h, batch_first=True)
        self.attention = NormalizedBahdanauAttention(h)
        self.decoder_layers = nn.ModuleList(nn.LSTM(2 * h, h, batch_first=True)
                                            for _ in range(cfg.decoder_layers - 1))
        self.classifier = nn.Linear(2 * h, e)
        self.drop = Dropout(cfg.dropout)
        # None: logits through the tied embedding; nmt.quantize sets an int8 copy of it here.
        self.output_projection: nn.Module | None = None
        # The LSTMs' dtype where they cannot run under autocast (CUDA; see run_lstm): train.lstm_dtype.
        self.lstm_dtype = torch.float32
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Uniform +-0.1 as in the GNMT v2 reference; the attention's norm scale keeps its own start.
        for name, p in self.named_parameters():
            if not name.startswith("attention.g"):
                nn.init.uniform_(p, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
            self.attention.bias.zero_()

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> Memory:
        x = self.drop(self.embed(src))  # (B, S, E)
        return Memory(self.encoder(x, src_lens, self.lstm_dtype), src != PAD)

    def _decode(self, tgt: torch.Tensor, hidden, keys, memory, mask, beam: int = 1):
        """Run the decoder over ``tgt`` (B, T); returns features (B, T, E), new hidden, attention
        (B, T, S). With ``beam`` k, T is 1 and keys, memory and mask have one row per k rows
        of ``tgt`` (a sentence's beams)."""
        x, first = run_lstm(self.decoder_first, self.drop(self.embed(tgt)), hidden[0], self.lstm_dtype)  # (B, T, H)
        # The beams of a sentence query its memory together, as target positions do.
        queries = x.view(keys.size(0), -1, x.size(-1))  # (n, k * T, H)
        context, weights = self.attention(queries, keys, memory, mask)  # (n, k * T, H), (n, k * T, S)
        context, weights = context.view_as(x), weights.view(*x.shape[:2], -1)  # (B, T, H), (B, T, S)
        new_hidden = [first]
        for i, layer in enumerate(self.decoder_layers):
            y, state = run_lstm(layer, self.drop(torch.cat([x, context], -1)), hidden[i + 1], self.lstm_dtype)
            x = x + y if i >= 1 else y  # residual from the third layer on
            new_hidden.append(state)
        out = self.drop(self.classifier(self.drop(torch.cat([x, context], -1))))  # (B, T, E)
        return out, new_hidden, weights

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.output_projection is not None:
            return self.output_projection(features)
        return F.linear(features, self.embed.weight)  # (..., V)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight  # (V, D) tied with the embedding

    def _zero_hidden(self, n: int, like: torch.Tensor):
        zeros = like.new_zeros(1, n, self.cfg.hidden)
        return [(zeros, zeros)] * self.cfg.decoder_layers

    def features(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory = self.encode(src, src_lens)
        keys = self.attention.keys(memory.states)
        hidden = self._zero_hidden(src.size(0), memory.states)
        return self._decode(tgt_in, hidden, keys, memory.states, memory.mask)[0]

    def init_state(self, memory: Memory, beam: int = 1) -> GNMTState:
        return GNMTState(self._zero_hidden(memory.states.size(0) * beam, memory.states),
                         self.attention.keys(memory.states), memory.states, memory.mask, beam)

    def step_features(self, tokens: torch.Tensor, state: GNMTState,
                      need_attention: bool = False) -> tuple[torch.Tensor, GNMTState]:
        out, hidden, weights = self._decode(tokens[:, None], state.hidden, state.keys, state.memory,
                                            state.mask, state.beam)
        # The additive attention forms its weights anyway; they are handed on only when asked.
        attention = weights[:, 0] if need_attention else None
        return out[:, 0], GNMTState(hidden, state.keys, state.memory, state.mask, state.beam, attention)
