"""The run directory: every file ``nmt train`` and the commands after it write there, opening one
to train (new, resumed or fine-tuned) and loading one to translate.

    RUN/
      config.yaml            the resolved recipe (CONFIG_FILE); a resume checks the recipe against it
      spm.model              the SentencePiece model (MODEL_FILE), trained, copied or reused
      log.jsonl              one JSON record per line (LOG_FILE); its records: ``nmt.runlog``
      lengths.json           how long the training pairs are (LENGTHS_FILE, written by nmt train where
                             it is missing): ``read_lengths``; what ``nmt bench --synthetic`` draws
                             batches from where the corpus is not at hand
      last.pt                the full training state, for resuming (model, optimizer, schedule,
                             position in the batch order, every rank's RNG); ``nmt.checkpoint``
      best.pt                the weights with the best valid BLEU so far
      checkpoints/stepN.pt   the weights at the last ``train.keep_last`` validations (STEP_DIR)
      averaged.pt            the mean of the last ``train.average_last`` step checkpoints, or of
                             those ``nmt average`` names
      eval/                  ``nmt eval --model`` results (EVAL_DIR): SRC.CKPT.beamK[.int8][.exact][+RUN...]
                             ``.json`` (scores, signature, files and checkpoint by sha256, speed)
                             and ``.hyp`` (the translations scored, for the significance test)
      search.yaml            search settings chosen after training (``nmt eval --sweep --save``),
                             applied over the recipe's whenever the run is loaded (SEARCH_FILE)
      tb/                    TensorBoard events against the step, and ``tb/train_seconds`` against
                             the training clock (``train.tensorboard``)

A fine-tuned run (``init_from``) starts from another run's weights and its ``spm.model``,
with a fresh step count, schedule and best score; it must keep the parent's model shape.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nmt import checkpoint, config, runlog
from nmt.config import Config
from nmt.errors import NmtError
from nmt.files import sha256, write_text_atomic
from nmt.tokenizer import MODEL_FILE, Tokenizer

log = logging.getLogger("nmt")

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
LENGTHS_FILE = "lengths.json"
LENGTHS_FORMAT = 1  # the version of lengths.json's layout
EVAL_DIR = "eval"
STEP_DIR = "checkpoints"
SEARCH_FILE = "search.yaml"
BOARD_DIR = "tb"
NAMED_CHECKPOINTS = ("best", "last", "averaged")  # RUN/<name>.pt
BEST_FILE, LAST_FILE, AVERAGED_FILE = (f"{name}.pt" for name in NAMED_CHECKPOINTS)


# --- the layout ---------------------------------------------------------------------------

def checkpoint_path(run_dir: Path, which: str = "best") -> Path:
    """``best``, ``last``, ``averaged`` (files of the run) or a path to a checkpoint file."""
    if which in NAMED_CHECKPOINTS:
        return Path(run_dir) / f"{which}.pt"
    return Path(which)


def step_checkpoint_name(step: int) -> str:
    """The step checkpoint's path inside the run directory."""
    return f"{STEP_DIR}/step{step}.pt"


def step_checkpoint(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / step_checkpoint_name(step)


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's step checkpoints, oldest step first."""
    found = [p for p in (Path(run_dir) / STEP_DIR).glob("step*.pt") if p.stem[4:].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[4:]))


def prune_step_checkpoints(run_dir: Path, keep: list[int]) -> None:
    """Delete the step checkpoints of every step not in ``keep``."""
    kept = {step_checkpoint(run_dir, s).name for s in keep}
    for path in step_checkpoints(run_dir):
        if path.name not in kept:
            path.unlink()


def require_run(run_dir: Path, where: str | None = None, hint: str = "give the directory nmt train wrote to") -> None:
    """Refuse a directory that is not a run nmt train wrote, or whose tokenizer is missing."""
    where = where or str(run_dir)
    if not (Path(run_dir) / CONFIG_FILE).is_file():
        raise NmtError(f"{where}: not a run directory (no {CONFIG_FILE}); {hint}")
    if not (Path(run_dir) / MODEL_FILE).is_file():
        raise NmtError(f"{where}: has no {MODEL_FILE}; the run did not get past tokenizer training")


