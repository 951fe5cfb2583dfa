"""GPU check: what a few minutes on a CUDA machine answer that the CPU cannot.

    python bench/gpu_check.py --out DIR [--budget-s 240] [--sections tests train sync ddp1 beam probe]

Each section runs in a child process of its own under its own timeout (its share of the budget,
plus whatever the sections before it left unused), so a hang or a CUDA error in one cannot take
the others down. Every measurement is appended to DIR/gpu_check.jsonl as one JSON record (with
the run's start time, ``run``) and printed as it comes: a run killed half way still leaves what
it measured. The default budget leaves room to run it twice in a 15-minute device session.

  env    the GPU, CUDA, cuDNN, NCCL and torch versions, the TF32 and SDPA flags
  tests  python -m pytest -q -m cuda tests/ (tests/test_cuda.py): the summary line, the failures;
         the whole output in DIR/pytest_cuda.log
  train  training target tokens/s (median over timed updates after warm-up, the device
         synchronized inside the timer) and peak allocated memory of the WMT14 Transformer-base
         and GNMT shapes (recipes/wmt14-en-de/*.yaml) on synthetic batches of 4,096 padded tokens
         (random ids, V 32,000, no data files), through the trainer's own path (BatchLoss, fused
         Adam, the schedule, optimizer_step): bf16, fp32 with TF32 matmuls on and off (cuDNN's
         TF32, on by default, stays on), and GNMT under bf16 with train.lstm_dtype fp32 and bf16
         (it says which is faster, and which kernels ran)
  sync   a few updates of small models of both kinds, after warm-up, under
         torch.cuda.set_sync_debug_mode("error"): pass, or the op and the line that made the
         host wait for the GPU
  ddp1   DistributedDataParallel on one rank (nmt.distributed.wrap, NCCL over a FileStore)
         against the plain module, Transformer-base in bf16: tokens/s of both, the largest
         gradient difference in the first update and parameter difference after all of them,
         and two more DDP updates under sync debug mode "error"
  beam   beam-5 sentences/s and output tokens/s of random models of both kinds (the Multi30k
         shapes, V 8,000) on 256 synthetic source sentences, fp32; a random model rarely ends
         a sentence, so most hypotheses run to the length limit (1.5 x source + 10)
  probe  nmt bench's probe (``nmt.probe.run_probe``, synthetic batches) of the Multi30k en-de runs
         in recipes/multi30k/results (their lengths.json) and the quick recipes, in the recipe's
         precision (fp32: TF32 matmuls) and in bf16, then of both WMT14 shapes in bf16 (pairs of
         28-31 ids per side: no WMT14 run's lengths.json exists); the probe files go to
         DIR/probes/, for nmt report RUN... --time-from DIR/probes/FILE (one column per precision)

One GPU cannot test NCCL across ranks: see NCCL_NOTE. Without CUDA the script says so in one
line, records that in DIR and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

STARTED = time.time()  # the budget counts from here, imports included
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # the repository's nmt, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import describe_machine  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from nmt import config, distributed  # noqa: E402
from nmt import train as training  # noqa: E402
from nmt.batching import Batch, collate, pad_batch  # noqa: E402
from nmt.data import Parallel  # noqa: E402
from nmt.loss import chunk_rows  # noqa: E402
from nmt.models import build_model, count_parameters  # noqa: E402
from nmt.models.gnmt import LSTM_DTYPES  # noqa: E402
from nmt.search import search  # noqa: E402
from nmt.tokenizer import EOS  # noqa: E402
from nmt.train import BatchLoss, adam, optimizer_step, schedule  # noqa: E402
from nmt.translate import length_batches  # noqa: E402

RECORDS = "gpu_check.jsonl"
DEVICE = torch.device("cuda", 0)  # the one GPU every section uses
NCCL_NOTE = ("one GPU cannot test NCCL across ranks: the all-reduce of 2+ ranks, its overlap with the backward "
             "pass (DDP's buckets sent while gradients are still being computed), bf16 gradient compression on "
             "the wire and the per-update host collectives need a machine with 2+ GPUs; ddp1 checks DDP's "
             "wrapping and hooks on one rank only")
# Each section's share of the budget; what a section leaves unused goes to the ones after it.
SHARES = {"env": 0.06, "tests": 0.26, "train": 0.28, "sync": 0.08, "ddp1": 0.10, "beam": 0.07, "probe": 0.15}
CHECKS = ["tests", "train", "sync", "ddp1", "beam", "probe"]
GRACE_S = 5.0  # a child is killed this long after its deadline: time to write its last record
MIN_SECTION_S = 8.0  # below this a section is not started (CUDA alone takes seconds to start)

WMT_RECIPES = {"transformer-base": "recipes/wmt14-en-de/transformer-base.yaml",
               "gnmt": "recipes/wmt14-en-de/gnmt.yaml"}
VOCAB = 32000
BATCH_TOKENS = 4096  # padded tokens per batch, train.max_tokens of both WMT14 recipes
SENTENCE_WIDTH = 32  # padded length of a synthetic batch's rows (with EOS or BOS): 128 sentences
# (model, precision, train.tf32, train.lstm_dtype), most wanted first: the recipes' bf16, GNMT's two
# LSTM dtypes side by side, then fp32 with and without TF32.
TRAIN_RUNS = [
    ("transformer-base", "bf16", None, "fp32"),
    ("gnmt", "bf16", None, "fp32"),
    ("gnmt", "bf16", None, "bf16"),
    ("transformer-base", "fp32", True, "fp32"),
    ("gnmt", "fp32", True, "fp32"),
    ("transformer-base", "fp32", False, "fp32"),
    ("gnmt", "fp32", False, "fp32"),
]
# The LSTM kernels a dispatch mode sees on CUDA: cuDNN's, or the fused cell of the non-cuDNN path.
RNN_OPS = {"aten::_cudnn_rnn", "aten::_thnn_fused_lstm_cell"}


# --- records -----------------------------------------------------------------------------------

class Recorder:
    """Appends one JSON record per call to DIR/gpu_check.jsonl and prints it as a line, at once."""

    def __init__(self, out: Path, run: str, section: str, echo: bool = True):
        self.path, self.run, self.section, self.echo = out / RECORDS, run, section, echo

    def __call__(self, **fields) -> None:
        record = {"run": self.run, "section": self.section, **fields}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        if self.echo:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"[{self.section}] {text}", flush=True)


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _error(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(e).splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _where(error: BaseException, frames: int = 3) -> list[str]:
    """The innermost lines of this repository's code in ``error``'s traceback."""
    tb = traceback.extract_tb(error.__traceback__)
    ours = [f for f in tb if Path(f.filename).is_relative_to(ROOT) and not f.filename.endswith("gpu_check.py")]
    return [f"{Path(f.filename).relative_to(ROOT) if Path(f.filename).is_relative_to(ROOT) else f.filename}:"
            f"{f.lineno} {f.line}" for f in (ours or tb)[-frames:]]


def _free() -> None:
    """Drop what the last measurement left on the GPU; the next one's peak starts from here."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# --- the trainer's update, on synthetic batches -------------------------------------------------

