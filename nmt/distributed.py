"""Data-parallel training on torch.distributed, as launched by torchrun.

torchrun (or ``nmt train --nproc N``, which runs torchrun's own launcher in-process)
starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK. Each process
calls ``setup()``: NCCL on CUDA, gloo on the CPU, with a collective timeout from the
recipe instead of the 30-minute default, so a lost peer ends the job instead of hanging it.

Gradients travel through PyTorch's ``DistributedDataParallel`` (``wrap``): its buckets are
all-reduced during the backward pass, as their gradients become ready. DDP averages over
ranks; nmt's loss is a sum over the update's tokens divided by their count over all ranks,
so the hooks here sum instead (``sum_hook``, or ``bf16_sum_hook`` for half the bytes).
``all_reduce_gradients`` is the same sum after the backward pass, for the updates where
a rank ran out of memory and split a micro-batch (and for ``train.overlap: false``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nmt.errors import NmtError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(timeout_minutes: float = 10.0) -> Context:
    """Join the process group torchrun prepared; a plain process gets a one-rank context."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not launched():
        return Context(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda":
        check_gpus(local_world, f"{local_world} processes on this node")
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        except (RuntimeError, ValueError, OSError) as e:
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise NmtError(f"rank {rank} could not join the process group at {where} "
                           f"({str(e).splitlines()[0][:120]}); if the port is taken, pick another "
                           "(--master-port or --rdzv-endpoint), and check every node can reach it") from None
    return Context(rank, world, local_rank, local_world, device)


def check_gpus(processes: int, what: str) -> None:
    """Refuse more processes on a node than it has visible GPUs, where it has any (one process per GPU)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible and processes > visible:
        raise NmtError(f"{what}, but this node has {visible} visible GPU(s): one process per GPU "
                       f"(--nproc {visible} or less; CUDA_VISIBLE_DEVICES chooses which)")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context, group=None) -> None:
    if ctx.distributed:
        dist.barrier(group=group)


# Some waits last as long as work that one rank does for all (preparing a corpus) or that
# every rank does a share of (validation): they go through a group of their own, whose
# timeout is long enough for that work and does not loosen dist_timeout_minutes elsewhere.
PATIENT_TIMEOUT = timedelta(hours=24)


def patient_group(ctx: Context):
    """A gloo group of all ranks whose collectives wait up to ``PATIENT_TIMEOUT`` (None on one rank).

    Every rank must call this, in the same order as its other collectives.
    """
    if not ctx.distributed:
        return None
    return dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)


def host_group(ctx: Context, timeout_minutes: float):
    """A gloo group for small collectives of host numbers with the usual timeout: None (the default
    group) where that is gloo already, on the CPU, or on one rank. Every rank must call this."""
    if not ctx.distributed or ctx.device.type != "cuda":
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))


def broadcast_object(ctx: Context, obj, group=None):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_sum(ctx: Context, values: list[float], group=None) -> list[float]:
    """Element-wise sum over ranks of host numbers (one collective for several).

    ``group``: a gloo group (``host_group``, ``patient_group``), where the numbers stay on the host:
    on CUDA the default NCCL group would copy them to the GPU and wait for the device to read them back.
    """
    if not ctx.distributed:
        return values
    on_host = group is not None or ctx.device.type != "cuda"
    t = torch.tensor(values, dtype=torch.float64, device="cpu" if on_host else ctx.device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_sum_tensor(ctx: Context, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place, on the device it lives on (gloo: CPU, NCCL: CUDA)."""
    if ctx.distributed:
        dist.all_reduce(t)
    return t


def broadcast_module(ctx: Context, module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if not ctx.distributed:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


BUCKET_BYTES = 25 * 2**20  # the size DistributedDataParallel uses by default


def all_reduce_gradients(ctx: Context, params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks, in buckets of about 25 MB.

    Called once per update, after every rank has finished its backward passes; a parameter
    without a gradient takes part with zeros, so every rank makes the same collectives.
    """
    if not ctx.distributed:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        last = i == len(params) - 1
        if last or size >= BUCKET_BYTES or params[i + 1].grad.dtype != p.grad.dtype:
            flat = torch.cat([g.reshape(-1) for g in bucket])  # (n,) one collective for the bucket
            dist.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
            bucket, size = [], 0


# DDP checks a hook's annotations against its own classes; with postponed evaluation of annotations
# (``from __future__ import annotations``) they are strings, so the hooks carry none.
def sum_hook(group, bucket):
    """DDP communication hook: the bucket (a ``dist.GradBucket``) summed over ranks (DDP's default
    divides by their number); a future of the summed tensor."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def bf16_sum_hook(group, bucket):
    """DDP communication hook: the bucket summed over ranks in bf16 (half the bytes of fp32)."""
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16)
    work = dist.all_reduce(compressed, group=group, async_op=True)

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(fut.value()[0])
        return buffer

    return work.get_future().then(decompress)


HOOKS = {"none": sum_hook, "bf16": bf16_sum_hook}


def wrap(ctx: Context, module: torch.nn.Module, bucket_cap_mb: float = 25.0,
         compression: str = "none") -> torch.nn.parallel.DistributedDataParallel:
    """``module`` under DistributedDataParallel, its gradients summed over ranks by ``HOOKS[compression]``.

    The module must live on ``ctx.device`` already. Every parameter takes part in every backward
    pass (the loss reaches them all), buffers are not broadcast (the models keep none that
    change), and the gradients are views into DDP's buckets (no copy in or out). Not
    ``static_graph``: it fails with ``no_sync()`` (pytorch#143580).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # device_ids=None: the inputs are moved by the trainer (from pinned memory, without waiting), and
    # the source lengths stay on the host, where packing LSTM sequences reads them.
    # Buffers are not synced in the forward pass (broadcast_buffers=False, which torch 2.13 renames).
    named = inspect.signature(DistributedDataParallel).parameters
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in named else "broadcast_buffers"
    ddp = DistributedDataParallel(module, device_ids=None, gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb,
                                  **{buffers: False})
    ddp.register_comm_hook(None, HOOKS[compression])
    return ddp


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, where nothing is queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_objects(ctx: Context, obj, group=None):
    """Every rank's ``obj`` as a list on every rank."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_to_main(ctx: Context, obj, group=None) -> list | None:
    """Every rank's ``obj`` as a list on rank 0; None on the other ranks."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size if ctx.main else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


RESUME_HINT = "the last checkpoint written is intact: run the same command to resume"


def run_torchrun(nproc: int, entrypoint: Callable[..., object], args: Sequence[str],
                 preload: Sequence[str] = (), after_failure: str = RESUME_HINT) -> None:
    """Run ``entrypoint(*args)`` on ``nproc`` local processes with torchrun's launcher.

    The same elastic agent as ``torchrun --standalone --nproc-per-node N``: a free port on
    this host, no restarts, and when one rank fails the agent stops the others. The ranks are
    forked from multiprocessing's fork server, a single-threaded process that has imported
    torch and ``preload`` (modules) once: a rank starts without importing them again and
    shares the memory that import leaves (about 140 MB per process with torch alone) with the
    other ranks for as long as none writes to it. ``entrypoint`` must be importable by name.
    ``after_failure`` ends the line that says a rank failed: what the user can do next.
    """
    import multiprocessing
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    multiprocessing.set_forkserver_preload(["torch", *preload])
    # The agent hands a signal it gets (Ctrl-C) on to the ranks once, then waits for them to
    # stop at the end of their update and save, for up to a minute; its own log lines about
    # that are not the user's business (failures are logged at ERROR, and kept).
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5, start_method="forkserver", shutdown_timeout=60)
    try:
        elastic_launch(launch, entrypoint)(*args)
    except SignalException as e:  # the ranks have said where they stopped
        raise KeyboardInterrupt from e
    except ChildFailedError as e:  # the failing rank has printed its own reason already
        ranks = ", ".join(str(r) for r in sorted(e.failures)) or "?"
        raise NmtError(f"rank {ranks} of {nproc} failed and the others were stopped; {after_failure}") from None
