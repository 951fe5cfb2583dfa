"""What every bench script prints beside its figures, so they compare across machines.

The CPU (model, vector capability, threads) and the GPU if one is used, the device's matmul
rate at the model's own shapes and precision (median of several runs, measured in the same
process; for decoding, at the shapes of a decoding step), and helpers to count FLOPs (a
training step, a decoding) and turn them into utilisation of that rate.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine(device: torch.device | None = None) -> str:
    text = (f"cpu: {cpu_name()} | capability {torch.backends.cpu.get_cpu_capability()} | "
            f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    if device is not None and device.type == "cuda":
        text += f" | gpu: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return text


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(m: int, k: int, n: int, device: torch.device = torch.device("cpu"),
                  dtype: torch.dtype = torch.float32, repeats: int = 7) -> float:
    """Median GFLOP/s of an (m x k) @ (k x n) product on ``device``, waiting for the GPU to finish."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        rates.append(2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def matmul_rates(tokens: int, d: int, ffn: int, vocab: int, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
    return matmul_rates_at([(tokens, d, d), (tokens, d, ffn), (tokens, d, vocab)], device, dtype)


def matmul_rates_at(shapes: list[tuple[int, int, int]], device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of (m x k) @ (k x n) for each (m, k, n), keyed "MxKxN"."""
    return {"x".join(map(str, shape)): matmul_gflops(*shape, device=device, dtype=dtype) for shape in shapes}


def decoder_matmul_shapes(model_cfg, vocab: int, rows: int) -> list[tuple[int, int, int]]:
    """The largest matrix products of one decoding step over ``rows`` rows (sentences x beam).

    Transformer: the self-attention projection, the first feed-forward layer and the output
    projection. GNMT: an upper LSTM layer's input and recurrent products and the output
    projection.
    """
    if model_cfg.kind == "transformer":
        d = model_cfg.d_model
        return [(rows, d, 3 * d), (rows, d, model_cfg.ffn), (rows, d, vocab)]
    h = model_cfg.hidden
    return [(rows, 2 * h, 4 * h), (rows, h, 4 * h), (rows, model_cfg.embed_dim, vocab)]


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (e.g. a forward + backward), as PyTorch counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- two source trees side by side ----------------------------------------------------------------

def run_in_tree(tree: Path, command: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run ``command`` with ``PYTHONPATH=TREE`` from ``tree`` and return the JSON object of the last line
    it prints that is one; exits naming ``what`` if it fails or imported nmt from elsewhere (the
    object's ``nmt`` is the ``nmt.__file__`` the child saw)."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(command, env={**os.environ, **(env or {}), "PYTHONPATH": str(tree.resolve())}, cwd=tree,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{what} of {tree} failed:\n{proc.stderr[-3000:]}")
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    if not Path(result["nmt"]).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"{what}: {tree} imported nmt from {result['nmt']}, not from its own tree")
    return result


def add_tree_arguments(parser, target: str, target_help: str) -> None:
    """The arguments of a script that compares two trees on a recipe or run: OLD_TREE TARGET [--new-tree]."""
    parser.add_argument("old_tree", type=Path, help="the other source tree (git worktree add /tmp/old COMMIT)")
    parser.add_argument(target, type=Path, help=target_help)
    parser.add_argument("--new-tree", type=Path, default=Path(__file__).resolve().parent.parent)


def add_training_arguments(parser, rounds: int, steps: int) -> None:
    """OLD_TREE RECIPE --spm [--new-tree --rounds --steps --warmup --set]: two trees training one recipe."""
    add_tree_arguments(parser, "recipe", "the recipe to train (its data prepared as nmt train prepares it)")
    parser.add_argument("--spm", type=Path, required=True, help="SentencePiece model to reuse")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])


def training_job(args, *overrides: str) -> dict:
    """What a child trainer of ``run_in_tree`` needs from ``add_training_arguments``'s arguments."""
    return {"recipe": str(args.recipe.resolve()), "warmup": args.warmup, "steps": args.steps,
            "overrides": [f"tokenizer.reuse={args.spm.resolve()}", "train.valid_every=0", *overrides,
                          *args.overrides]}
