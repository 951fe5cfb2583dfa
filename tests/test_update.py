"""One update as a GPU needs it, checked on the CPU: the schedule, fp16 loss scaling, no waits for
the device inside an update, batches collated ahead, and DDP's gradient buckets overlapping the
backward pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import LstmCalls, small_recipe
from torch.utils._python_dispatch import TorchDispatchMode

from nmt import checkpoint, config, distributed
from nmt.batching import Prefetch
from nmt.models import build_model
from nmt.models import gnmt as gnmt_module
from nmt.train import Trainer, inverse_sqrt, is_out_of_memory, optimizer_step, train


def logged(run: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["event"] == "train"}


# --- the learning rate schedule

def test_update_k_uses_its_own_rate_and_the_log_says_so(tmp_path: Path, corpus: Path, trained_run: Path) -> None:
    lr, warmup = 1e-3, 4
    factor = inverse_sqrt(warmup)
    assert [factor(k - 1) for k in range(1, 7)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, math.sqrt(4 / 5), math.sqrt(4 / 6)])  # the peak at update `warmup`
    cfg = small_recipe(corpus, trained_run / "spm.model", lr=lr, warmup_steps=warmup)
    train(cfg, tmp_path / "run", progress_bar=False)
    rates = logged(tmp_path / "run", "lr")
    assert [rates[k] for k in range(1, 7)] == pytest.approx([lr * factor(k - 1) for k in range(1, 7)])


def test_a_run_started_under_the_old_schedule_resumes_under_it(tmp_path: Path, corpus: Path, trained_run: Path,
                                                               monkeypatch) -> None:
    import nmt.train as training

    lr, run = 1e-3, tmp_path / "run"
    with monkeypatch.context() as old_nmt:  # a run started by an nmt from before the schedule had versions
        old_nmt.setattr(training, "SCHEDULE_VERSION", 1)
        train(small_recipe(corpus, trained_run / "spm.model", lr=lr, warmup_steps=4, max_steps=3), run,
              progress_bar=False)
    state = checkpoint.load(run / "last.pt")
    del state["schedule"]  # which that nmt did not record
    checkpoint.save(state, run / "last.pt")
    train(small_recipe(corpus, trained_run / "spm.model", lr=lr, warmup_steps=4, max_steps=6), run, progress_bar=False)
    old = inverse_sqrt(4, version=1)  # update k used the factor of k - 1: 1/4, 1/4, 2/4, 3/4, 1, ...
    assert [logged(run, "lr")[k] for k in range(1, 7)] == pytest.approx([lr * old(k - 1) for k in range(1, 7)])
    assert checkpoint.load(run / "last.pt")["schedule"] == 1


# --- fp16 loss scaling: a skipped step does not move the schedule

def test_a_step_the_loss_scaler_skips_leaves_the_schedule_where_it_was() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt(10))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")  # an overflow in the backward pass
    assert not optimizer_step(optimizer, scheduler, scaler, params, clip_norm=1.0)
    assert scheduler.last_epoch == 0 and scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    optimizer.zero_grad()
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    assert optimizer_step(optimizer, scheduler, scaler, params, clip_norm=1.0)
    assert scheduler.last_epoch == 1 and not torch.equal(params[0], before[0])


def test_fp16_loss_scale_accounts_for_the_loss_divided_by_the_tokens(tmp_path: Path, corpus: Path,
                                                                      trained_run: Path, monkeypatch) -> None:
    made = {}
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, **kw: made.update(kw) or scaler(device, **kw))
    Trainer(small_recipe(corpus, trained_run / "spm.model", update_freq=2), tmp_path / "run", progress_bar=False)
    assert made["init_scale"] == 2.0 ** (16 + 10) and not made["enabled"]  # 2 x 600 tokens: 2^10 of them


def test_cudnn_and_cublas_workspace_failures_are_out_of_memory() -> None:
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("CUDNN_STATUS_BAD_PARAM"))


# --- no waits for the device inside an update

class HostReads(TorchDispatchMode):
    """Counts what makes a GPU's host wait: reads of tensor values, and shapes that depend on them."""

    OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item"}

    def __init__(self, allowed: set[int]):
        super().__init__()
        self.found: list[str] = []
        self.allowed = allowed  # data_ptrs of host-side counters that are read by design (Adam's steps)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in self.OPS and not (first is not None and first.data_ptr() in self.allowed):
            self.found.append(name)
        indices = args[1] if name.startswith("aten::index") and len(args) > 1 else ()
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in
               (indices if isinstance(indices, list | tuple) else ())):
            self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_reads(monkeypatch):
    """The reads a block makes, wrappers of Tensor.tolist/item/cpu/numpy included (which a dispatch
    mode may not see on CPU tensors)."""
    def counting(allowed: set[int]):
        mode = HostReads(allowed)
        for name in ("tolist", "item", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)

            def wrapper(self, *a, _name=name, _original=original, **kw):
                if self.data_ptr() not in mode.allowed:
                    mode.found.append(f"Tensor.{_name}")
                return _original(self, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, wrapper)
        return mode
    return counting


