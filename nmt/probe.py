"""The speed probe (``nmt bench``): seconds per training update of a recipe on this hardware.

A probe builds the recipe's model and optimizer with the trainer itself (``nmt.train.Trainer``,
on a scratch run directory), warms up, then times real updates made as the training loop makes
them (the trainer's ``update``, the per-update collective of host numbers, prefetch where the
recipe has it), the device waited for at both ends of each timed window. The timed updates are not
the next ones of the epoch but batches taken at even steps through its length order
(``spread_updates``): an update's cost follows its sentences' length, and a few consecutive batches
of one shuffle can all be short, or all long. Its JSON file (``FORMAT``)
records seconds per update, target tokens/s, peak memory, the hardware (``nmt.hardware``),
precision, ranks and the whole resolved recipe, from which ``nmt report --time-from`` projects a
run's training time onto this hardware (``nmt.report.projection``).

The batches are the corpus's, or with ``--synthetic`` random ids in pairs whose lengths are drawn
from the run's ``lengths.json`` (``nmt.rundir.read_lengths``), batched by the same batcher: a GPU
machine lent for a few minutes need not hold the data.

A probe measures this machine only if nothing else runs on it: other processes' share of the
cores' time (``nmt.hardware.other_load``) is measured over a short window before the probe and
over the timed updates, recorded, and above ``OTHER_LOAD_LIMIT`` the probe is refused unless forced.
"""

from __future__ import annotations

import itertools
import json
import logging
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from nmt import config, distributed, rundir
from nmt.batching import BatchOrder, EpochBatches, Prefetch, Update
from nmt.config import Config
from nmt.corpus import PreparedCorpus
from nmt.errors import NmtError
from nmt.files import write_text_atomic
from nmt.hardware import OTHER_LOAD_LIMIT, CpuSample, cpu_sample, hardware, other_load
from nmt.tokenizer import EOS
from nmt.train import Trainer

log = logging.getLogger("nmt")

FORMAT = 1  # the version of the probe file's layout; a reader refuses any other
WARMUP = 3  # updates before the clock starts: kernels chosen, Adam's state made, caches warm
WINDOWS = 5  # the timed updates are split into this many windows; seconds per update is their median
LOAD_WINDOW_S = 2.0  # seconds over which the load before the probe is measured
TIMED = "updates at even steps through the first epoch's batches in length order"  # files before it: "timed" absent
SYNTHETIC_PAIRS = 100_000  # pairs drawn from a length histogram: enough for the batcher's buckets to look real


# --- other processes' load ---------------------------------------------------------------------

def measure_load(seconds: float = LOAD_WINDOW_S) -> float | None:
    """The share of this process's cores' time other processes took over the next ``seconds``;
    None where the machine has no /proc/stat."""
    before = cpu_sample()
    time.sleep(seconds)
    return other_load(before, cpu_sample())


def check_load(force: bool) -> float | None:
    """The load before a probe (``measure_load``); refused with one line above ``OTHER_LOAD_LIMIT``
    unless ``force``."""
    load = measure_load()
    if load is None:
        log.warning("no /proc/stat here: other processes' load is not measured; the probe assumes an idle machine")
    elif load > OTHER_LOAD_LIMIT and not force:
        raise NmtError(f"other processes took {load:.0%} of this machine's cores over {LOAD_WINDOW_S:g} s (limit "
                       f"{OTHER_LOAD_LIMIT:.0%}), so the probe would not measure this hardware: run it when the "
                       "machine is idle, or pass --force to record it anyway")
    return load


# --- what to probe -------------------------------------------------------------------------------

def resolve(recipe: Path, overrides: list[str], run: Path | None = None) -> tuple[Config, Path | None]:
    """(config, run directory) of ``nmt bench RECIPE``: a run directory's own recipe, or a recipe file
    whose run is ``run`` (default ``runs/<name>``, where ``nmt train`` puts it). The run's
    ``spm.model``, where there is one, is the tokenizer (no SentencePiece training)."""
    if recipe.is_dir():
        rundir.require_run(recipe, hint="give a recipe file or a directory nmt train wrote")
        cfg, run = config.load_recipe(recipe / rundir.CONFIG_FILE, overrides), recipe
    else:
        cfg = config.load_recipe(recipe, overrides)
        run = run or Path("runs") / cfg.name
    if (run / rundir.MODEL_FILE).is_file():
        cfg.tokenizer.reuse = str(run / rundir.MODEL_FILE)
    return cfg, run if run.is_dir() else None


def default_out(cfg: Config) -> Path:
    return Path(f"probe-{cfg.name}.json")


