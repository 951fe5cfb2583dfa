"""Pre-norm Transformer (Vaswani et al. 2017) with one tied embedding matrix.

Reads top to bottom: positions, attention, layers, the decoder state, then the model.
Attention runs through ``scaled_dot_product_attention`` except where the search asks for
the weights (the last layer's cross-attention then writes them out).

Incremental decoding (``step``) keeps the self-attention keys and values of every layer in
one buffer preallocated along time, so a step writes one position instead of concatenating,
and a beam reorder copies only the positions filled so far, all layers in one call. The
cross-attention keys and values are computed once per sentence: the k beams of a sentence
are its k queries against them (one attention call per layer, nothing copied per beam).
Shapes: B batch, S source length, T target length, D model size, H heads, Dh = D / H;
in decoding n sentences, k beams each, N = n * k rows, L decoder layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nmt.config import TransformerConfig
from nmt.models.base import Dropout, Memory, Seq2Seq
from nmt.tokenizer import PAD


def sinusoids(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)  # (L, D)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)  # (B, H, T, Dh)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)  # (B, T, D)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, Dh)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
        return self.out(merge_heads(y))

    def step(self, x: torch.Tensor, kv: torch.Tensor, position: int) -> torch.Tensor:
        """One new position: x (N, 1, D); kv (2, N, capacity, H, Dh) holds the earlier ones
        and gets this one's key and value written at ``position``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, 1, D) each
        kv[0, :, position] = k[:, 0].unflatten(-1, (self.heads, -1))  # (N, H, Dh)
        kv[1, :, position] = v[:, 0].unflatten(-1, (self.heads, -1))
        keys, values = kv[:, :, : position + 1].transpose(2, 3).unbind(0)  # (N, H, position + 1, Dh) each
        y = F.scaled_dot_product_attention(split_heads(q, self.heads), keys, values)
        return self.out(merge_heads(y))


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)  # (B, H, S, Dh) each

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                need_weights: bool = False):
        """x (B, T, D) queries against kv (B, H, S, Dh) with mask (B, 1, 1, S). In decoding B is
        the sentences and T their k beams: the beams share the sentence's keys and values."""
        q = split_heads(self.q(x), self.heads)  # (B, H, T, Dh)
        k, v = kv
        if need_weights:  # written out, since the fused kernel does not return weights
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, S)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            return self.out(merge_heads(weights @ v)), weights.mean(1)  # weights: (B, T, S)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(merge_heads(y)), None