# --- the lengths of the training pairs ------------------------------------------------------

def write_lengths(run_dir: Path, counts: list[list[int]], vocab_size: int, max_len: int) -> None:
    """Write ``lengths.json``: the joint histogram of the training pairs' lengths (``counts``: [source
    ids, target ids, pairs], without EOS/BOS, as ``nmt.batching.length_histogram`` gives it), with the
    vocabulary size and the length filter, atomically."""
    path = Path(run_dir) / LENGTHS_FILE
    record = {"format": LENGTHS_FORMAT, "vocab_size": vocab_size, "max_len": max_len,
              "pairs": sum(c[2] for c in counts), "counts": counts}
    write_text_atomic(path, json.dumps(record, separators=(",", ":")) + "\n")


def read_lengths(run_dir: Path) -> dict:
    """A run's ``lengths.json`` (``write_lengths``); one line naming what to do where it is missing or unreadable."""
    path = Path(run_dir) / LENGTHS_FILE
    if not path.is_file():
        raise NmtError(f"{path}: missing (the run was trained by an nmt that did not write it, or is not a run); "
                       "run nmt train RUN once where its corpus is: it writes the file (a finished run then stops)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ok = record.get("format") == LENGTHS_FORMAT and record["counts"] and int(record["vocab_size"]) > 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise NmtError(f"{path}: not a lengths file of format {LENGTHS_FORMAT}; delete it and run nmt train RUN "
                       "once where its corpus is, to write it again")
    return record


# --- search settings chosen after training --------------------------------------------------

_FIX_SEARCH_FILE = "fix it, or delete it to decode with the search settings of the training recipe"


def read_search_file(run_dir: Path) -> dict[str, Any]:
    """The keys and values of ``run_dir/search.yaml``, or {} if there is none."""
    import yaml

    path = Path(run_dir) / SEARCH_FILE
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NmtError(f"{path}: not valid YAML ({reason}); {_FIX_SEARCH_FILE}") from None
    if not isinstance(values, dict | None):
        raise NmtError(f"{path}: expected search keys and values (e.g. 'length_penalty: 1.0'), "
                       f"got {values!r}; {_FIX_SEARCH_FILE}")
    return values or {}


def apply_search_file(cfg: Config, run_dir: Path) -> Config:
    """``cfg`` with the search settings of ``run_dir/search.yaml`` over its own."""
    values = read_search_file(run_dir)
    if not values:
        return cfg
    try:
        return config.with_search(cfg, values)
    except NmtError as e:
        raise NmtError(f"{Path(run_dir) / SEARCH_FILE}: {e}; {_FIX_SEARCH_FILE}") from None


# --- loading a run to translate ---------------------------------------------------------------

def load_run(run_dir: Path, which: str = "best", device: str | torch.device = "cpu",
             int8: bool | None = None):
    """(config, tokenizer, model in eval mode) of a run directory.

    ``run_dir/search.yaml``, when there is one, overrides the checkpoint's search settings.

    ``int8``: decode with an int8 copy of the model (CPU only); None follows the config's
    ``search.int8`` where it can run, on the CPU. The returned ``cfg.search.int8`` says which.
    """
    from nmt.models import MODELS, build_model

    run_dir = Path(run_dir)
    require_run(run_dir)
    tokenizer = Tokenizer(run_dir / MODEL_FILE)
    path = checkpoint_path(run_dir, which)
    state = checkpoint.load(path, tokenizer.sha256())
    cfg = config.from_dict(state["config"])
    cfg = apply_search_file(cfg, run_dir)
    if state.get("model_kind") not in MODELS or state["model_kind"] != cfg.model.kind:
        raise NmtError(f"{path}: unknown model kind {state.get('model_kind')!r}; "
                       f"this nmt knows {', '.join(MODELS)}")
    model = build_model(cfg.model, len(tokenizer))
    checkpoint.load_weights(state, path, model)
    if int8 is None:
        int8 = cfg.search.int8 and torch.device(device).type == "cpu"
    cfg.search.int8 = int8
    if int8:
        from nmt.quantize import quantize_int8

        model = quantize_int8(model, device)
    return cfg, tokenizer, model.to(device).eval()


