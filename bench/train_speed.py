"""Training speed: target tokens/s, peak memory and utilisation of the matmul rate.

    python bench/train_speed.py recipes/multi30k/transformer.yaml [--set model.x=y]
        [--spm runs/X/spm.model] [--windows 5] [--steps 10] [--warmup 5]

Runs real training updates (the trainer's own ``update``) on the recipe's training data
and prints, for each window of ``--steps`` updates, target tokens per second of
training-clock time; then the median over windows, the FLOPs of one update counted by
PyTorch, the achieved FLOP/s, and that as a share of the machine's matmul rate at the
model's shapes. Needs the recipe's data (set NMT_DATA).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, describe_machine, matmul_rates, median  # noqa: E402

from nmt import config  # noqa: E402
from nmt.batching import collate  # noqa: E402
from nmt.loss import label_smoothed_nll  # noqa: E402
from nmt.train import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--spm", type=Path, help="reuse this SentencePiece model (skips training one)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config.load_recipe(args.recipe, args.overrides)
    if args.spm:
        cfg.tokenizer.reuse = str(args.spm)
    run_dir = Path(tempfile.mkdtemp(prefix="nmt-bench-"))
    try:
        trainer = Trainer(cfg, run_dir, progress_bar=False)
        print(describe_machine())
        print(f"model: {cfg.model.kind}, {sum(p.numel() for p in trainer.model.parameters()):,} parameters; "
              f"batch: {cfg.train.max_tokens} padded tokens x update_freq {cfg.train.update_freq}")

        for _ in range(args.warmup):
            trainer.update(trainer._next_group())
        rates = []
        for w in range(args.windows):
            tokens, seconds = 0, 0.0
            for _ in range(args.steps):
                group = trainer._next_group()
                start = time.perf_counter()
                _, _, n = trainer.update(group)
                seconds += time.perf_counter() - start
                tokens += n
            rates.append(tokens / seconds)
            print(f"window {w + 1}: {rates[-1]:,.0f} target tokens/s ({tokens} tokens, {seconds:.1f} s)")

        # FLOPs of a forward + backward on a batch of the usual size.
        group = trainer._next_group()
        batch = collate(trainer.train_data, group[0])

        def fwd_bwd():
            logits = trainer.model(batch.src, batch.src_lens, batch.tgt_in)
            loss, _ = label_smoothed_nll(logits, batch.tgt_out, cfg.train.label_smoothing)
            loss.backward()

        flops = count_flops(fwd_bwd)
        trainer.model.zero_grad(set_to_none=True)
        flops_per_token = flops / batch.ntokens
        tok_s = median(rates)
        achieved = tok_s * flops_per_token / 1e9
        m = cfg.model
        d = getattr(m, "d_model", getattr(m, "hidden", 256))
        ffn = getattr(m, "ffn", 4 * d)
        mm = matmul_rates(cfg.train.max_tokens, d, ffn, len(trainer.tokenizer))
        mm_mean = sum(mm.values()) / len(mm)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"median: {tok_s:,.0f} target tokens/s over {args.windows} windows of {args.steps} updates")
        print(f"flops per target token (forward + backward): {flops_per_token / 1e6:.1f} MFLOP; "
              f"achieved {achieved:.1f} GFLOP/s")
        print("matmul rate (GFLOP/s, median of 7): " + ", ".join(f"{k} {v:.0f}" for k, v in mm.items()))
        print(f"utilisation: {achieved / mm_mean:.0%} of the mean matmul rate at these shapes")
        print(f"peak resident memory: {peak_mib:,.0f} MiB")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
