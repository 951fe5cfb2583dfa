"""Pre-norm Transformer (Vaswani et al. 2017) with one tied embedding matrix.

Reads top to bottom: positions, attention, layers, then the model. Attention runs
through ``scaled_dot_product_attention``; incremental decoding keeps a KV cache.
Shapes: B batch, S source length, T target length, D model size, H heads, Dh = D / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nmt.config import TransformerConfig
from nmt.models.base import Memory, Seq2Seq
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, Dh)
        if cache is not None:  # one new position; attend to every earlier one
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
        return self.out(merge_heads(y)), (k, v)


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
        super().__init__(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, cfg.heads, cfg.attention_dropout)
        self.ffn = FeedForward(d, cfg.ffn, cfg.activation_dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask=mask)[0])
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, cfg.heads, cfg.attention_dropout)
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.attention_dropout)
        self.ffn = FeedForward(d, cfg.ffn, cfg.activation_dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory_kv, memory_mask, cache=None, need_weights=False):
        y, new_cache = self.self_attn(self.norm1(x), causal=cache is None, cache=cache)
        x = x + self.drop(y)
        y, weights = self.cross_attn(self.norm2(x), memory_kv, memory_mask, need_weights)
        x = x + self.drop(y)
        return x + self.drop(self.ffn(self.norm3(x))), new_cache, weights


@dataclass
class TransformerState:
    """Decoder state for incremental decoding; every tensor has the batch*beam rows first."""

    self_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (N, H, t, Dh) keys and values
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (N, H, S, Dh)
    mask: torch.Tensor  # (N, 1, 1, S) True at real source tokens
    position: int = 0
    attention: torch.Tensor | None = None  # (N, S) last layer's cross-attention, mean over heads

    def select(self, index: torch.Tensor) -> TransformerState:
        def pick(pairs):
            return [(k.index_select(0, index), v.index_select(0, index)) for k, v in pairs]

        return TransformerState(
            self_kv=pick(self.self_kv),
            cross_kv=pick(self.cross_kv),
            mask=self.mask.index_select(0, index),
            position=self.position,
            attention=None if self.attention is None else self.attention.index_select(0, index),
        )


class Transformer(Seq2Seq):
    kind = "transformer"

    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD)  # source, target and output
        self.register_buffer("positions", sinusoids(cfg.max_positions + 2, d), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        # None: logits through the tied embedding; nmt.quantize sets an int8 copy of it here.
        self.output_projection: nn.Module | None = None
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

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.decoder_norm(x)  # (B, T, D)
        if self.output_projection is not None:
            return self.output_projection(h)
        return F.linear(h, self.embed.weight)  # (B, T, V)

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory = self.encode(src, src_lens)
        mask = memory.mask[:, None, None, :]
        x = self._embed(tgt_in)
        for layer in self.decoder:
            x = layer(x, layer.cross_attn.keys_values(memory.states), mask)[0]
        return self._logits(x)

    def init_state(self, memory: Memory) -> TransformerState:
        n = memory.states.size(0)
        empty = memory.states.new_zeros(n, self.cfg.heads, 0, self.cfg.d_model // self.cfg.heads)
        return TransformerState(
            self_kv=[(empty, empty) for _ in self.decoder],
            cross_kv=[layer.cross_attn.keys_values(memory.states) for layer in self.decoder],
            mask=memory.mask[:, None, None, :],
        )

    def step(self, tokens: torch.Tensor, state: TransformerState):
        x = self._embed(tokens[:, None], start=state.position)  # (N, 1, D)
        self_kv, attention = [], None
        last = len(self.decoder) - 1
        for i, layer in enumerate(self.decoder):
            x, kv, weights = layer(x, state.cross_kv[i], state.mask, cache=state.self_kv[i],
                                   need_weights=i == last)
            self_kv.append(kv)
            attention = weights if weights is not None else attention
        log_probs = self._logits(x[:, 0]).log_softmax(-1)  # (N, V)
        new_state = TransformerState(self_kv, state.cross_kv, state.mask, state.position + 1,
                                     attention[:, 0])
        return log_probs, new_state