# --- opening a run to train -------------------------------------------------------------------

def open_run(cfg: Config, run_dir: Path, write: bool = True) -> tuple[Config, bool]:
    """Create or reopen a run directory; returns the config to use and whether to resume.

    A new run with ``init_from`` is checked against its parent (``check_parent``); a resumed
    run keeps the ``init_from`` it recorded when it started.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path = run_dir / CONFIG_FILE
    resume = checkpoint_path(run_dir, "last").exists()
    if not resume:  # starting afresh would write over a trained run's log and recipe
        records = runlog.read(run_dir / LOG_FILE)
        # Checkpoints are written at each validation: a start that saved nothing starts over.
        ended, saved = runlog.last(records, "end"), runlog.last(records, "valid")
        if ended or saved:
            how = f"finished at step {ended.get('step', 0)}" if ended else \
                f"was logged to step {max(r.get('step', 0) for r in records)}, saved at {saved.get('step', 0)}"
            raise NmtError(f"{run_dir} holds a run that {how} and has no last.pt to go on from; put its "
                           f"last.pt back to resume, or train into a new --run directory (or remove its "
                           f"{LOG_FILE} to start over)")
    if resume and saved_path.exists():
        saved = config.load_recipe(saved_path)
        blocking = [c for c in config.changed_keys(config.to_dict(saved), config.to_dict(cfg))
                    if c[0] not in config.RESUMABLE_CHANGES]
        if blocking:
            blocking.sort(key=lambda c: c[0] != "model.kind")  # the kind explains the rest
            key, old, new = blocking[0]
            more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
            raise NmtError(f"{run_dir} was trained with {key}={old!r}, the recipe now says "
                           f"{new!r}{more}; train into a new --run directory, or set it back "
                           "to resume")
        cfg = replace(cfg, init_from=_kept_origin(saved, cfg, run_dir))
    elif cfg.init_from is not None:
        cfg = check_parent(cfg, run_dir)
    if write:
        config.save(cfg, saved_path)
    return cfg, resume


# --- fine-tuning: a run that starts from another run's weights -----------------------------------

# Model keys a fine-tuned run may set anew: regularisation, not the shape of the parameters.
FREE_MODEL_KEYS = {"dropout", "attention_dropout", "activation_dropout"}


def fine_tune(cfg: Config, parent: Path, which: str = "best", keep_optimizer: bool = False) -> Config:
    """``cfg`` set to start from run ``parent``'s ``which`` checkpoint (``nmt train --init-from``)."""
    return replace(cfg, init_from=config.InitFrom(run=str(parent), checkpoint=which, keep_optimizer=keep_optimizer))


