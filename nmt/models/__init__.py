"""Models behind the Seq2Seq contract, built from a recipe by ``build_model``."""

from __future__ import annotations

from nmt.models.base import DecoderState, Memory, Seq2Seq, count_parameters
from nmt.models.gnmt import GNMT
from nmt.models.transformer import Transformer

MODELS: dict[str, type[Seq2Seq]] = {"transformer": Transformer, "gnmt": GNMT}


def build_model(model_cfg, vocab_size: int) -> Seq2Seq:
    return MODELS[model_cfg.kind](model_cfg, vocab_size)


__all__ = ["DecoderState", "Memory", "Seq2Seq", "build_model", "count_parameters"]