def synthetic_batches(count: int, vocab: int, max_tokens: int, width: int, seed: int) -> list[Batch]:
    """``count`` collated batches (``nmt.batching.collate``, pinned) of ``max_tokens // width`` random pairs,
    each side width - 4 .. width - 1 ids long (with EOS or BOS at most ``width``), as a length-bucketed
    batch of at most ``max_tokens`` padded tokens holds them."""
    rng = np.random.default_rng(seed)
    n = max_tokens // width
    batches = []
    for _ in range(count):
        src = [rng.integers(4, vocab, k).tolist() for k in rng.integers(width - 4, width, n)]
        tgt = [rng.integers(4, vocab, k).tolist() for k in rng.integers(width - 4, width, n)]
        batches.append(collate(Parallel(src, tgt, list(range(n))), np.arange(n)).pin_memory())
    return batches


class TrainSetup:
    """A model with the trainer's precision, loss, optimizer and schedule on ``device``; ``step`` is one
    update as ``Trainer.update`` makes it with one micro-batch on one rank."""

    def __init__(self, cfg: config.Config, vocab: int, device: torch.device, seed: int = 1):
        tc = cfg.train
        found = training.precision(tc, device)  # autocast, loss scaler and the TF32 switch, as the trainer sets them
        self.autocast, self.scaler, self.device = found.autocast, found.scaler, device
        torch.manual_seed(seed)
        self.model = build_model(cfg.model, vocab).to(device)
        if cfg.model.kind == "gnmt":
            self.model.lstm_dtype = LSTM_DTYPES[tc.lstm_dtype]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.loss = BatchLoss(self.model, tc.label_smoothing, self.autocast, chunk_rows(vocab, device))
        self.module: torch.nn.Module = self.loss  # or the loss under DistributedDataParallel
        self.optimizer = adam(self.params, tc, device)
        self.scheduler = schedule(self.optimizer, tc)
        self.clip_norm = tc.clip_norm

    def step(self, host: Batch, keep_grads: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """One update on ``host`` (pinned): its loss sum on the device, and with ``keep_grads`` a copy of the
        gradients before the optimizer step. Nothing here waits for the device."""
        batch = host.to(self.device, non_blocking=True)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.module(batch.src, batch.src_lens, batch.tgt_in, batch.rows, batch.targets)
        self.scaler.scale(loss * (1.0 / batch.ntokens)).backward()
        grads = [p.grad.detach().clone() for p in self.params] if keep_grads else None
        optimizer_step(self.optimizer, self.scheduler, self.scaler, self.params, self.clip_norm)
        return loss.detach(), grads


def timed_updates(setup: TrainSetup, batches: list[Batch], first: int, most: int, seconds: float,
                  seed: int | None = None) -> tuple[list[float], list[int], list[torch.Tensor]]:
    """Seconds and target tokens of each of at least 3 and at most ``most`` updates (fewer once ``seconds``
    have passed), the device synchronized before the clock starts and before it stops; their losses
    (on the device). ``seed``: the RNG is seeded before update i with seed + i (the same dropout masks
    in two runs)."""
    times, tokens, losses = [], [], []
    end = time.perf_counter() + seconds
    i = first
    while len(times) < most and (len(times) < 3 or time.perf_counter() < end):
        if seed is not None:
            torch.manual_seed(seed + i)
        host = batches[i % len(batches)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = setup.step(host)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(host.ntokens)
        losses.append(loss)
        i += 1
    return times, tokens, losses


def tokens_per_s(times: list[float], tokens: list[int]) -> float:
    return statistics.median(n / t for n, t in zip(tokens, times))


class RnnCalls(TorchDispatchMode):
    """The LSTM kernels called, with their input and weight dtypes: {(op, input dtype, weight dtypes)}."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in RNN_OPS:
            self.seen.add((name, str(args[0].dtype), ",".join(sorted(str(d) for d in weight_dtypes(name, args)))))
        return func(*args, **(kwargs or {}))


def weight_dtypes(op: str, args: tuple) -> set[torch.dtype]:
    """The dtypes an LSTM kernel's weights come in: _cudnn_rnn's list of weights, the fused cell's
    hidden gates (h @ W_hh)."""
    return {w.dtype for w in args[1]} if op == "aten::_cudnn_rnn" else {args[1].dtype}


class LastOps(TorchDispatchMode):
    """The last few ops dispatched: after a sync-debug error, the one that made the host wait."""

    def __init__(self):
        super().__init__()
        self.ops: deque[str] = deque(maxlen=4)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def wmt_config(model: str, precision: str, tf32: bool | None, lstm_dtype: str) -> config.Config:
    cfg = config.load_recipe(ROOT / WMT_RECIPES[model])
    cfg.train = replace(cfg.train, precision=precision, tf32=tf32, lstm_dtype=lstm_dtype)
    return cfg


# --- sections (each runs in a child process) ---------------------------------------------------

def section_env(rec: Recorder, until: float) -> None:
    device = DEVICE
    props = torch.cuda.get_device_properties(device)
    try:
        nccl = torch.cuda.nccl.version()
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except (AttributeError, RuntimeError) as e:
        nccl = f"unavailable ({e})"
    print(describe_machine(device), flush=True)
    rec(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
        memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
        devices=torch.cuda.device_count(), torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(), nccl=nccl, bf16=torch.cuda.is_bf16_supported(),
        matmul_tf32_default=torch.backends.cuda.matmul.allow_tf32, cudnn_tf32=torch.backends.cudnn.allow_tf32,
        sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
        sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled())


def section_tests(rec: Recorder, until: float) -> None:
    """pytest -m cuda, its output streamed, killed at the section's deadline."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    watchdog = threading.Timer(max(1.0, until - time.time() - 1), kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    finally:
        watchdog.cancel()
    (rec.path.parent / "pytest_cuda.log").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = next((x.strip("= ") for x in reversed(lines) if x.strip()), "")
    failed = [x for x in lines if x.startswith(("FAILED", "ERROR"))]
    status = "killed at the section's deadline" if killed.is_set() else \
        {0: "pass", 5: "no test selected"}.get(rc, "fail")
    rec(command=" ".join(command[1:]), rc=rc, summary=summary, failed=failed, status=status)


def section_train(rec: Recorder, until: float) -> None:
    device = DEVICE
    batches = synthetic_batches(4, VOCAB, BATCH_TOKENS, SENTENCE_WIDTH, seed=1)
    rec(batches=len(batches), padded_tokens=BATCH_TOKENS, sentences=len(batches[0].src_lens),
        target_tokens=[b.ntokens for b in batches], vocab=VOCAB)
    results: dict[tuple, float] = {}
    for j, (model, precision, tf32, lstm_dtype) in enumerate(TRAIN_RUNS):
        seconds = (until - time.time()) / (len(TRAIN_RUNS) - j)
        what = {"model": model, "precision": precision,
                "tf32": bool(tf32) if precision == "fp32" else None,
                **({"lstm_dtype": lstm_dtype} if model == "gnmt" else {})}
        if seconds < 3:
            rec(**what, status="skipped: the section's time is spent")
            continue
        start = time.perf_counter()
        setup = None
        try:
            _free()
            setup = TrainSetup(wmt_config(model, precision, tf32, lstm_dtype), VOCAB, device)
            # Warm-up: cuDNN and cuBLAS pick their kernels, Adam's state is made. The first update's loss
            # is that of the initial weights, the same in every run of a model: only precision moves it.
            init_loss, _ = setup.step(batches[0])
            setup.step(batches[1])
            watch = RnnCalls()
            with watch:  # one more, watched: which LSTM kernels ran, in which dtypes
                setup.step(batches[2])
            times, tokens, losses = timed_updates(setup, batches, 3, 12, seconds - (time.perf_counter() - start))
            rate = tokens_per_s(times, tokens)
            results[(model, precision, tf32, lstm_dtype)] = rate
            rec(**what, target_tokens_per_s=round(rate), update_ms=_round(1000 * statistics.median(times)),
                updates_timed=len(times), peak_mib=round(torch.cuda.max_memory_allocated(device) / 2**20),
                loss_init=_round(init_loss.item() / batches[0].ntokens, 5),
                loss_last=_round(losses[-1].item() / tokens[-1], 5),
                params=count_parameters(setup.model), matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                cudnn_tf32=torch.backends.cudnn.allow_tf32,
                **({"lstm_kernels": sorted(" ".join(c) for c in watch.seen)} if model == "gnmt" else {}))
        except Exception as e:  # noqa: BLE001 - one configuration failing (say out of memory) is a finding
            rec(**what, status="error", error=_error(e), where=_where(e))
        finally:
            del setup
        if (model, precision, lstm_dtype) == ("gnmt", "bf16", "bf16"):
            _lstm_verdict(rec, results)
    _free()


def _lstm_verdict(rec: Recorder, results: dict[tuple, float]) -> None:
    fp32, bf16 = results.get(("gnmt", "bf16", None, "fp32")), results.get(("gnmt", "bf16", None, "bf16"))
    if fp32 is None or bf16 is None:
        rec(verdict="gnmt under bf16: lstm_dtype fp32 against bf16 not compared (one of them did not run)")
        return
    faster, ratio = ("bf16", bf16 / fp32) if bf16 > fp32 else ("fp32", fp32 / bf16)
    rec(verdict=f"gnmt under bf16: train.lstm_dtype {faster} is faster, {ratio:.2f}x "
                f"(fp32 {fp32:,.0f}, bf16 {bf16:,.0f} target tokens/s; loss_init above: the same loss)",
        faster_lstm_dtype=faster, ratio=_round(ratio))


SMALL_MODELS = {
    "transformer": config.TransformerConfig(d_model=64, heads=4, ffn=128, encoder_layers=2, decoder_layers=2,
                                            dropout=0.1, max_positions=64),
    "gnmt": config.GNMTConfig(embed_dim=32, hidden=48, encoder_layers=2, decoder_layers=2, dropout=0.1,
                              max_positions=64),
}


def sync_check(setup: TrainSetup, batches: list[Batch], first: int, count: int, watch: bool = True) -> dict:
    """``count`` updates (after warm-up) under sync debug mode "error": {"status": "pass"}, or the error, the
    lines it came from and (``watch``) the op being dispatched when the host had to wait."""
    torch.cuda.synchronize()
    ops = LastOps() if watch else None
    try:
        torch.cuda.set_sync_debug_mode("error")
        with ops or nullcontext():
            for i in range(first, first + count):
                setup.step(batches[i % len(batches)])
        result = {"status": "pass", "updates": count}
    except RuntimeError as e:  # a synchronizing operation is reported as such; anything else is an error
        synced = "synchroniz" in str(e).lower()
        result = {"status": "synced" if synced else "error", "error": _error(e), "where": _where(e),
                  **({"op": list(ops.ops)[-1:]} if ops else {})}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return result


def section_sync(rec: Recorder, until: float) -> None:
    """Updates after warm-up (the first makes Adam's state) under sync debug mode "error"; a log record's
    read of the loss is outside them, as in training."""
    device = DEVICE
    vocab = 1000
    batches = synthetic_batches(4, vocab, 600, 16, seed=2)
    runs = [("transformer", "fp32", "fp32"), ("transformer", "bf16", "fp32"), ("gnmt", "fp32", "fp32"),
            ("gnmt", "bf16", "fp32"), ("gnmt", "bf16", "bf16")]
    for kind, precision, lstm_dtype in runs:
        what = {"model": kind, "precision": precision, **({"lstm_dtype": lstm_dtype} if kind == "gnmt" else {})}
        if until - time.time() < 2:
            rec(**what, status="skipped: the section's time is spent")
            continue
        cfg = config.Config(model=SMALL_MODELS[kind],
                            train=config.TrainConfig(precision=precision, lstm_dtype=lstm_dtype))
        try:
            setup = TrainSetup(cfg, vocab, device)
            for i in range(2):
                setup.step(batches[i])
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            rec(**what, status="error in warm-up", error=_error(e), where=_where(e))
            continue
        rec(**what, **sync_check(setup, batches, 2, 4))
        del setup
        _free()


def section_ddp1(rec: Recorder, until: float) -> None:
    """The same updates (same initial weights, batches and dropout masks) through the plain BatchLoss and
    through DistributedDataParallel on one rank."""
    import torch.distributed as dist

    device = DEVICE
    torch.cuda.set_device(device)
    cfg = wmt_config("transformer-base", "bf16", None, "fp32")
    cfg.train = replace(cfg.train, warmup_steps=1)  # full-size steps from the first: differences would show
    batches = synthetic_batches(4, VOCAB, BATCH_TOKENS, SENTENCE_WIDTH, seed=3)
    backend = "nccl" if dist.is_nccl_available() else "gloo"
    scratch = tempfile.TemporaryDirectory(prefix="gpu-check-")
    store = Path(scratch.name) / "store"
    dist.init_process_group(backend, store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    buckets = []
    hook = distributed.HOOKS[cfg.train.grad_compression]

    def counted(group, bucket):  # DDP checks the hook's parameter names (and annotations: none here)
        buckets.append(bucket.index())
        return hook(group, bucket)

    distributed.HOOKS[cfg.train.grad_compression] = counted
    runs = {}
    try:
        for name in ("plain", "ddp"):
            _free()
            setup = TrainSetup(cfg, VOCAB, device, seed=1)
            if name == "ddp":
                setup.module = distributed.wrap(distributed.Context(device=device), setup.loss,
                                                cfg.train.bucket_cap_mb, cfg.train.grad_compression)
            torch.manual_seed(100)
            first_loss, grads = setup.step(batches[0], keep_grads=True)
            torch.manual_seed(101)
            second_loss, _ = setup.step(batches[1])  # warm-up; DDP fixes its buckets in the first backward pass
            buckets.clear()
            if name == "plain":
                times, tokens, losses = timed_updates(setup, batches, 2, 8, (until - time.time()) / 2 - 5, seed=100)
            else:  # as many updates as the plain run made, to compare the parameters after them
                times, tokens, losses = timed_updates(setup, batches, 2, len(runs["plain"].times), 1e9, seed=100)
            runs[name] = SimpleNamespace(
                rate=tokens_per_s(times, tokens), times=times, grads=grads, losses=[first_loss, second_loss, *losses],
                params=[p.detach().clone() for p in setup.params], buckets=len(buckets) / len(times))
            rec(module=name, backend=backend if name == "ddp" else None, target_tokens_per_s=round(runs[name].rate),
                update_ms=_round(1000 * statistics.median(times)), updates=2 + len(times),
                peak_mib=round(torch.cuda.max_memory_allocated(device) / 2**20),
                **({"buckets_per_update": runs[name].buckets} if name == "ddp" else {}))
            if name == "plain":
                del setup
        plain, ddp = runs["plain"], runs["ddp"]
        grad_diff = max((a - b).abs().max().item() for a, b in zip(plain.grads, ddp.grads))
        grad_max = max(a.abs().max().item() for a in plain.grads)
        updates = len(plain.losses)
        param_diff = max((a - b).abs().max().item() for a, b in zip(plain.params, ddp.params))
        rec(ddp_over_plain=_round(ddp.rate / plain.rate), first_update_grad_max_diff=grad_diff,
            first_update_grad_max=_round(grad_max), param_max_diff=param_diff, updates_compared=updates,
            lr=cfg.train.lr, loss_max_diff=max(abs(a.item() - b.item()) for a, b in zip(plain.losses, ddp.losses)),
            note="one rank's all-reduce is the identity: differences come from nondeterministic kernels only; "
                 "a gradient difference near first_update_grad_max, or a parameter difference near lr x updates, "
                 "is a fault in the wrapping")
        rec(note=NCCL_NOTE)
        # Last, as it may leave the process group in any state: DDP's update never waits for the GPU either.
        rec(module="ddp", sync_debug_mode="error", **sync_check(setup, batches, 2 + len(ddp.times), 2, watch=False))
    finally:
        distributed.HOOKS[cfg.train.grad_compression] = hook
        dist.destroy_process_group()
        scratch.cleanup()


def beam_decode(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                cfg: config.SearchConfig) -> int:
    """Search every batch; the output tokens of the best hypotheses, EOS included."""
    return sum(len(hyps[0].tokens) + 1 for src, src_lens in batches for hyps in search(model, src, src_lens, cfg))


def section_beam(rec: Recorder, until: float) -> None:
    device = DEVICE
    cfg = config.SearchConfig(beam=5)
    vocab, n = 8000, 256
    rng = np.random.default_rng(4)
    ids = [rng.integers(4, vocab, k).tolist() + [EOS] for k in rng.integers(8, 31, n)]
    lengths = [len(x) for x in ids]
    order = sorted(range(n), key=lambda i: (lengths[i], i))  # as translate sorts them
    batches = []
    for batch in length_batches(lengths, order, cfg.max_tokens, cfg.max_sentences):
        src = pad_batch([ids[i] for i in batch])  # (b, S), each row ending in EOS
        batches.append((src.to(device), torch.tensor([lengths[i] for i in batch]).to(device)))
    for j, (kind, model_cfg) in enumerate([("transformer", config.TransformerConfig()), ("gnmt", config.GNMTConfig())]):
        torch.manual_seed(1)
        model = build_model(model_cfg, vocab).to(device).eval()
        search(model, *batches[0], cfg)  # warm-up
        end = time.time() + (until - time.time()) / (2 - j) - 1
        times, out_tokens = [], 0
        while len(times) < 3 and (not times or time.time() + times[-1] < end):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out_tokens = beam_decode(model, batches, cfg)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rec(model=kind, params=count_parameters(model), beam=cfg.beam, precision="fp32", sentences=n,
            batches=len(batches), sentences_per_s=_round(n / seconds), out_tokens_per_s=round(out_tokens / seconds),
            out_tokens=out_tokens, repeats=len(times))
        del model
        _free()


MULTI30K = ROOT / "recipes/multi30k/results/en-de"
# (probe file name, recipe or run directory, the run whose lengths.json the batches are drawn from; None:
# WMT14, uniform lengths), the Multi30k runs first: they are what a projection of the committed runs needs.
PROBES = [
    ("multi30k-transformer", MULTI30K / "transformer-seed1", MULTI30K / "transformer-seed1"),
    ("multi30k-gnmt", MULTI30K / "gnmt-seed1", MULTI30K / "gnmt-seed1"),
    ("multi30k-quick", ROOT / "recipes/multi30k/quick.yaml", MULTI30K / "transformer-seed1"),
    ("multi30k-gnmt-quick", ROOT / "recipes/multi30k/gnmt-quick.yaml", MULTI30K / "gnmt-seed1"),
    ("wmt14-transformer-base", ROOT / WMT_RECIPES["transformer-base"], None),
    ("wmt14-gnmt", ROOT / WMT_RECIPES["gnmt"], None),
]
PROBE_STEPS = 20


def uniform_lengths(cfg: config.Config) -> dict:
    """A length histogram of pairs of 28-31 ids per side (as the train section's batches): for a recipe
    whose corpus and runs are not at hand."""
    low, high = SENTENCE_WIDTH - 4, SENTENCE_WIDTH - 1
    return {"vocab_size": cfg.tokenizer.vocab_size, "max_len": cfg.data.max_len,
            "counts": [[s, t, 1] for s in range(low, high + 1) for t in range(low, high + 1)],
            "path": f"uniform {low}-{high} ids per side (no lengths.json of a run of this recipe at hand)"}


def section_probe(rec: Recorder, until: float) -> None:
    """nmt bench's probe of each of PROBES, in the recipe's precision and in bf16 (WMT14: bf16, their own)."""
    from nmt import probe

    out = rec.path.parent / "probes"
    jobs = [(name, source, lengths_of, precision) for name, source, lengths_of in PROBES
            for precision in (["fp32", "bf16"] if lengths_of is not None else ["bf16"])]
    load = probe.measure_load()  # once, before them all: recorded in each file (the probes are forced)
    for name, source, lengths_of, precision in jobs:
        what = {"probe": name, "precision": precision}
        if until - time.time() < 4:
            rec(**what, status="skipped: the section's time is spent")
            continue
        try:
            _free()
            cfg, _ = probe.resolve(source, [f"train.precision={precision}"])
            lengths = probe.synthetic_lengths(cfg, lengths_of) if lengths_of is not None else uniform_lengths(cfg)
            path = out / f"{name}-{precision}.json"
            found = probe.run_probe(cfg, path, PROBE_STEPS, probe.WARMUP, lengths, load, force=True,
                                    source=str(Path(source).relative_to(ROOT)))
            rec(**what, file=str(path), seconds_per_update=_round(found["seconds_per_update"]),
                target_tokens_per_s=round(found["target_tokens_per_s"]), peak_mib=round(found["peak_memory_mib"]),
                tf32=found["tf32"], load=found["load"])
        except Exception as e:  # noqa: BLE001 - one probe failing (say out of memory) is a finding
            rec(**what, status="error", error=_error(e), where=_where(e))


SECTIONS = {"env": section_env, "tests": section_tests, "train": section_train, "sync": section_sync,
            "ddp1": section_ddp1, "beam": section_beam, "probe": section_probe}


# --- the parent: one child per section ---------------------------------------------------------

def run_section(name: str, out: Path, run: str, seconds: float) -> tuple[str, int | None]:
    """Run section ``name`` in a child process given ``seconds``, killed GRACE_S after that: how the process
    ended (ok, failed: an error it recorded, timeout: killed) and its exit status."""
    until = time.time() + seconds
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--section", name,
               "--run-id", run, "--until", f"{until:.3f}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        rc = proc.wait(timeout=seconds + GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "timeout", None
    except BaseException:
        proc.kill()
        raise
    return ("ok" if rc == 0 else "failed"), rc


def run_child(args: argparse.Namespace) -> int:
    rec = Recorder(args.out, args.run_id, args.section)
    try:
        SECTIONS[args.section](rec, args.until)
    except Exception as e:  # noqa: BLE001 - recorded, and the parent goes on with the next section
        rec(status="error", error=_error(e), where=_where(e, 5))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help=f"directory for {RECORDS} (appended to)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="seconds for the whole check (default 240)")
    parser.add_argument("--sections", nargs="+", choices=CHECKS, default=CHECKS,
                        help="sections to run (always in the order listed; env runs first anyway)")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # a child's one section
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.section:
        return run_child(args)

    started = STARTED
    run = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if not torch.cuda.is_available():
        Recorder(args.out, run, "env", echo=False)(cuda=False, torch=torch.__version__, status="no CUDA GPU")
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, torch.cuda.is_available() is False); "
              f"nothing measured, and {args.out / RECORDS} says so")
        return 0
    note = Recorder(args.out, run, "note", echo=False)
    note(note=NCCL_NOTE, budget_s=args.budget_s, sections=args.sections)
    print(f"gpu_check: {', '.join(['env', *args.sections])} in at most {args.budget_s:.0f} s; records appended to "
          f"{args.out / RECORDS} (run {run})\nNOTE: {NCCL_NOTE}", flush=True)
    deadline = started + args.budget_s - GRACE_S  # the last child's kill lands within the budget
    names = ["env", *[s for s in CHECKS if s in args.sections]]
    outcome = {}
    for i, name in enumerate(names):
        left = deadline - time.time()
        seconds = left * SHARES[name] / sum(SHARES[n] for n in names[i:])
        if seconds < MIN_SECTION_S:
            outcome[name] = "skipped"
            Recorder(args.out, run, name)(process=f"skipped: {left:.0f} s of the budget left")
            continue
        print(f"--- {name}: up to {seconds:.0f} s", flush=True)
        begun = time.time()
        process, rc = run_section(name, args.out, run, seconds)
        outcome[name] = process
        Recorder(args.out, run, name)(process=process, rc=rc, seconds=round(time.time() - begun, 1))
    print(f"gpu_check: done in {time.time() - started:.0f} s: "
          + ", ".join(f"{name} {process}" for name, process in outcome.items())
          + f"\nNOTE: {NCCL_NOTE}\nrecords: {args.out / RECORDS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
