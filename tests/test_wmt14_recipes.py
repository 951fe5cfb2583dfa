"""The WMT14 en-de recipes load, say how to run them, and build models of the published shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmt import config
from nmt.models import build_model, count_parameters

WMT14 = Path(__file__).resolve().parent.parent / "recipes" / "wmt14-en-de"


@pytest.mark.parametrize("name,kind,layers,width,params", [
    ("transformer-base.yaml", "transformer", 6, 512, (55e6, 70e6)),  # the paper: 65M with 37k pieces
    ("gnmt.yaml", "gnmt", 4, 1024, (100e6, 200e6)),
])
def test_recipe_builds_the_published_shape(name, kind, layers, width, params) -> None:
    path = WMT14 / name
    assert "nmt train" in "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:6])
    cfg = config.load_recipe(path)
    m = cfg.model
    assert (m.kind, m.encoder_layers, m.decoder_layers) == (kind, layers, layers)
    assert getattr(m, "d_model", getattr(m, "hidden", None)) == width
    assert cfg.tokenizer.vocab_size == 32000 and cfg.data.max_len < m.max_positions
    with torch.device("meta"):  # the shapes, without allocating and initialising the weights
        model = build_model(m, cfg.tokenizer.vocab_size)
    assert params[0] < count_parameters(model) < params[1]
