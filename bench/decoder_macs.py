"""Multiply-adds of decoding, per target token and per sentence, split into decoder and output layer.

    python bench/decoder_macs.py recipes/multi30k/transformer.yaml recipes/multi30k/transformer-deep-enc.yaml
        [--vocab 8000] [--beam 5] [--src-len 15] [--tgt-len 15] [--columns 0 1000]

Builds each recipe's model (random weights: the arithmetic does not depend on them), encodes
one source of ``--src-len`` tokens and decodes ``--tgt-len`` steps of ``--beam`` rows, counting
the multiply-adds of every call with PyTorch's FLOP counter (FLOPs / 2; LSTMs, which it does not
see, by hooks). The output layer's
share is one (rows x D) @ (D x V) product per step, so a shortlist of C columns (``--columns``,
0: none) replaces V by C in it and leaves the rest of the step as it is. Printed per recipe:
the encoder's multiply-adds per source token, the decoder's per target token and row without
and with each shortlist size, and the total for one sentence at this beam.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops  # noqa: E402

from nmt.config import load_recipe  # noqa: E402
from nmt.models import build_model  # noqa: E402


def lstm_macs(model: torch.nn.Module) -> dict[str, float]:
    """Count, by forward hooks, the multiply-adds of every ``nn.LSTM`` call, which the FLOP
    counter does not see: 4 gates x hidden x (input + hidden) per token, layer and direction."""
    total = {"macs": 0.0}

    def hook(lstm, inputs, _output):
        x = inputs[0]
        tokens = x.data.size(0) if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x.shape[:-1].numel()
        dirs = 2 if lstm.bidirectional else 1
        for layer in range(lstm.num_layers):
            size = lstm.input_size if layer == 0 else lstm.hidden_size * dirs
            total["macs"] += 4 * lstm.hidden_size * (size + lstm.hidden_size) * tokens * dirs

    for module in model.modules():
        if isinstance(module, torch.nn.LSTM):
            module.register_forward_hook(hook)
    return total


def counts(recipe: Path, vocab: int, beam: int, src_len: int, tgt_len: int) -> dict[str, float]:
    """Multiply-adds: the encoder per source token, a decoder step per row (output layer apart)."""
    cfg = load_recipe(recipe)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab).eval()
    lstm = lstm_macs(model)

    def macs(fn) -> float:
        lstm["macs"] = 0.0
        return count_flops(fn) / 2 + lstm["macs"]
    src = torch.randint(4, vocab, (1, src_len))
    lens = torch.tensor([src_len])
    with torch.no_grad():
        encoder = macs(lambda: model.encode(src, lens)) / src_len
        memory = model.encode(src, lens)
        state = model.init_state(memory, beam=1).select(torch.zeros(beam, dtype=torch.long))
        tokens = torch.full((beam,), 2, dtype=torch.long)
        step = 0.0
        holder = {"state": state}

        def one():
            holder["state"] = model.step(tokens, holder["state"])[1]

        for _ in range(tgt_len):
            step += macs(one)
    output = model.output_weight().numel()  # V x D multiply-adds per row and step
    per_row = step / tgt_len / beam
    return {"params": sum(p.numel() for p in model.parameters()), "encoder": encoder,
            "decoder": per_row - output, "output": output, "d": model.output_weight().size(1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", type=Path, nargs="+")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--src-len", type=int, default=15)
    parser.add_argument("--tgt-len", type=int, default=15)
    parser.add_argument("--columns", type=int, nargs="+", default=[0, 1000],
                        help="output-layer columns (shortlist sizes); 0: the whole vocabulary")
    args = parser.parse_args()
    print(f"vocabulary {args.vocab}, beam {args.beam}, {args.src_len} source and {args.tgt_len} target tokens; "
          "multiply-adds (M = 1e6), counted by torch.utils.flop_counter")
    print("| recipe | params | encoder / source token | columns | decoder layers / row step "
          "| output layer / row step | output share | one sentence |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        c = counts(recipe, args.vocab, args.beam, args.src_len, args.tgt_len)
        for columns in args.columns:
            output = c["output"] if columns == 0 else columns * c["d"]
            per_step = c["decoder"] + output
            sentence = c["encoder"] * args.src_len + per_step * args.beam * args.tgt_len
            print(f"| {recipe.name} | {c['params'] / 1e6:.2f}M | {c['encoder'] / 1e6:.2f}M | "
                  f"{columns or args.vocab} | {c['decoder'] / 1e6:.2f}M | {output / 1e6:.2f}M | "
                  f"{output / per_step:.0%} | {sentence / 1e6:.0f}M |")


if __name__ == "__main__":
    main()