def check_parent(cfg: Config, run_dir: Path) -> Config:
    """Check that ``cfg`` can start from its ``init_from`` run, before anything is trained or copied.

    Refused, naming the key: another model shape (any ``model`` key but the dropouts) or
    other tokenizer settings than the parent's; a parent checkpoint that is not the one an
    earlier start recorded. Returns ``cfg`` with the checkpoint's step and sha256 recorded
    and ``tokenizer.reuse`` naming the parent, whose ``spm.model`` the run copies.
    """
    init = cfg.init_from
    parent, where = Path(init.run), f"--init-from {init.run}"
    require_run(parent, where, hint="name a directory nmt train wrote")
    if parent.resolve() == Path(run_dir).resolve():
        raise NmtError(f"{where}: that is the run being trained; fine-tune into a new --run directory")
    spm_sha256 = sha256(parent / MODEL_FILE)
    path = checkpoint_path(parent, init.checkpoint)
    state = checkpoint.load(path, spm_sha256, mmap=True)
    if init.keep_optimizer and "optimizer" not in state:
        raise NmtError(f"{where}: {path.name} holds no optimizer state (only last.pt does); add "
                       "--checkpoint last to keep the optimizer, or leave out --keep-optimizer")
    try:
        parent_cfg = config.from_dict(state["config"])
    except (NmtError, KeyError) as e:
        raise NmtError(f"{where}: {path} holds a config this nmt cannot read ({e})") from None
    changes = _shape_and_tokenizer_changes(parent_cfg, cfg)
    if changes:
        key, mine, theirs = changes[0]
        keeps = "shape" if key.startswith("model.") else MODEL_FILE
        raise NmtError(f"{where}: {key} is {mine!r} here but {theirs!r} in {init.run}; a fine-tuned run keeps "
                       f"its parent's {keeps} (leave the key out, or set it as the parent has it)")
    if cfg.tokenizer.reuse:
        reused = Path(cfg.tokenizer.reuse)
        reused = reused / MODEL_FILE if reused.is_dir() else reused
        if not (reused.is_file() and sha256(reused) == spm_sha256):
            raise NmtError(f"{where}: tokenizer.reuse is {cfg.tokenizer.reuse!r} here, not the SentencePiece "
                           f"model of {init.run}; a fine-tuned run keeps its parent's {MODEL_FILE} (leave "
                           "tokenizer.reuse out)")
    own_spm = Path(run_dir) / MODEL_FILE
    if own_spm.is_file() and sha256(own_spm) != spm_sha256:
        raise NmtError(f"{where}: {own_spm} is another SentencePiece model than {init.run}'s; fine-tune "
                       "into a new --run directory")
    found = checkpoint.fingerprint(path)
    if init.sha256 is not None and init.sha256 != found["sha256"]:
        raise NmtError(f"{where}: {path} is no longer the checkpoint {run_dir} recorded as its start (step "
                       f"{init.step}, now step {found['step']}); pass --init-from again to start from it as "
                       "it is now, or fine-tune into a new --run directory")
    log.info("%s starts from %s (step %s)%s", run_dir, path, found["step"],
             ", with its optimizer state" if init.keep_optimizer else "")
    return replace(cfg, tokenizer=replace(cfg.tokenizer, reuse=str(parent)),
                   init_from=replace(init, step=found["step"], sha256=found["sha256"]))


def _shape_and_tokenizer_changes(parent: Config, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, this recipe's value, the parent's) of every setting a fine-tuned run must share."""
    if cfg.model.kind != parent.model.kind:  # the kind explains every other model key
        return [("model.kind", cfg.model.kind, parent.model.kind)]
    mine, theirs = config.to_dict(cfg), config.to_dict(parent)
    keys = [f"model.{k}" for k in mine["model"] if k not in FREE_MODEL_KEYS]
    keys += ["tokenizer.vocab_size", "tokenizer.model_type"]
    changes = []
    for key in keys:
        section, name = key.split(".")
        if mine[section][name] != theirs[section][name]:
            changes.append((key, mine[section][name], theirs[section][name]))
    return changes


def _kept_origin(saved: Config, cfg: Config, run_dir: Path) -> config.InitFrom | None:
    """A resumed run's ``init_from``: the one it recorded when it started, whatever the command says now."""
    asked, kept = cfg.init_from, saved.init_from
    if asked is not None and kept is None:
        raise NmtError(f"{run_dir} already holds a run that did not start from another (last.pt); "
                       f"--init-from {asked.run} starts a new run: give a new --run directory")
    if asked is not None and (asked.run, asked.checkpoint) != (kept.run, kept.checkpoint):
        log.warning("%s resumes; it started from %s (%s), and --init-from %s is not applied",
                    run_dir, kept.run, kept.checkpoint, asked.run)
    return kept
