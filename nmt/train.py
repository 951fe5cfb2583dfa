"""Training: one loop for every model, with validation, checkpoints and exact resume.

What a run directory holds is in ``nmt.rundir``, what its log says in ``nmt.runlog``.
Running ``train`` on a directory that has a ``last.pt`` resumes exactly:
model, optimizer, schedule, step, the position in the epoch's batch order and the RNG
states are restored, so stopping and resuming gives the same parameters as not stopping.

Two clocks are kept apart: ``train_seconds`` counts the training loop, ``valid_seconds``
counts validation and checkpoint writing; time limits and reports use the first.

A fine-tuned run (``init_from``) starts from another run's weights (checked by
``nmt.rundir.check_parent``), with a fresh step count, schedule and best score.

The corpus is read from the arrays ``nmt prepare`` writes (prepared here first if they are
missing or stale), memory-mapped: every rank maps the same files and a resume re-opens them.

Under torchrun the model trains under PyTorch's DistributedDataParallel: every micro-batch
of an update but the last runs under ``no_sync()``, and the last one's backward pass sums the
gradients over ranks bucket by bucket as they become ready. A micro-batch that runs out of
memory is split in halves; the ranks agree before the last micro-batch whether any did, and
if so the gradients travel after the backward pass instead (see ``Trainer.update``).

An update reads no value from the device, so a GPU's host never waits for it: batches arrive
collated (on a thread, with ``train.prefetch``), with the positions of their real target tokens,
and are copied without blocking; the loss sums stay on the device until a log record reads them.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from nmt import batching, checkpoint, config, distributed, rundir
from nmt.batching import ORDER_VERSION, Batch, EpochBatches, Prefetch, Update, WeightedCorpora, epoch_count
from nmt.config import Config
from nmt.corpus import PreparedCorpus
from nmt.data import read_parallel
from nmt.errors import NmtError
from nmt.hardware import cpu_sample, describe_hardware, hardware, pick_device, same_machine, usable_cores
from nmt.loss import chunk_rows, sequence_loss
from nmt.metrics import bleu
from nmt.models import build_model, count_parameters
from nmt.models.gnmt import LSTM_DTYPES
from nmt.prepare import prepare_split, prepare_train, run_tokenizer
from nmt.runlog import RunLog, first
from nmt.tokenizer import MODEL_FILE, Tokenizer
from nmt.trainlog import Reading, TensorBoard, TrainLog
from nmt.translate import translate_text

log = logging.getLogger("nmt")


# The learning rate schedule's version, kept in last.pt: a run resumes under the schedule it started with.
# 1: update k used the factor of update k - 1 (the first two both 1 / warmup); 2: update k uses its own.
SCHEDULE_VERSION = 2


def inverse_sqrt(warmup: int, version: int = SCHEDULE_VERSION):
    """Linear warmup to the peak, then decay with 1/sqrt(k) (Vaswani et al. 2017): update k (from 1)
    uses ``lr * min(k / warmup, sqrt(warmup / k))``, so the peak is at update ``warmup``.

    ``LambdaLR`` asks for the factor of its step count, the updates made before the one it sets
    the rate of: 0 for update 1. ``version`` 1 is the schedule of runs started before version 2.
    """
    warmup = max(warmup, 1)

    def factor(made: int) -> float:
        k = made + 1 if version >= 2 else max(made, 1)
        return min(k / warmup, math.sqrt(warmup / k))
    return factor


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: ``torch.OutOfMemoryError`` on a GPU (cuDNN's and cuBLAS's workspace
    allocations included), a RuntimeError saying so on the CPU."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower() \
        or "can't allocate memory" in text or "CUDNN_STATUS_ALLOC_FAILED" in text \
        or "CUBLAS_STATUS_ALLOC_FAILED" in text


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                   params: list[torch.nn.Parameter], clip_norm: float) -> bool:
    """Unscale, clip and step; the schedule moves on only if the step was taken. Returns whether it was.

    With fp16 loss scaling (``scaler`` enabled) a step whose gradients overflowed is skipped and
    the scale lowered: reading that decision is the one wait for the device in an fp16 update.
    """
    scaler.unscale_(optimizer)
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if not scaler.is_enabled():
        optimizer.step()
        scheduler.step()
        return True
    scaler.step(optimizer)  # skipped where unscale_ found an inf or NaN
    taken = not sum(v.item() for v in scaler._found_inf_per_device(optimizer).values())
    scaler.update()
    if taken:
        scheduler.step()
    return taken


@dataclass
class Precision:
    """What ``train.precision`` (and ``train.tf32``) make of a device: autocast, the loss scaler, TF32."""

    autocast: AbstractContextManager
    scaler: torch.amp.GradScaler
    tf32: bool


def precision(tc: config.TrainConfig, device: torch.device, world_size: int = 1) -> Precision:
    """Autocast, loss scaling and TF32 for ``tc.precision`` on ``device``; refused before any work where it
    cannot run. Sets PyTorch's TF32 switch for matmuls on CUDA.

    fp16's loss scale starts at 2^16 times the update's tokens (over all ranks and micro-batches):
    the loss is divided by them before the backward pass, so that much smaller gradients would
    otherwise start near fp16's underflow, and the scale grows back only by doubling every 2,000
    updates.
    """
    cuda = device.type == "cuda"
    if tc.precision == "fp16" and not cuda:
        raise NmtError("train.precision=fp16 needs a CUDA GPU (the CPU has no fp16 LSTM kernels and "
                       "gains nothing from fp16); use bf16 or fp32 on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    tokens = world_size * tc.max_tokens * tc.update_freq
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** (16 + int(math.log2(tokens))),
                                  enabled=tc.precision == "fp16")
    tf32 = bool(cuda and tc.precision == "fp32" and tc.tf32 is not False)
    if tc.tf32 and not cuda:
        log.warning("train.tf32 applies to CUDA GPUs; ignored on the %s", device.type.upper())
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return Precision(autocast, scaler, tf32)


def adam(params: list[torch.nn.Parameter], tc: config.TrainConfig, device: torch.device) -> torch.optim.Adam:
    """The optimizer of ``tc`` (Adam's fused kernel on CUDA)."""
    return torch.optim.Adam(params, lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps,
                            weight_decay=tc.weight_decay, fused=device.type == "cuda")


def schedule(optimizer: torch.optim.Optimizer, tc: config.TrainConfig,
             version: int = SCHEDULE_VERSION) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate schedule of ``version`` over ``optimizer``; made anew on resuming, it starts
    from the ``initial_lr`` the first one kept."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt(tc.warmup_steps, version))


@dataclass
class TrainState:
    """Where training stands: saved in ``last.pt`` (as its ``progress``), restored on resuming."""

    step: int = 0
    epoch: int = 1
    batch_in_epoch: int = 0  # updates' worth of batches already taken from this epoch
    train_seconds: float = 0.0
    valid_seconds: float = 0.0
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0
    saved_steps: list[int] = field(default_factory=list)


class TrainClock:
    """Wall-clock seconds of training alone: runs between readings, stopped around validation.

    On a GPU the host queues an update's work and moves on; what the update costs shows up
    wherever the host next waits: in the per-update all-reduce under DDP, in the log's read of
    the loss, on a full launch queue. Timing each ``update()`` call alone would miss those
    waits. This clock runs from one reading to the next, so every wait lands inside it, and it
    needs no synchronisation per step; ``stop`` waits for the queued work first, so that work
    is billed to training and not to the validation that follows.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the last reading (0 while stopped)."""
        if self._since is None:
            return 0.0
        now = time.perf_counter()
        seconds, self._since = now - self._since, now
        return seconds

    def stop(self) -> float:
        """Wait for the device's queued work, then the seconds since the last reading."""
        if self._since is None:
            return 0.0
        distributed.synchronize(self.device)
        seconds = self.lap()
        self._since = None
        return seconds


class BatchLoss(torch.nn.Module):
    """A batch's forward pass up to its (loss, nll): what DistributedDataParallel wraps, so that the
    backward pass it watches is the whole of the batch's, the fused output layer included."""

    def __init__(self, model: torch.nn.Module, smoothing: float, autocast, chunk: int):
        super().__init__()
        self.model, self.smoothing, self.autocast, self.chunk = model, smoothing, autocast, chunk

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor, rows: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_loss(self.model, src, src_lens, tgt_in, rows, targets, self.smoothing, self.autocast,
                             self.chunk)


# --- the trainer --------------------------------------------------------------------------

class Trainer:
    """Trains one model; under torchrun, one Trainer per rank (``ctx``), rank 0 the only writer.

    ``__init__`` runs the setup phases in order, each a method of its own: precision and
    threads, logging, data (tokenizer, prepared corpora, batches), model, optimizer. Then
    ``resume()`` (a run with ``last.pt``) or ``start_from()`` (a fine-tuned run's first start)
    sets the weights where they do not start at random. ``train()`` then consumes ``updates``,
    the iterator of micro-batch groups the data side hands it.
    """

    def __init__(self, cfg: Config, run_dir: Path, progress_bar: bool = True,
                 ctx: distributed.Context | None = None, patient=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = ctx or distributed.Context(device=pick_device())
        self.rank, self.world_size = self.ctx.rank, self.ctx.world_size
        self.main = self.ctx.main
        self.device = self.ctx.device
        self.progress_bar = progress_bar and self.main
        self.stop_requested = False
        self.oom_splits = 0  # micro-batches split after running out of memory, since the last log record
        self._warned_oom = False
        self.state = TrainState()
        self.runlog = RunLog(self.run_dir / rundir.LOG_FILE, enabled=self.main)
        self.clock = TrainClock(self.device)
        # Waits for rank 0's data preparation and for validation shares go through this gloo group,
        # and so do the numbers the ranks agree on each update (they stay on the host).
        self.patient = patient if patient is not None else distributed.patient_group(self.ctx)
        self.host_group = distributed.host_group(self.ctx, cfg.train.dist_timeout_minutes)

        self._setup_precision()
        self._setup_threads()
        self._setup_logging()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()

    def _setup_precision(self) -> None:
        found = precision(self.cfg.train, self.device, self.world_size)
        self.autocast, self.scaler, self.tf32 = found.autocast, found.scaler, found.tf32

    def _setup_threads(self) -> None:
        """Intra-op threads: ``train.threads``, else this process's cores shared among the node's ranks."""
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        elif self.ctx.distributed:
            torch.set_num_threads(max(1, usable_cores() // self.ctx.local_world_size))

    def _setup_logging(self) -> None:
        """The log's outputs; TensorBoard if ``train.tensorboard``: the package checked on every rank,
        written by rank 0."""
        board = TensorBoard(self.run_dir / rundir.BOARD_DIR) if self.cfg.train.tensorboard else None
        self.trainlog = TrainLog(self.runlog, board if self.main else None, self.progress_bar,
                                 self.cfg.train.max_minutes)

    def _setup_data(self) -> None:
        """The tokenizer, the training corpora and the valid split mapped from their prepared arrays, the batches.

        Rank 0 trains (or copies) the run's tokenizer and prepares both splits, or finds them
        prepared (``nmt prepare``, an earlier start); the other ranks wait in the patient
        group, since preparing a big corpus can outlast ``train.dist_timeout_minutes``. Then
        every rank maps the same files: N ranks cost the page cache once. A resumed run finds
        them up to date and encodes nothing. Listed training corpora are prepared one by one
        and drawn from each epoch by their weights (``nmt.batching.WeightedCorpora``).
        """
        cfg, tc = self.cfg, self.cfg.train
        if self.main:
            self.tokenizer = run_tokenizer(cfg, self.run_dir, self.progress_bar)
            parts = prepare_train(cfg, self.tokenizer, progress=self.progress_bar)
            self.valid_data = prepare_split(cfg, self.tokenizer, "valid", progress=self.progress_bar)
        distributed.barrier(self.ctx, self.patient)
        if not self.main:
            self.tokenizer = Tokenizer(self.run_dir / MODEL_FILE)
            parts = prepare_train(cfg, self.tokenizer)
            self.valid_data = prepare_split(cfg, self.tokenizer, "valid")
        # On another node the cache is its own, and preparing there may outlast a collective's timeout.
        distributed.barrier(self.ctx, self.patient)
        self.tokenizer_sha256 = self.tokenizer.sha256()
        self.train_data = self._join_corpora(parts)

        if self.main and not (self.run_dir / rundir.LENGTHS_FILE).exists():  # for probes without the corpus
            rundir.write_lengths(self.run_dir, batching.length_histogram(self.train_data, tc.seed), len(self.tokenizer),
                                 cfg.data.max_len)
        self.batches = EpochBatches(self.train_data, tc.max_tokens, tc.seed, self.rank, self.world_size)
        if not self.batches.epoch(1):
            raise NmtError(f"train.max_tokens={tc.max_tokens} with {self.world_size} rank(s) leaves no "
                           "batch in an epoch; use fewer ranks or more data")
        self.updates = self.batches.updates(tc.update_freq)
        # Validation: the loss over every valid batch and BLEU over the first sentences, each
        # rank a share of both.
        self.valid_batches = EpochBatches(self.valid_data, tc.max_tokens, 0, self.rank, self.world_size,
                                          drop_last=False)
        src, ref = read_parallel(*config.split_paths(cfg.data, "valid"))
        keep = tc.valid_max_sentences or len(src)
        self.valid_src, self.valid_ref = src[:keep], ref[:keep]

    def _join_corpora(self, parts: list[PreparedCorpus]) -> PreparedCorpus | WeightedCorpora:
        """The training data: the one corpus of a plain ``data.train``, else the listed corpora with their weights.

        Sets ``corpora_record`` (what the start record and the log say of each corpus: its pairs,
        those the filters dropped, and those it gives each epoch).
        """
        corpora = config.train_corpora(self.cfg.data)
        data = WeightedCorpora(parts, [c.weight for c in corpora]) if corpora[0].listed else parts[0]
        self.corpora_record = []
        for corpus, part in zip(corpora, parts):
            h = part.header
            per_epoch = epoch_count(corpus.weight, len(part))
            self.corpora_record.append({
                "corpus": corpus.name, "files": [str(corpus.src), str(corpus.tgt)], "weight": corpus.weight,
                "lines": h["lines"], "pairs": h["pairs"],
                "dropped_empty": h["dropped_empty"], "dropped_too_long": h["dropped_too_long"],
                "pairs_per_epoch": per_epoch})
            log.info("%s %s: %s pairs per epoch at weight %g (%s kept of %s lines: %s empty, %s longer than %s "
                     "tokens dropped)", corpus.name, corpus.prefix, f"{per_epoch:,}", corpus.weight,
                     f"{h['pairs']:,}", f"{h['lines']:,}", f"{h['dropped_empty']:,}", f"{h['dropped_too_long']:,}",
                     h["max_len"])
        return data

    def _setup_model(self) -> None:
        """The model, the same on every rank, and the loss that wraps it: under DistributedDataParallel on
        several ranks (``train.overlap``), so that the whole of a batch's backward pass is DDP's to watch."""
        tc = self.cfg.train
        torch.manual_seed(tc.seed)  # the same initial model on every rank
        random.seed(tc.seed)
        self.model = build_model(self.cfg.model, len(self.tokenizer)).to(self.device)
        if self.cfg.model.kind == "gnmt":
            self.model.lstm_dtype = LSTM_DTYPES[tc.lstm_dtype]
        distributed.broadcast_module(self.ctx, self.model)  # one starting point, whatever the seeds did
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Fixed for the run (from the device's size and the vocabulary, never from free memory):
        # the rows decide the order of the output layer's sums.
        self.chunk = chunk_rows(len(self.tokenizer), self.device)
        self.batch_loss = BatchLoss(self.model, tc.label_smoothing, self.autocast, self.chunk)
        self.ddp = None
        if self.ctx.distributed and tc.overlap:
            self.ddp = distributed.wrap(self.ctx, self.batch_loss, tc.bucket_cap_mb, tc.grad_compression)

    def _setup_optimizer(self) -> None:
        tc = self.cfg.train
        torch.manual_seed(tc.seed + self.rank)  # different dropout masks on every rank
        self.optimizer = adam(self.params, tc, self.device)
        self._schedule(SCHEDULE_VERSION)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate the last update used

    def _schedule(self, version: int) -> None:
        self.schedule_version = version
        self.scheduler = schedule(self.optimizer, self.cfg.train, version)

    # --- checkpoints

    def save(self, name: str, full: bool) -> None:
        """Write checkpoint ``name`` (a path inside the run directory) from rank 0; ``full`` (with
        training state) must be called on every rank."""
        rng = None
        if full:  # each rank's RNG, so every rank resumes its own dropout stream
            rng = distributed.gather_to_main(self.ctx, checkpoint.rng_state(), self.patient)
        if not self.main:
            return
        state = checkpoint.model_state(config.to_dict(self.cfg), self.cfg.model.kind, self.tokenizer_sha256,
                                       self.state.step, len(self.tokenizer), self.model, self.world_size)
        if full:
            state.update(checkpoint.training_state(self.optimizer, self.scheduler, self.scaler,
                                                   vars(self.state), rng, ORDER_VERSION),
                         schedule=self.schedule_version)
        checkpoint.save(state, self.run_dir / name)

    def resume(self) -> None:
        """Continue from ``last.pt``: parameters, optimizer, schedule, position in the batch order, RNGs."""
        path = rundir.checkpoint_path(self.run_dir, "last")
        state = checkpoint.load(path, self.tokenizer_sha256)
        checkpoint.check_resumable(state, path, self.cfg.model.kind, self.world_size, ORDER_VERSION)
        self._schedule(state.get("schedule", 1))  # a run started before version 2 keeps its schedule
        progress = checkpoint.restore_training(state, self.model, self.optimizer, self.scheduler, self.scaler,
                                               self.rank)
        self.state = TrainState(**progress)
        self.updates = self._updates_from_position()
        self.runlog.truncate_after(self.state.step)
        log.info("resuming %s at step %d (epoch %d)", self.run_dir, self.state.step, self.state.epoch)

    def start_from(self, init: config.InitFrom) -> None:
        """Begin with another run's weights (fine-tuning), checked by ``check_parent`` first.

        The step count, schedule, best score and patience start fresh; with
        ``init.keep_optimizer`` the parent's Adam moments are loaded too (the new run's learning
        rate and schedule apply to them).
        """
        path = rundir.checkpoint_path(Path(init.run), init.checkpoint)
        state = checkpoint.load(path, self.tokenizer_sha256)
        checkpoint.load_weights(state, path, self.model)
        if init.keep_optimizer:
            checkpoint.load_moments(state, path, self.optimizer)

    def _updates_from_position(self) -> Iterator[Update]:
        st = self.state
        return self.batches.updates(self.cfg.train.update_freq, st.epoch, st.batch_in_epoch)

    # --- training

    def _limits_reached(self) -> str | None:
        tc, st = self.cfg.train, self.state
        if tc.max_steps and st.step >= tc.max_steps:
            return f"reached train.max_steps={tc.max_steps}"
        if tc.max_epochs and st.epoch > tc.max_epochs:
            return f"reached train.max_epochs={tc.max_epochs}"
        if tc.max_minutes and st.train_seconds >= tc.max_minutes * 60:
            return f"reached train.max_minutes={tc.max_minutes:g}"
        if tc.patience and st.bad_validations >= tc.patience:
            return f"no better valid BLEU in {tc.patience} validations (train.patience)"
        return None

    def update(self, upd: Update, total_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step over the micro-batches of ``upd``; returns summed loss, nll, tokens.

        ``total_tokens`` is the number of target tokens in this update over all ranks (this
        rank's by default): each rank's loss is divided by it and the ranks' gradients are
        summed, so N ranks make the same update as one rank with all N batches. The loss and
        nll returned are this rank's, on the device. The position in the epoch is the caller's
        to keep (``upd.next_position``).
        """
        total_tokens = total_tokens or upd.target_tokens
        self.model.train()
        loss_sum, nll_sum, summed = self._backward_all(upd, 1.0 / total_tokens)
        if not summed:  # one rank or train.overlap: false, or a rank split a micro-batch: after the backward pass
            distributed.all_reduce_gradients(self.ctx, self.params)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        optimizer_step(self.optimizer, self.scheduler, self.scaler, self.params, self.cfg.train.clip_norm)
        return loss_sum, nll_sum, total_tokens

    def _backward_all(self, upd: Update, scale: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Forward and backward over every micro-batch, gradients accumulated: (loss sum, nll sum, whether
        DDP summed the gradients over ranks in the last backward pass).

        A piece that runs out of memory is replaced by its two halves, down to single sentences:
        the loss is a sum over tokens times ``scale``, so the halves add up to the same gradient.
        Running out in the forward pass leaves the gradients as they were; in the backward pass
        part of the piece's gradient may be in them already, so the update starts over with the
        pieces it has by then.

        Under DDP every piece but the last runs under ``no_sync()``. DDP decides in the forward
        pass whether the backward pass sums over ranks, so before the last piece the ranks agree
        (one small all-reduce on the host) whether any of them split a piece in this update: if
        one did, the last piece runs under ``no_sync()`` too and the caller sums after the
        backward pass, so that every rank makes the same collectives. Running out of memory in
        the piece whose backward pass sums cannot be recovered (the other ranks are inside the
        collective): this rank stops with one line, and the job resumes from ``last.pt``.
        """
        collated = upd.collated or [None] * len(upd.batches)
        pieces: list[tuple[np.ndarray, Batch | None]] = list(zip(upd.batches, collated))
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = nll_sum = torch.zeros((), device=self.device)
        sync = None if self.ddp is not None else False  # None: not agreed yet
        split = False
        i = 0
        while i < len(pieces):
            if sync is None and i == len(pieces) - 1:
                sync = len(upd.batches) == 1 or not self._any_rank_split(split)
            result = self._forward_backward(*pieces[i], scale, syncing=bool(sync) and i == len(pieces) - 1)
            if isinstance(result, tuple):
                loss_sum, nll_sum, i = loss_sum + result[0], nll_sum + result[1], i + 1
                continue
            pieces[i : i + 1] = [(half, None) for half in self._halves(pieces[i][0])]
            self.oom_splits += 1
            split = True
            if result == "backward":
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = nll_sum = torch.zeros((), device=self.device)
                i = 0
        return loss_sum, nll_sum, bool(sync)

    def _any_rank_split(self, split: bool) -> bool:
        """Whether any rank split a micro-batch of this update so far (one all-reduce of a host number)."""
        return distributed.all_sum(self.ctx, [float(split)], self.host_group)[0] > 0

    def _forward_backward(self, idx: np.ndarray, batch: Batch | None, scale: float,
                          syncing: bool) -> tuple[torch.Tensor, torch.Tensor] | str:
        """Forward and backward of one piece: its (loss, nll), or the phase that ran out of memory.

        ``syncing``: this backward pass sums the gradients over ranks (DDP); else DDP is told not to.
        """
        batch = self._to_device(batch if batch is not None else self.collate(idx))
        phase = "forward"
        quiet = self.ddp.no_sync() if self.ddp is not None and not syncing else nullcontext()
        try:
            with quiet:
                loss, nll = (self.ddp or self.batch_loss)(batch.src, batch.src_lens, batch.tgt_in, batch.rows,
                                                          batch.targets)
                phase = "backward"
                self.scaler.scale(loss * scale).backward()
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            if syncing:
                raise NmtError(f"step {self.state.step + 1}: rank {self.rank} ran out of {self.device} memory on "
                               f"the update's last micro-batch ({len(idx)} sentences), whose backward pass sums the "
                               "gradients over ranks; the last checkpoint is kept: lower train.max_tokens, or set "
                               "train.update_freq >= 2 or train.overlap: false to split such batches, and run the "
                               "same command to resume") from None
            return phase  # leaving the handler drops the exception, and with it the failed graph
        return loss.detach(), nll

    def collate(self, idx: np.ndarray) -> Batch:
        """A micro-batch's tensors on the host, in pinned memory on CUDA (copied from without waiting)."""
        batch = self.batches.collate(idx)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def _to_device(self, batch: Batch) -> Batch:
        return batch.to(self.device, non_blocking=self.device.type == "cuda")

    def _halves(self, idx: np.ndarray) -> list[np.ndarray]:
        """The two halves of a piece that ran out of memory (a batch holds pairs of similar lengths)."""
        data, step = self.train_data, self.state.step + 1
        if len(idx) == 1:
            src, tgt = len(data.src[idx[0]]) + 1, len(data.tgt[idx[0]]) + 1
            raise NmtError(f"step {step}: one sentence pair ({src} source, {tgt} target tokens) does not "
                           f"fit in {self.device} memory on its own; lower data.max_len or the model size")
        if not self._warned_oom:
            self._warned_oom = True
            log.warning("step %d: out of memory on a batch of %d sentences (rank %d); running it in halves. "
                        "Splits are counted in log.jsonl (oom_splits); a lower train.max_tokens avoids "
                        "their cost", step, len(idx), self.rank)
        return [idx[: len(idx) // 2], idx[len(idx) // 2 :]]

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Valid loss, perplexity and BLEU: on rank 0 the result, on the other ranks None.

        Every rank computes the loss of its share of the valid batches and translates its
        share of the BLEU sentences (every N-th, so that all get long and short ones); the
        shares meet in one gather in the patient group, so no rank waits inside a collective
        with a short timeout while others translate, and rank 0 scores the sentences in their
        order. Translations do not depend on the batch they are in: BLEU is that of one rank.
        """
        self.model.eval()
        sums, ntokens = torch.zeros(2, dtype=torch.float64, device=self.device), 0
        for idx in self.valid_batches.epoch(0):
            batch = self._to_device(self.valid_batches.collate(idx))
            sums += torch.stack(self.batch_loss(batch.src, batch.src_lens, batch.tgt_in, batch.rows, batch.targets))
            ntokens += batch.ntokens
        loss_sum, nll_sum = sums.tolist()  # one wait for the device
        search = replace(self.cfg.search, beam=self.cfg.train.valid_beam, n_best=1, sampling="none")
        hyps = translate_text(self.model, self.tokenizer, self.valid_src[self.rank :: self.world_size], search)
        shares = distributed.gather_to_main(self.ctx, (loss_sum, nll_sum, ntokens, hyps), self.patient)
        if shares is None:
            return None
        loss_sum, nll_sum, ntokens = (sum(share[k] for share in shares) for k in range(3))
        all_hyps: list[str] = [""] * len(self.valid_src)
        for rank, share in enumerate(shares):
            all_hyps[rank :: self.world_size] = share[3]
        score = bleu(all_hyps, self.valid_ref, tokenize=self.cfg.data.bleu_tokenize)
        return {"valid_loss": loss_sum / ntokens, "valid_ppl": math.exp(min(nll_sum / ntokens, 50)),
                "valid_bleu": score.score, "valid_bleu_signature": score.signature}

    def _validate_and_save(self) -> None:
        """Validate (every rank a share) and write checkpoints (rank 0; ``last.pt`` holds every rank's RNG)."""
        st = self.state
        start = time.perf_counter()
        result = self.validate()
        improved = self.main and self._keep_checkpoints(result)
        st.valid_seconds += time.perf_counter() - start
        self.save(rundir.LAST_FILE, full=True)
        if not self.main:
            return
        self.trainlog.valid({"step": st.step, "epoch": st.epoch, **result, "best_bleu": st.best_bleu,
                             "train_seconds": round(st.train_seconds, 3),
                             "valid_seconds": round(st.valid_seconds, 3)}, st.train_seconds)
        log.info("step %d: valid loss %.3f, ppl %.2f, BLEU %.2f%s", st.step, result["valid_loss"],
                 result["valid_ppl"], result["valid_bleu"], " (best)" if improved else "")

    def _keep_checkpoints(self, result: dict) -> bool:
        """On rank 0: ``best.pt`` if BLEU improved (returns whether), the step checkpoint, the patience count."""
        st, tc = self.state, self.cfg.train
        improved = result["valid_bleu"] > st.best_bleu
        if improved:
            st.best_bleu, st.best_step, st.bad_validations = result["valid_bleu"], st.step, 0
            self.save(rundir.BEST_FILE, full=False)
        else:
            st.bad_validations += 1
        if tc.keep_last:
            self.save(rundir.step_checkpoint_name(st.step), full=False)
            st.saved_steps = [*st.saved_steps, st.step][-tc.keep_last:]
            rundir.prune_step_checkpoints(self.run_dir, st.saved_steps)
        return improved

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_requested = True

    def _log_start(self) -> None:
        tc = self.cfg.train
        if self.state.step == 0:
            self.runlog.write(event="start", params=count_parameters(self.model), device=str(self.device),
                              world_size=self.world_size, threads=torch.get_num_threads(),
                              precision=tc.precision, tf32=self.tf32, max_tokens=tc.max_tokens,
                              update_freq=tc.update_freq,
                              effective_batch_tokens=self.world_size * tc.max_tokens * tc.update_freq,
                              overlap=self.ddp is not None, loss_chunk_rows=self.chunk,
                              train_pairs=len(self.train_data), corpora=self.corpora_record,
                              **hardware(self.device), step=0)
        elif self.runlog.enabled:  # a run continued on another machine mixes two speeds on one clock
            here = hardware(self.device)
            self.runlog.write(event="resume", **here, step=self.state.step)
            started = first(self.runlog.records(), "start")
            if started and started.get("cpu") and not same_machine(started, here):
                log.warning("%s: resumed on %s, started on %s; its training time mixes two machines' speeds",
                            self.run_dir, describe_hardware(here), describe_hardware(started))
        log.info("model %s: %s parameters; %s training pairs; %d threads on %s", self.cfg.model.kind,
                 f"{count_parameters(self.model):,}", f"{len(self.train_data):,}", torch.get_num_threads(),
                 self.device)

    def train(self, updates: Iterable[Update] | None = None) -> TrainState:
        """Train until a limit, early stop or signal; validate and checkpoint on the way.

        ``updates`` are the micro-batch groups to train on, by default ``self.updates``: the
        data side's iterator from the current position. Each update made moves the position
        to the one it names, so a checkpoint resumes right after it.
        """
        reason = self._limits_reached()
        if reason:
            log.info("%s: already finished (%s); raise the limit to train further", self.run_dir, reason)
            self.runlog.restore_end()
            return self.state
        self.trainlog.open_board(self.state.step, self.state.train_seconds)
        try:
            return self._train(iter(updates) if updates is not None else self.updates)
        finally:
            self.trainlog.close_board()

    def _train(self, updates: Iterator[Update]) -> TrainState:
        tc, st = self.cfg.train, self.state
        self._log_start()
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)} \
            if _main_thread() else {}
        self.trainlog.open_bar(st.step, tc.max_steps)
        window = self._new_window()
        validated_at = st.step
        updates = self.prefetched(updates)
        self.clock.start()
        try:
            while True:
                # One collective per update, of host numbers, carries both the stop decision (any
                # rank's limit or signal) and the update's target tokens over all ranks.
                reason = self._limits_reached()
                upd = next(updates) if reason is None else None
                stop, interrupt, ntokens = distributed.all_sum(self.ctx, [
                    float(reason is not None), float(self.stop_requested), float(upd.target_tokens if upd else 0)],
                    self.host_group)
                if interrupt:
                    raise _Interrupted
                if stop:
                    reason = reason or "another rank reached its limit"
                    break
                loss, nll, ntokens = self.update(upd, int(ntokens))
                st.step += 1
                st.epoch, st.batch_in_epoch = upd.next_position
                self._count_train_time(window, self.clock.lap())
                # Summed on the device; read once per log window, not once per step.
                window["loss"] = window["loss"] + loss
                window["nll"] = window["nll"] + nll
                window["tokens"] += ntokens
                window["steps"] += 1
                self.trainlog.step()
                if st.step % tc.log_every == 0:
                    self._log_window(window)
                if tc.valid_every and st.step % tc.valid_every == 0:
                    self._count_train_time(window, self.clock.stop())
                    self._validate_and_save()
                    validated_at = st.step
                    self.clock.start()
        except _Interrupted:  # between updates, on every rank at the same step: a clean state
            self.trainlog.close_bar()
            self._count_train_time(window, self.clock.stop())
            self.save(rundir.LAST_FILE, full=True)
            raise NmtError(f"interrupted at step {st.step}; {rundir.checkpoint_path(self.run_dir, 'last')} is saved: "
                           "run the same command to resume") from None
        except KeyboardInterrupt:  # a second signal, possibly mid-update: keep the last good checkpoint
            self.trainlog.close_bar()
            raise NmtError(f"stopped during step {st.step + 1}; the last checkpoint written is kept: "
                           "run the same command to resume from it") from None
        finally:
            if isinstance(updates, Prefetch):
                updates.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            self.updates = self._updates_from_position()  # an update taken but not made is taken again
        self.trainlog.close_bar()
        self._count_train_time(window, self.clock.stop())
        if window["steps"]:
            self._log_window(window)
        if validated_at != st.step:
            self._validate_and_save()
        if tc.average_last and len(st.saved_steps) > 1 and self.main:
            paths = [rundir.step_checkpoint(self.run_dir, s) for s in st.saved_steps[-tc.average_last:]]
            checkpoint.save(checkpoint.average(paths), rundir.checkpoint_path(self.run_dir, "averaged"))
        log.info("stopped at step %d: %s; best valid BLEU %.2f at step %d", st.step, reason,
                 st.best_bleu, st.best_step)
        self.runlog.write(event="end", step=st.step, reason=reason, train_seconds=round(st.train_seconds, 3),
                          valid_seconds=round(st.valid_seconds, 3), best_bleu=st.best_bleu,
                          best_step=st.best_step)
        return st

    def prefetched(self, updates: Iterator[Update]) -> Iterator[Update]:
        """``updates`` collated ahead on a thread (a ``Prefetch``, to be closed) where ``train.prefetch``
        asks for it (by default on CUDA), else ``updates`` as they are."""
        tc = self.cfg.train
        if tc.prefetch if tc.prefetch is not None else self.device.type == "cuda":
            return Prefetch(updates, self.collate)
        return updates

    def _count_train_time(self, window: dict, seconds: float) -> None:
        self.state.train_seconds += seconds
        window["seconds"] += seconds

    def _log_window(self, window: dict) -> None:
        """Write one ``train`` record; every rank calls it, for the one all-reduce it makes.

        The CPU seconds summed are those of the ranks on rank 0's machine (whose cores rank 0's
        /proc/stat describes): under torchrun they are the ranks numbered as their local rank.
        """
        st = self.state
        cpu = cpu_sample()
        own = cpu.process - window["cpu"].process if self.rank == self.ctx.local_rank else 0.0
        # Each rank summed its own losses; the tokens were counted over all ranks already.
        sums = torch.stack([window["loss"], window["nll"], torch.tensor(float(self.oom_splits), device=self.device),
                            torch.tensor(own, device=self.device)])
        loss, nll, splits, own = distributed.all_sum_tensor(self.ctx, sums).tolist()  # waits for the device
        self.oom_splits = 0
        self._count_train_time(window, self.clock.lap())  # that wait was training time
        measured = cpu.busy is not None and window["cpu"].busy is not None
        self.trainlog.train(Reading(
            step=st.step, epoch=st.epoch, loss=loss, nll=nll, tokens=window["tokens"], seconds=window["seconds"],
            lr=self.last_lr, oom_splits=int(splits), train_seconds=st.train_seconds,
            valid_seconds=st.valid_seconds, cpu_seconds=own,
            machine_busy_seconds=cpu.busy - window["cpu"].busy if measured else None,
            machine_core_seconds=cpu.total - window["cpu"].total if measured else None))
        window.update(self._new_window())

    def _new_window(self) -> dict:
        """Sums over one log window; the losses stay on the device until the window is read. ``cpu``: the
        CPU clocks when the window began (it runs to the next record, validation included)."""
        zero = torch.zeros((), device=self.device)
        return {"loss": zero, "nll": zero, "tokens": 0, "seconds": 0.0, "steps": 0, "cpu": cpu_sample()}


class _Interrupted(Exception):
    """A stop asked for by a signal, taken between two updates."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def check_shared(ctx: distributed.Context, run_dir: Path, patient) -> None:
    """Refuse, on every rank, a job some of whose ranks do not see rank 0's run directory.

    Every rank reads and writes the run directory (rank 0's tokenizer, the checkpoints to
    resume from), so on several nodes it must be on a file system they share. Rank 0 writes a
    token file there; each rank checks that it sees it, through the patient gloo group, before
    any collective of the training itself. A node whose rank cannot see it stops with one line.
    """
    if not ctx.distributed:
        return
    token_path = run_dir / ".job-token"
    token = None
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        token_path.write_text(token, encoding="utf-8")
    token = distributed.broadcast_object(ctx, token, patient)
    try:
        seen = token_path.read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    where = distributed.gather_objects(ctx, (seen, socket.gethostname()), patient)
    if ctx.main:
        token_path.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, (ok, host) in enumerate(where) if not ok]
    if blind:
        raise NmtError(f"{', '.join(blind)} cannot see {run_dir} as rank 0 writes it: every node of a job must "
                       "see one run directory (a shared file system, at the same path); give --run such a directory")


def train(cfg: Config, run_dir: Path, progress_bar: bool = True) -> TrainState:
    """Train ``cfg`` into ``run_dir``, resuming if it holds a ``last.pt``.

    Under torchrun every rank calls this; each checks the run directory the same way (so a
    refusal reaches all ranks at once) and only rank 0 writes.
    """
    ctx = distributed.setup(cfg.train.dist_timeout_minutes)
    if not ctx.main:  # one voice: the other ranks speak only to warn
        log.setLevel(logging.WARNING)
    try:
        patient = distributed.patient_group(ctx)
        check_shared(ctx, Path(run_dir), patient)
        cfg, resume = rundir.open_run(cfg, Path(run_dir), write=ctx.main)
        distributed.barrier(ctx, patient)
        trainer = Trainer(cfg, run_dir, progress_bar=progress_bar, ctx=ctx, patient=patient)
        if resume:
            trainer.resume()
        else:  # what an earlier start wrote before it saved anything is not this run's
            trainer.runlog.truncate_after(-1)
            if cfg.init_from is not None:
                trainer.start_from(cfg.init_from)
        return trainer.train()
    finally:
        distributed.teardown()