@pytest.mark.parametrize("kind", ["transformer", "gnmt"])
def test_updates_between_log_records_never_wait_for_the_device(tmp_path: Path, corpus: Path, trained_run: Path,
                                                               kind: str, count_reads) -> None:
    trainer = Trainer(small_recipe(corpus, trained_run / "spm.model", kind, update_freq=2, log_every=100),
                      tmp_path / "run", progress_bar=False)
    trainer.update(next(trainer.updates))  # Adam's state exists from here on
    steps = {s["step"].data_ptr() for s in trainer.optimizer.state.values()}
    updates = [next(trainer.updates) for _ in range(3)]
    mode = count_reads(steps)
    with mode:
        for upd in updates:
            trainer.update(upd)
    assert mode.found == []


# --- batches collated ahead on a thread

def test_prefetch_changes_no_update_and_resumes_mid_epoch_to_the_same_parameters(tmp_path: Path, corpus: Path,
                                                                                 trained_run: Path) -> None:
    spm = trained_run / "spm.model"
    per_epoch = len(Trainer(small_recipe(corpus, spm), tmp_path / "count", progress_bar=False).batches.epoch(1))
    middle = per_epoch + per_epoch // 2  # a stop half way through the second epoch
    runs = {}
    for prefetch in (False, True):
        run = tmp_path / f"prefetch-{prefetch}"
        train(small_recipe(corpus, spm, max_steps=middle, prefetch=prefetch, log_every=50), run, progress_bar=False)
        train(small_recipe(corpus, spm, max_steps=middle + 5, prefetch=prefetch, log_every=50), run, progress_bar=False)
        runs[prefetch] = checkpoint.load(run / "last.pt")
    straight = tmp_path / "straight"
    train(small_recipe(corpus, spm, max_steps=middle + 5, log_every=50), straight, progress_bar=False)
    expected = checkpoint.load(straight / "last.pt")
    for state in runs.values():
        position = ("step", "epoch", "batch_in_epoch")
        assert [state["progress"][k] for k in position] == [expected["progress"][k] for k in position]
        assert state["progress"]["epoch"] == 2 and state["step"] == middle + 5
        for name, value in expected["model"].items():
            assert torch.equal(state["model"][name], value), name


def test_prefetch_hands_on_an_error_of_the_data_side_and_stops_its_thread() -> None:
    def broken():
        yield from ()
        raise ValueError("epoch 1 has no batch")

    ahead = Prefetch(broken(), collate=lambda idx: idx)
    with pytest.raises(ValueError, match="no batch"):
        next(ahead)
    ahead.close()
    assert not ahead._thread.is_alive()
    assert list(Prefetch(iter([]), collate=lambda idx: idx)) == []  # a finite iterator ends as it would


# --- GNMT's LSTMs under mixed precision

@pytest.mark.parametrize("lstm_dtype", [torch.float32, torch.bfloat16])
def test_lstms_outside_autocast_run_in_their_own_dtype(lstm_dtype: torch.dtype, monkeypatch) -> None:
    model = build_model(config.GNMTConfig(embed_dim=16, hidden=24), 40)
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    lens, tgt = torch.tensor([4, 3]), torch.tensor([[2, 5, 6], [2, 7, 0]])
    # The CPU's rule: under bf16 autocast the LSTMs run in bf16 (oneDNN), as before.
    with torch.autocast("cpu", dtype=torch.bfloat16), LstmCalls() as watch:
        model.features(src, lens, tgt)
    assert watch.dtypes() == {(torch.bfloat16, frozenset({torch.bfloat16}))}
    # CUDA's rule (cuDNN's RNN autocast would cast to fp16), tried on the CPU: outside autocast, in lstm_dtype.
    monkeypatch.setattr(gnmt_module, "outside_autocast", lambda device_type: True)
    model.lstm_dtype = lstm_dtype
    with torch.autocast("cpu", dtype=torch.bfloat16), LstmCalls() as watch:
        model.features(src, lens, tgt).float().sum().backward()
    assert watch.dtypes() == {(lstm_dtype, frozenset({lstm_dtype}))}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.decoder_first.parameters())


