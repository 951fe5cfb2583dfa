"""What every bench script prints beside its figures, so they compare across CPUs.

The CPU (model, vector capability, threads), the machine's fp32 matmul rate at the
model's own shapes (median of several runs, measured in the same process), and helpers
to count a training step's FLOPs and turn them into utilisation of that rate.
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


def describe_machine() -> str:
    return (f"cpu: {cpu_name()} | capability {torch.backends.cpu.get_cpu_capability()} | "
            f"torch {torch.__version__} | threads {torch.get_num_threads()}")


def matmul_gflops(m: int, k: int, n: int, repeats: int = 7) -> float:
    """Median fp32 GFLOP/s of an (m x k) @ (k x n) product."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def matmul_rates(tokens: int, d: int, ffn: int, vocab: int) -> dict[str, float]:
    shapes = {f"{tokens}x{d}x{d}": (tokens, d, d), f"{tokens}x{d}x{ffn}": (tokens, d, ffn),
              f"{tokens}x{d}x{vocab}": (tokens, d, vocab)}
    return {name: matmul_gflops(*shape) for name, shape in shapes.items()}


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (e.g. a forward + backward), as PyTorch counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def median(values: list[float]) -> float:
    return statistics.median(values)