class FeedForward(nn.Sequential):
    def __init__(self, d: int, ffn: int, dropout: float):
        super().__init__(nn.Linear(d, ffn), nn.ReLU(), Dropout(dropout), nn.Linear(ffn, d))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, cfg.heads, cfg.attention_dropout)
        self.ffn = FeedForward(d, cfg.ffn, cfg.activation_dropout)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask=mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, cfg.heads, cfg.attention_dropout)
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.attention_dropout)
        self.ffn = FeedForward(d, cfg.ffn, cfg.activation_dropout)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, memory_kv, memory_mask):
        x = x + self.drop(self.self_attn(self.norm1(x), causal=True))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory_kv, memory_mask)[0])
        return x + self.drop(self.ffn(self.norm3(x)))

    def step(self, x: torch.Tensor, kv: torch.Tensor, position: int, memory_kv, memory_mask: torch.Tensor,
             need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, 1, D), N = n * k rows; memory_kv and memory_mask per sentence (n, ...).

        Returns the new x and, with ``need_weights``, the cross-attention (n, k, S)."""
        rows, _, d = x.shape
        x = x + self.drop(self.self_attn.step(self.norm1(x), kv, position))
        queries = self.norm2(x).view(memory_mask.size(0), -1, d)  # (n, k, D): a sentence's beams
        y, weights = self.cross_attn(queries, memory_kv, memory_mask, need_weights)
        x = x + self.drop(y.view(rows, 1, d))
        return x + self.drop(self.ffn(self.norm3(x))), weights


class SpareBuffers(list):
    """Decoding buffers kept for reuse; a copy of the model (deepcopy, pickle) starts empty."""

    def __deepcopy__(self, memo: dict) -> SpareBuffers:
        return SpareBuffers()

    def __reduce__(self):
        return SpareBuffers, ()


class KVCache:
    """The self-attention keys and values of every decoder layer, preallocated along time.

    ``data`` (L, 2, N, capacity, H, Dh): layer, keys (0) / values (1), row, position, head.
    A row's positions lie together, so the filled part of a row is one block to copy.
    States of successive steps share one cache; ``length`` is how many positions have been
    written. A state reads positions [0, its position), so a step on a state whose cache
    is already longer (a second step from one state) writes into a copy, not over a
    position a later state reads.

    A beam reorder copies the filled positions into another buffer every step. Fresh
    buffers this large cost a page fault per page first written, so a cache that no state
    reads any more hands its buffer to ``spare`` (the model's, at most two buffers, kept
    between decodings), and the next ``select`` or decoding writes into it.
    """

    def __init__(self, data: torch.Tensor, spare: list[torch.Tensor], length: int = 0,
                 base: torch.Tensor | None = None):
        self.data = data
        self.spare = spare
        self.length = length
        self.base = data if base is None else base  # the allocation ``data`` is a view of

    def __del__(self) -> None:
        if len(self.spare) < 2:
            self.spare.append(self.base)

    @staticmethod
    def allocate(spare: list[torch.Tensor], like: torch.Tensor, shape: tuple[int, ...]) -> KVCache:
        """An empty cache of ``shape`` (L, 2, N, capacity, H, Dh), in a spare buffer if one
        is large enough (and on ``like``'s device and dtype), else in a new one."""
        while spare:
            try:
                base = spare.pop()
            except IndexError:  # another thread decoding with this model took the last one
                break
            if (base.device, base.dtype) == (like.device, like.dtype) and base.shape[:2] == shape[:2] \
                    and base.shape[4:] == shape[4:] and base.size(2) >= shape[2] and base.size(3) >= shape[3]:
                return KVCache(base[:, :, : shape[2], : shape[3]], spare, 0, base)
        return KVCache(like.new_empty(shape), spare)

    @property
    def capacity(self) -> int:
        return self.data.size(3)

    def for_position(self, position: int, limit: int) -> KVCache:
        """A cache in which ``position`` may be written: this one, or a copy (branch, or full)."""
        if self.length == position and position < self.capacity:
            return self
        capacity = self.capacity if position < self.capacity else min(2 * self.capacity, limit)
        shape = self.data.shape
        cache = KVCache.allocate(self.spare, self.data, (*shape[:3], capacity, *shape[4:]))
        cache.data[:, :, :, :position] = self.data[:, :, :, :position]
        cache.length = position
        return cache

    def select(self, rows: torch.Tensor, length: int) -> KVCache:
        """Rows ``rows`` of the first ``length`` positions, in another buffer (one copy)."""
        shape = self.data.shape
        cache = KVCache.allocate(self.spare, self.data, (*shape[:2], len(rows), *shape[3:]))
        torch.index_select(self.data[:, :, :, :length], 2, rows, out=cache.data[:, :, :, :length])
        cache.length = length
        return cache


@dataclass
class TransformerState:
    """Decoder state for incremental decoding: n sentences of k (``beam``) rows each."""

    cache: KVCache  # self-attention keys and values, N rows
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (n, H, S, Dh), per sentence
    mask: torch.Tensor  # (n, 1, 1, S) True at real source tokens
    beam: int
    position: int = 0  # target tokens fed so far
    attention: torch.Tensor | None = None  # (N, S) last layer's cross-attention, mean over heads

    def select(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> TransformerState:
        cross_kv, mask = self.cross_kv, self.mask
        if sentences is not None:
            cross_kv = [(k.index_select(0, sentences), v.index_select(0, sentences)) for k, v in cross_kv]
            mask = mask.index_select(0, sentences)
        attention = None if self.attention is None else self.attention.index_select(0, rows)
        return TransformerState(self.cache.select(rows, self.position), cross_kv, mask, len(rows) // mask.size(0),
                                self.position, attention)


class Transformer(Seq2Seq):
    kind = "transformer"

    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD)  # source, target and output
        self.register_buffer("positions", sinusoids(cfg.max_positions + 2, d), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = Dropout(cfg.dropout)
        # None: logits through the tied embedding; nmt.quantize sets an int8 copy of it here.
        self.output_projection: nn.Module | None = None
        self._spare_caches = SpareBuffers()  # decoding buffers for reuse (KVCache)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.startswith("embed"):
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.embed.weight, std=self.cfg.d_model ** -0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    def _embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.cfg.d_model)  # (B, T, D)
        return self.drop(x + self.positions[start : start + tokens.size(1)])

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> Memory:
        mask = src != PAD  # (B, S)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, attn_mask)
        return Memory(self.encoder_norm(x), mask)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.output_projection is not None:
            return self.output_projection(features)
        return F.linear(features, self.embed.weight)  # (..., V)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight  # (V, D) tied with the embedding

    def features(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory = self.encode(src, src_lens)
        mask = memory.mask[:, None, None, :]
        x = self._embed(tgt_in)
        for layer in self.decoder:
            x = layer(x, layer.cross_attn.keys_values(memory.states), mask)
        return self.decoder_norm(x)  # (B, T, D)

    def init_state(self, memory: Memory, beam: int = 1) -> TransformerState:
        n = memory.states.size(0)
        heads, layers = self.cfg.heads, len(self.decoder)
        # Room for 2 |src| + 10 positions, above the length limit of most searches (a step that
        # finds the cache full doubles it); positions never written are never touched.
        capacity = min(2 * memory.states.size(1) + 10, self.max_positions)
        shape = (layers, 2, n * beam, capacity, heads, self.cfg.d_model // heads)
        return TransformerState(
            cache=KVCache.allocate(self._spare_caches, memory.states, shape),
            cross_kv=[layer.cross_attn.keys_values(memory.states) for layer in self.decoder],
            mask=memory.mask[:, None, None, :],
            beam=beam,
        )

    def step_features(self, tokens: torch.Tensor, state: TransformerState,
                      need_attention: bool = False) -> tuple[torch.Tensor, TransformerState]:
        position = state.position
        cache = state.cache.for_position(position, self.max_positions + 1)
        x = self._embed(tokens[:, None], start=position)  # (N, 1, D)
        last, weights = len(self.decoder) - 1, None
        for i, layer in enumerate(self.decoder):
            # Only the last layer's weights are exposed, so only it may pay for them.
            x, weights = layer.step(x, cache.data[i], position, state.cross_kv[i], state.mask,
                                    need_attention and i == last)
        cache.length = position + 1
        attention = None if weights is None else weights.reshape(-1, weights.size(-1))  # (N, S)
        return self.decoder_norm(x[:, 0]), TransformerState(cache, state.cross_kv, state.mask, state.beam, position + 1,
                                           attention)