def synthetic_lengths(cfg: Config, run: Path | None) -> dict:
    """The length histogram ``--synthetic`` draws from: ``run``'s ``lengths.json``, checked against ``cfg``
    (``path``: where it came from)."""
    if run is None:
        raise NmtError(f"--synthetic draws batches from a run's {rundir.LENGTHS_FILE}, and there is no run "
                       f"runs/{cfg.name}: give a run directory as RECIPE, or --run RUN")
    lengths = {**rundir.read_lengths(run), "path": str(run / rundir.LENGTHS_FILE)}
    for key, mine, theirs in (("data.max_len", cfg.data.max_len, lengths.get("max_len")),
                              ("tokenizer.vocab_size", cfg.tokenizer.vocab_size, lengths["vocab_size"])):
        if mine != theirs:
            raise NmtError(f"{run / rundir.LENGTHS_FILE} holds pairs of a run with {key}={theirs}, the recipe says "
                           f"{mine}: probe with that run's recipe (or --set {key}={theirs})")
    return lengths


class Vocabulary:
    """What a trainer on synthetic batches needs of a tokenizer: its size."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def synthetic_corpus(lengths: dict, seed: int, pairs: int = SYNTHETIC_PAIRS) -> PreparedCorpus:
    """Pairs of random ids (no special ids) whose lengths are drawn from ``lengths`` (``rundir.read_lengths``),
    as many as the corpus had but at most ``pairs``, in the prepared corpus's layout, held in memory: the
    batcher cuts and collates them as it would the corpus."""
    counts = np.asarray(lengths["counts"], dtype=np.int64)  # (bins, 3): source ids, target ids, pairs
    rng = np.random.default_rng(seed)
    n = int(min(pairs, counts[:, 2].sum()))
    drawn = counts[rng.choice(len(counts), size=n, p=counts[:, 2] / counts[:, 2].sum())]  # (n, 3)
    arrays = {"lines": np.arange(n, dtype=np.int64)}
    for side, lens in (("src", drawn[:, 0]), ("tgt", drawn[:, 1])):
        arrays[f"{side}.tokens"] = rng.integers(EOS + 1, lengths["vocab_size"], int(lens.sum()), dtype=np.int32)
        arrays[f"{side}.offsets"] = np.concatenate([[0], np.cumsum(lens)])
        arrays[f"{side}.lengths"] = lens.astype(np.uint32)
    return PreparedCorpus(Path("<synthetic>"), {"pairs": n}, arrays)


class SyntheticTrainer(Trainer):
    """A Trainer whose training batches are drawn from a length histogram instead of read from a corpus:
    the data phase alone differs; model, optimizer, precision, ranks and ``update`` are the trainer's."""

    def __init__(self, lengths: dict, *args, **kwargs):
        self.lengths = lengths
        super().__init__(*args, **kwargs)

    def _setup_data(self) -> None:
        tc = self.cfg.train
        self.tokenizer = Vocabulary(int(self.lengths["vocab_size"]))
        self.train_data = synthetic_corpus(self.lengths, tc.seed)
        self.corpora_record = []
        self.batches = EpochBatches(self.train_data, tc.max_tokens, tc.seed, self.rank, self.world_size)
        self.updates = self.batches.updates(tc.update_freq)


# --- the measurement -----------------------------------------------------------------------------

def timed_updates(trainer: Trainer, updates: Iterator[Update], count: int) -> tuple[float, int]:
    """Wall seconds and target tokens (over all ranks) of ``count`` updates made as the training loop
    makes them; the device's queued work is waited for before the clock starts and before it stops."""
    distributed.synchronize(trainer.device)
    start = time.perf_counter()
    tokens = 0
    for _ in range(count):
        upd = next(updates)
        # The one collective of host numbers every training update makes (stop decision and tokens).
        _, _, total = distributed.all_sum(trainer.ctx, [0.0, 0.0, float(upd.target_tokens)], trainer.host_group)
        _, _, n = trainer.update(upd, int(total))
        tokens += n
    distributed.synchronize(trainer.device)
    return time.perf_counter() - start, tokens


def spread_updates(batches: EpochBatches, update_freq: int, count: int, windows: int) -> list[Update]:
    """``count`` updates of ``update_freq`` micro-batches of this rank's first epoch, taken at even steps
    through its batches in length order and dealt round-robin to ``windows`` consecutive windows (as
    ``_windows`` sizes them): the timed updates hold the epoch's mix of short and long sentences, and
    so does each window. Update ``j``'s micro-batches lie ``count`` steps apart in that order."""
    order = batches.epoch(1)
    by_length = np.sort(order.order)  # batch numbers grow with the length of their pairs
    wanted = count * update_freq
    picks = by_length[((np.arange(wanted) + 0.5) * len(by_length) / wanted).astype(np.int64)]
    groups = [BatchOrder(order.pairs, order.starts, picks[j::count]) for j in range(count)]
    dealt = [j for w in range(windows) for j in range(w, count, windows)]
    return [Update(groups[j], batches.target_tokens(groups[j]), 1, (1, 0)) for j in dealt]


