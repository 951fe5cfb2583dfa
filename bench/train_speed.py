"""Training speed: target tokens/s, peak memory and utilisation of the matmul rate.

    python bench/train_speed.py recipes/multi30k/transformer.yaml [--set model.x=y]
        [--spm runs/X/spm.model] [--windows 5] [--steps 10] [--warmup 5]

Runs real training updates (the trainer's own ``update`` on what its data side hands it,
``trainer.updates``, on the device the trainer picks: the GPU when there is one) on the
recipe's training data, prepared and memory-mapped as ``nmt train`` reads it, and prints,
for each window of ``--steps`` updates, target tokens per second of wall-clock time (on a
GPU, up to the end of the work queued); then the median over windows, the FLOPs of one update counted by PyTorch,
the achieved FLOP/s, and that as a share of the device's matmul rate at the model's shapes
and precision. Needs the recipe's data (set NMT_DATA).
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

from nmt import config, distributed  # noqa: E402
from nmt.loss import sequence_loss  # noqa: E402
from nmt.train import Trainer  # noqa: E402


def timed_window(trainer: Trainer, steps: int) -> tuple[int, float]:
    """Target tokens and wall-clock seconds of ``steps`` updates.

    On a GPU the updates only queue work: the clock stops after the device has done it all,
    and starts after the work queued before it is done.
    """
    distributed.synchronize(trainer.device)
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        _, _, n = trainer.update(next(trainer.updates))
        tokens += n
    distributed.synchronize(trainer.device)
    return tokens, time.perf_counter() - start


def flops_per_token(trainer: Trainer) -> float:
    """FLOPs of a forward + backward on a batch of the usual size, per target token."""
    batch = trainer.batches.collate(next(trainer.updates).batches[0]).to(trainer.device)

    def fwd_bwd():
        loss, _ = sequence_loss(trainer.model, batch.src, batch.src_lens, batch.tgt_in, batch.rows, batch.targets,
                                trainer.cfg.train.label_smoothing, autocast=trainer.autocast)
        loss.backward()

    flops = count_flops(fwd_bwd)
    trainer.model.zero_grad(set_to_none=True)
    return flops / batch.ntokens


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
        device = trainer.device
        print(describe_machine(device))
        print(f"model: {cfg.model.kind}, {sum(p.numel() for p in trainer.model.parameters()):,} parameters "
              f"on {device}, {cfg.train.precision}; batch: {cfg.train.max_tokens} padded tokens x "
              f"update_freq {cfg.train.update_freq}")

        if args.warmup:
            timed_window(trainer, args.warmup)
        rates = []
        for w in range(args.windows):
            tokens, seconds = timed_window(trainer, args.steps)
            rates.append(tokens / seconds)
            print(f"window {w + 1}: {rates[-1]:,.0f} target tokens/s ({tokens} tokens, {seconds:.1f} s)")

        per_token = flops_per_token(trainer)
        tok_s = median(rates)
        achieved = tok_s * per_token / 1e9
        m = cfg.model
        d = getattr(m, "d_model", getattr(m, "hidden", 256))
        ffn = getattr(m, "ffn", 4 * d)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
        mm = matmul_rates(cfg.train.max_tokens, d, ffn, len(trainer.tokenizer), device, dtype)
        mm_mean = sum(mm.values()) / len(mm)
        print(f"median: {tok_s:,.0f} target tokens/s over {args.windows} windows of {args.steps} updates")
        print(f"flops per target token (forward + backward): {per_token / 1e6:.1f} MFLOP; "
              f"achieved {achieved:.1f} GFLOP/s")
        print(f"{cfg.train.precision} matmul rate on {device} (GFLOP/s, median of 7): "
              + ", ".join(f"{k} {v:.0f}" for k, v in mm.items()))
        print(f"utilisation: {achieved / mm_mean:.0%} of the mean matmul rate at these shapes")
        print(f"peak {'allocated device' if device.type == 'cuda' else 'resident'} memory: "
              f"{peak_memory_mib(device):,.0f} MiB")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