# --- DistributedDataParallel: buckets travel during the backward pass

def test_the_first_bucket_is_sent_before_the_last_gradient_is_ready(tmp_path: Path, monkeypatch) -> None:
    from nmt.train import BatchLoss

    events: list[str] = []
    sum_hook = distributed.HOOKS["none"]
    monkeypatch.setitem(distributed.HOOKS, "none", lambda group, bucket: events.append("bucket")
                        or sum_hook(group, bucket))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = build_model(config.TransformerConfig(d_model=64, heads=4, ffn=128, encoder_layers=2,
                                                     decoder_layers=2, max_positions=32), 50)
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: events.append(f"grad {name}"))
        batch_loss = BatchLoss(model, 0.1, torch.autocast("cpu", enabled=False), 64)
        ddp = distributed.wrap(distributed.Context(), batch_loss, bucket_cap_mb=0.05)  # 50 kB: several buckets
        src, tgt_in = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]]), torch.tensor([[2, 5, 6], [2, 7, 0]])
        targets = torch.tensor([[5, 6, 3], [7, 3, 0]]).reshape(-1)
        rows = (targets != 0).nonzero().squeeze(1)
        for _ in range(2):  # DDP fixes its buckets in the first backward pass, in the order gradients came
            events.clear()
            model.zero_grad(set_to_none=True)
            loss, _ = ddp(src, torch.tensor([4, 3]), tgt_in, rows, targets[rows])
            loss.backward()
        assert events.count("bucket") >= 3
        last_gradient = max(i for i, e in enumerate(events) if e.startswith("grad"))
        assert events.index("bucket") < last_gradient  # communication overlaps the backward pass
    finally:
        dist.destroy_process_group()


# --- launching

def test_more_processes_than_visible_gpus_is_one_line_naming_both(monkeypatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from nmt.errors import NmtError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    distributed.check_gpus(4, "--nproc 4")  # one per GPU: fine
    with pytest.raises(NmtError, match=r"^--nproc 8, but this node has 4 visible GPU\(s\): one process per GPU"):
        distributed.check_gpus(8, "--nproc 8")
    result = CliRunner().invoke(app, ["train", "recipe.yaml", "--nproc", "8"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "nmt: error: --nproc 8, but this node has 4 visible GPU(s): one process per GPU (--nproc 4 or less; "
        "CUDA_VISIBLE_DEVICES chooses which)"]


def test_tf32_on_the_cpu_is_ignored_with_one_line(tmp_path: Path, corpus: Path, trained_run: Path, nmt_log) -> None:
    trainer = Trainer(small_recipe(corpus, trained_run / "spm.model", tf32=True), tmp_path / "run", progress_bar=False)
    assert not trainer.tf32
    assert [r.getMessage() for r in nmt_log.records if "tf32" in r.getMessage()] == [
        "train.tf32 applies to CUDA GPUs; ignored on the CPU"]


@pytest.mark.parametrize("compression", ["none", "bf16"])
def test_ddp_gradients_are_the_plain_ones_and_bf16_compression_rounds_them(tmp_path: Path, compression: str) -> None:
    from nmt.train import BatchLoss

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        cfg = config.TransformerConfig(d_model=32, heads=4, ffn=64, encoder_layers=1, decoder_layers=1,
                                       max_positions=16, dropout=0.0)  # the same forward pass both times
        plain = build_model(cfg, 30)
        wrapped = build_model(cfg, 30)
        wrapped.load_state_dict(plain.state_dict())
        src, tgt_in = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]]), torch.tensor([[2, 5, 6], [2, 7, 0]])
        targets = torch.tensor([[5, 6, 3], [7, 3, 0]]).reshape(-1)
        rows = (targets != 0).nonzero().squeeze(1)
        args = (src, torch.tensor([4, 3]), tgt_in, rows, targets[rows])
        off = torch.autocast("cpu", enabled=False)
        BatchLoss(plain, 0.1, off, 8)(*args)[0].backward()
        ddp = distributed.wrap(distributed.Context(), BatchLoss(wrapped, 0.1, off, 8), compression=compression)
        ddp(*args)[0].backward()
        for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
            expected = a.grad.bfloat16().float() if compression == "bf16" else a.grad  # one rank: the sum is itself
            assert torch.equal(b.grad, expected), name
    finally:
        dist.destroy_process_group()