def _windows(steps: int) -> list[int]:
    """``steps`` updates split into at most WINDOWS windows, as evenly as they go."""
    k = min(WINDOWS, steps)
    return [steps // k + (i < steps % k) for i in range(k)]


def measure(trainer: Trainer, steps: int, warmup: int) -> tuple[list[tuple[int, float, int]], CpuSample, CpuSample]:
    """(updates, seconds, target tokens) of each timed window after ``warmup`` updates, and the CPU clocks
    (``nmt.hardware.cpu_sample``) when the timed windows began and ended."""
    sizes = _windows(steps)
    spread = spread_updates(trainer.batches, trainer.cfg.train.update_freq, steps, len(sizes))
    updates = trainer.prefetched(itertools.chain(itertools.islice(trainer.updates, warmup), spread))
    try:
        timed_updates(trainer, updates, warmup)
        before = cpu_sample()
        windows = [(n, *timed_updates(trainer, updates, n)) for n in sizes]
        return windows, before, cpu_sample()
    finally:
        if isinstance(updates, Prefetch):
            updates.close()


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_probe(cfg: Config, out: Path, steps: int = 20, warmup: int = WARMUP, lengths: dict | None = None,
              load_before: float | None = None, force: bool = False, source: str = "") -> dict | None:
    """Probe ``cfg`` on this hardware and write the result to ``out``; returns it (on rank 0; None on the others).

    ``lengths``: draw synthetic batches from this length histogram (``synthetic_lengths``; its ``path``
    says where it came from) instead of reading the corpus. ``load_before``: the load measured before
    (``check_load``), recorded. Under torchrun every rank calls this. Refused with one line, after
    the timed updates, when other processes took more than ``OTHER_LOAD_LIMIT`` of the cores during
    them, unless ``force``.
    """
    if steps < 1 or warmup < 0:
        raise NmtError(f"--steps {steps}, --warmup {warmup}: time at least 1 update, after 0 or more warm-up ones")
    ctx = distributed.setup(cfg.train.dist_timeout_minutes)
    scratch = None
    try:
        patient = distributed.patient_group(ctx)
        scratch = distributed.broadcast_object(ctx, tempfile.mkdtemp(prefix="nmt-bench-") if ctx.main else None,
                                               patient)
        setup = {"progress_bar": False, "ctx": ctx, "patient": patient}
        trainer = SyntheticTrainer(lengths, cfg, Path(scratch), **setup) if lengths is not None \
            else Trainer(cfg, Path(scratch), **setup)
        windows, before, after = measure(trainer, steps, warmup)
        # The CPU time of the ranks on rank 0's machine, whose cores rank 0's sample describes.
        own, = distributed.all_sum(ctx, [after.process - before.process if ctx.rank == ctx.local_rank else 0.0],
                                   patient)
        peak = max(distributed.gather_objects(ctx, _peak_memory_mib(trainer.device), patient))
        distributed.barrier(ctx, patient)
        if not ctx.main:
            return None
        during = other_load(before, after, own)
        if during is not None and during > OTHER_LOAD_LIMIT and not force:
            raise NmtError(f"other processes took {during:.0%} of this machine's cores during the probe (limit "
                           f"{OTHER_LOAD_LIMIT:.0%}), so its figures are not this hardware's and {out} is not "
                           "written: run it when the machine is idle, or pass --force to record it anyway")
        batches = f"synthetic ids, lengths drawn from {lengths.get('path', 'a histogram')}" if lengths is not None \
            else "the corpus"
        record = _record(cfg, trainer, windows, peak, source, batches,
                         {"before": load_before, "during": during, "limit": OTHER_LOAD_LIMIT,
                          "window_s": LOAD_WINDOW_S, "forced": force}, warmup)
        write_probe(out, record)
        return record
    finally:
        if ctx.main and scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        distributed.teardown()


def _record(cfg: Config, trainer: Trainer, windows: list[tuple[int, float, int]], peak: float, source: str,
            batches: str, load: dict, warmup: int) -> dict:
    """The probe file's contents (``FORMAT``)."""
    tc, device = cfg.train, trainer.device
    updates = sum(n for n, _, _ in windows)
    seconds = sum(s for _, s, _ in windows)
    return {
        "format": FORMAT,
        "what": "nmt bench: seconds per training update of a recipe on this hardware",
        "recipe": cfg.name, "source": source,
        "seconds_per_update": statistics.median(s / n for n, s, _ in windows),
        "seconds_per_update_mean": seconds / updates,
        "window_seconds_per_update": [round(s / n, 6) for n, s, _ in windows],
        "updates": updates, "warmup": warmup,
        "target_tokens_per_s": sum(t for _, _, t in windows) / seconds,
        "peak_memory_mib": round(peak, 1),
        "memory": "largest CUDA allocation (max_memory_allocated)" if device.type == "cuda"
                  else "peak resident set of the largest rank (ru_maxrss)",
        "device": device.type, **hardware(device),
        "precision": tc.precision, "tf32": trainer.tf32, "ranks": trainer.world_size,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "effective_batch_tokens": trainer.world_size * tc.max_tokens * tc.update_freq,
        "batches": batches, "timed": TIMED, "load": load,
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": config.to_dict(cfg),
    }


# --- the probe file --------------------------------------------------------------------------------

def write_probe(path: Path, record: dict) -> None:
    """Write a probe file atomically (temp file, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")


def read_probe(path: Path) -> dict:
    """A probe file ``nmt bench`` wrote; one line naming what to do if it is not one, or of another format."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NmtError(f"{path}: no such probe file; write one with nmt bench RECIPE --out {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NmtError(f"{path}: not a probe file ({type(e).__name__}); write one with nmt bench RECIPE") from None
    if not isinstance(record, dict) or "format" not in record:
        raise NmtError(f"{path}: not a probe file written by nmt bench (no 'format'); write one with nmt bench RECIPE")
    if record["format"] != FORMAT:
        raise NmtError(f"{path}: probe format {record['format']!r}, and this nmt reads format {FORMAT}: probe that "
                       "machine again with this nmt (nmt bench RECIPE)")
    missing = [k for k in ("seconds_per_update", "config", "effective_batch_tokens", "precision", "ranks")
               if k not in record]
    if missing or not record["seconds_per_update"] > 0:
        raise NmtError(f"{path}: a damaged probe file (no {', '.join(missing) or 'positive seconds_per_update'}); "
                       "probe again with nmt bench RECIPE")
    return record


def machine_label(record: dict) -> str:
    """The hardware and settings a probe measured, in one phrase: "NVIDIA H200, bf16, 1 rank"."""
    where = record.get("gpu") or f"{record.get('cpu', '?')} [{record.get('cpu_kind', '?')}]"
    ranks = record["ranks"]
    return f"{where}, {record['precision']}, {ranks} rank{'s' if ranks != 1 else ''}"


# What a probe must share with a run for the run's updates to be timed by it, beyond every model key.
SHAPE_KEYS = ("tokenizer.vocab_size", "data.dir", "data.src_lang", "data.tgt_lang", "data.train", "data.max_len")
BATCH_KEY = "tokens per update (ranks x train.max_tokens x train.update_freq)"


def _normal(raw: dict) -> dict:
    """A recipe dict with every key (defaults filled in), where this nmt can read it."""
    try:
        return config.to_dict(config.from_dict(raw))
    except NmtError:
        return raw


def shape_differences(probe: dict, run_cfg: dict, run_batch: int | None) -> list[tuple[str, object, object]]:
    """(key, the probe's value, the run's) of everything a probe must share with a run to time its updates:
    every model key (the kind first: it explains the others), the vocabulary, the training data and its
    length filter, and the tokens per update (how ranks, ``max_tokens`` and ``update_freq`` split them,
    and the precision, may differ). The recipe's name may differ."""
    mine, theirs = _normal(probe["config"]), _normal(run_cfg)

    def value(cfg: dict, key: str):
        section, name = key.split(".")
        return (cfg.get(section) or {}).get(name)

    if value(mine, "model.kind") != value(theirs, "model.kind"):
        return [("model.kind", value(mine, "model.kind"), value(theirs, "model.kind"))]
    keys = [f"model.{k}" for k in sorted((mine.get("model") or {}).keys() | (theirs.get("model") or {}).keys())]
    found = [(k, value(mine, k), value(theirs, k)) for k in [*keys, *SHAPE_KEYS] if value(mine, k) != value(theirs, k)]
    if run_batch is not None and probe["effective_batch_tokens"] != run_batch:
        found.append((BATCH_KEY, probe["effective_batch_tokens"], run_batch))
    return found


def describe(record: dict, out: Path) -> str:
    """A probe's result in one line, for the terminal."""
    load = record["load"]
    loads = ", ".join(f"{'–' if load[k] is None else format(load[k], '.0%')} {k}" for k in ("before", "during"))
    timed = "spread over an epoch's lengths" if record.get("timed") else "in epoch order"
    return (f"{record['recipe']} on {machine_label(record)}: {record['seconds_per_update']:.4g} s/update (median of "
            f"{len(record['window_seconds_per_update'])} windows, {record['updates']} updates {timed} after "
            f"{record['warmup']} warm-up), {record['target_tokens_per_s']:,.0f} target tokens/s, peak "
            f"{record['peak_memory_mib']:,.0f} MiB; batches from {record['batches']}; other processes' load "
            f"{loads}{' (forced)' if load['forced'] else ''} -> {out}")
