"""One run directory -> one ``RunSummary``: its cost and quality as its log, recipe and evaluations
record them, and whether the runs of one table compare.

The training and validation clocks come from ``log.jsonl`` (``nmt.runlog``); the test score is
chosen among ``eval/*.json`` (``nmt eval --model`` results): the recipe's test split with the best
checkpoint where there is one (float32, full vocabulary), else the closest, said so in ``test_note``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from nmt import files, hardware, rundir, runlog
from nmt.config import DataConfig, split_paths
from nmt.errors import NmtError


@dataclass
class RunSummary:
    run: str
    model: str
    params: int | None
    device: str
    ranks: int
    precision: str
    effective_batch: int | None
    steps: int
    epochs: int
    status: str  # finished | unfinished
    train_minutes: float  # wall clock of the updates only
    valid_minutes: float
    tokens_per_s: float | None  # median over logged windows
    best_valid_bleu: float | None
    test_bleu: float | None
    test_chrf: float | None
    test_signature: str
    time_to_target_minutes: float | None  # training clock when valid BLEU first reached the target
    decode_sent_per_s: float | None  # beam 5 on the test set, where measured
    tokenizer_sha256: str
    test_set: str  # the reference file's sha256 (or name) of the test result
    bleu_tokenize: str = "13a"  # the recipe's data.bleu_tokenize: how its valid and test BLEU split words
    test_source: str = ""  # the source file the test result translated
    test_checkpoint: str = ""  # the checkpoint that translated it ("best step 1200")
    # Empty when the test result is the recipe's test split with the best checkpoint; else how it differs.
    test_note: str = ""
    # A fine-tuned run: the run and checkpoint it started from ("runs/base best.pt step 3000"); else empty.
    init_from: str = ""
    # Best valid BLEU by each of the asked training times ({"10": 21.3, ...}); None where the
    # run did not train that long.
    bleu_at: dict[str, float | None] = field(default_factory=dict)
    seed: int | None = None  # the recipe's train.seed
    cpu: str = ""  # what it trained on ("AMD EPYC (2 cores)", a GPU added); "" if the log predates it
    cpu_kind: str = ""  # the CPU's generation and vector instructions ("family 23 model 1, AVX2"); "" if not logged
    # Where a resumed run went on training on other hardware than it started on: that hardware; else empty.
    moved_to: str = ""
    test_hyp: str = ""  # the hypotheses the test result scored, as nmt eval kept them
    test_hyp_sha256: str = ""
    test_ref: str = ""  # the reference file of the test result
    # sacreBLEU's paired bootstrap: mean over resamples and half-width of the 95% interval,
    # and the p-value against ``p_baseline`` (filled in by ``significance``).
    test_bleu_mean: float | None = None
    test_bleu_ci: float | None = None
    test_chrf_mean: float | None = None
    test_chrf_ci: float | None = None
    p_bleu: float | None = None
    p_chrf: float | None = None
    target: float | None = None  # the valid BLEU that time_to_target_minutes is the time to
    # Whether the run had its machine to itself (``machine_use``): "alone", "shared" (its wall-clock
    # figures are then not usable), or "" where its log records no CPU figures.
    machine_use: str = ""
    loaded_windows: float | None = None  # the share of its log windows in which other processes took the cores
    p_baseline: str = ""
    significance_note: str = ""  # "baseline", or why there is no interval or p-value
    # The clock-free reading (``--at-updates``): updates to the first validation at the target, and the
    # best valid BLEU by each asked number of updates ({"2000": 31.2}; None where the run made fewer).
    updates_to_target: int | None = None
    bleu_at_updates: dict[str, float | None] = field(default_factory=dict)
    ended: str = ""  # why training stopped, as the log's end record says; "" for an unfinished run
    best_step: int | None = None  # the update of the best validation (best.pt)


def reaching(records: list[dict], target: float) -> dict | None:
    """The first validation whose BLEU reached ``target``: its ``train_seconds`` time it, its ``step`` counts
    the updates to it."""
    return next((r for r in records if r["event"] == "valid" and r.get("valid_bleu", -1) >= target), None)


def time_to_target(records: list[dict], target: float) -> float | None:
    """Training minutes at the first validation whose BLEU reached ``target``."""
    first = reaching(records, target)
    return first["train_seconds"] / 60 if first else None


def best_by(records: list[dict], clock: str, mark: float, slack: float = 1.0) -> float | None:
    """Best valid BLEU among validations by ``mark`` on ``clock`` (``train_seconds`` or ``step``), None if the
    run's clock stopped short of it; ``slack`` widens the mark both ways."""
    if max((r.get(clock, 0) for r in records), default=0) < mark / slack:
        return None
    return max((r["valid_bleu"] for r in records if r["event"] == "valid" and r[clock] <= mark * slack), default=None)


def parse_updates(text: str) -> list[int]:
    """``"1000,2000,4000"`` -> [1000, 2000, 4000], for ``nmt report --at-updates``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise NmtError(f"--at-updates {text}: give positive whole numbers of updates separated by commas, "
                       "e.g. --at-updates 1000,2000,4000")
    return values


# A log window "had other load" where other processes took more than hardware.OTHER_LOAD_LIMIT (10%) of
# the cores' time; a run "shared the machine" where more than this share of its windows had.
SHARED_WINDOWS = 0.05


def machine_use(records: list[dict]) -> tuple[str, float | None]:
    """("alone" or "shared", the share of the log windows with other load) of a run's log; ("", None)
    for a log that records no CPU figures (written before nmt recorded them, or without /proc/stat)."""
    loads = [hardware.other_share(r["machine_busy_seconds"], r.get("cpu_seconds", 0.0), r["machine_core_seconds"])
             for r in records if r["event"] == "train" and r.get("machine_core_seconds")]
    if not loads:
        return "", None
    loaded = sum(load > hardware.OTHER_LOAD_LIMIT for load in loads) / len(loads)
    return ("shared" if loaded > SHARED_WINDOWS else "alone"), loaded


# A run stopped by a time limit finishes the update in flight, so its last validation lands a
# little after the mark; this much slack still counts it as "at" the mark.
AT_SLACK = 1.01


def bleu_at(records: list[dict], minutes: float) -> float | None:
    """Best valid BLEU among validations by ``minutes`` of training, None if it trained less."""
    return best_by(records, "train_seconds", minutes * 60, AT_SLACK)


def parse_minutes(text: str) -> list[float]:
    """``"10,20,40"`` -> [10.0, 20.0, 40.0], for ``nmt report --at``."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NmtError(f"--at {text}: give training minutes separated by commas, e.g. --at 10,20,40") from None
    if not values or any(v <= 0 for v in values):
        raise NmtError(f"--at {text}: give positive training minutes separated by commas, e.g. --at 10,20,40")
    return values


def _evaluations(run: Path) -> list[tuple[float, dict]]:
    """(modification time, record) of every readable ``eval/*.json`` of a run."""
    results = []
    for path in sorted((run / rundir.EVAL_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "BLEU" in record:
            results.append((path.stat().st_mtime, record))
    return results


@functools.lru_cache(maxsize=64)
def cached_sha256(path: Path, mtime_ns: int) -> str:
    return files.sha256(path)


def _is_file(recorded: str | None, recorded_sha256: str | None, expected: Path) -> bool:
    """Whether an evaluation read ``expected``: by content where both hashes are known, else by name."""
    if recorded_sha256 and expected.is_file():
        return recorded_sha256 == cached_sha256(expected, expected.stat().st_mtime_ns)
    return Path(recorded or "").name == expected.name


def _recipe_test_files(cfg: dict) -> tuple[Path, Path] | None:
    """The (source, reference) files of the test split the run's recipe names."""
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    known = {f.name for f in dataclasses.fields(DataConfig)}
    data_cfg = DataConfig(**{k: v for k, v in data.items() if k in known})
    return split_paths(data_cfg, "test") if data_cfg.test else None


def best_step(records: list[dict]) -> int | None:
    """The step of the first validation with the best BLEU: the step ``best.pt`` holds."""
    best = None
    for r in records:
        if r["event"] == "valid" and (best is None or r["valid_bleu"] > best["valid_bleu"]):
            best = r
    return best["step"] if best else None


def _test_result(run: Path, cfg: dict, records: list[dict]) -> tuple[dict | None, str]:
    """The evaluation to report as the run's test score, and what it is if not the expected one.

    Expected: the recipe's test split, translated by ``best.pt`` as it is now (the step the log
    names), in float32 at the recipe's beam. Failing that, the closest one, said so.
    """
    evaluations = _evaluations(run)
    if not evaluations:
        return None, ""
    files, best = _recipe_test_files(cfg), best_step(records)
    beam = (cfg.get("search") or {}).get("beam", 5)

    def fits(r: dict) -> tuple[bool, bool]:
        on_test = files is not None and _is_file(r.get("src"), r.get("src_sha256"), files[0]) \
            and _is_file(r.get("ref"), r.get("ref_sha256"), files[1])
        on_best = r.get("checkpoint") == "best" and (best is None or r.get("checkpoint_step") in (None, best))
        return on_test, on_best

    def shortlist(r: dict) -> str:
        return (r.get("search") or {}).get("shortlist") or ""

    _, chosen = max(evaluations, key=lambda item: (*fits(item[1]), not item[1].get("int8"),
                                                   not shortlist(item[1]), item[1].get("beam") == beam, item[0]))
    on_test, on_best = fits(chosen)
    differences = []
    if not on_test:
        shown = f"{Path(chosen.get('src', '?')).name} -> {Path(chosen.get('ref', '?')).name}"
        wanted = f"the recipe's test split {files[0].name}" if files else "a test split (the recipe names none)"
        differences.append(f"{shown}, not {wanted}")
    if not on_best:
        step = chosen.get("checkpoint_step")
        now = f" (step {best})" if best is not None else ""
        differences.append(f"checkpoint {chosen.get('checkpoint', '?')}"
                           f"{f' at step {step}' if step is not None else ''}, not best.pt{now}")
    if chosen.get("int8"):
        differences.append("int8 decoding")
    if shortlist(chosen):
        differences.append(f"shortlist {shortlist(chosen)}")
    return chosen, "; ".join(differences)


def _checkpoint_label(record: dict) -> str:
    step = record.get("checkpoint_step")
    return f"{record.get('checkpoint', '?')}" + (f" step {step}" if step is not None else "")


def summarize(run: Path, target: float | None = None, at: list[float] = (), at_updates: list[int] = ()) -> RunSummary:
    run = Path(run)
    records = runlog.read_run(run / rundir.LOG_FILE)
    start = runlog.first(records, "start") or {}
    train = [r for r in records if r["event"] == "train"]
    valid = [r for r in records if r["event"] == "valid"]
    end = runlog.last(records, "end")
    last = records[-1]
    timed = next((r for r in reversed(records) if "train_seconds" in r), {})  # not a resume record
    cfg = read_config(run)
    test, test_note = _test_result(run, cfg, records)
    spm = run / rundir.MODEL_FILE
    use, loaded = machine_use(records)
    return RunSummary(
        run=run.name,
        model=model_kind(run, cfg),
        params=start.get("params"),
        device=start.get("device", "?"),
        ranks=start.get("world_size", 1),
        precision=start.get("precision", "fp32"),
        effective_batch=start.get("effective_batch_tokens"),
        steps=last.get("step", 0),
        epochs=max((r.get("epoch", 1) for r in records), default=1),
        status="finished" if end else "unfinished",
        train_minutes=timed.get("train_seconds", 0.0) / 60,
        valid_minutes=timed.get("valid_seconds", 0.0) / 60,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in train) if train else None,
        best_valid_bleu=max((r["valid_bleu"] for r in valid), default=None),
        test_bleu=test["BLEU"]["score"] if test else None,
        test_chrf=test["chrF2"]["score"] if test else None,
        test_signature=test["BLEU"]["signature"] if test else "",
        bleu_tokenize=(cfg.get("data") or {}).get("bleu_tokenize", "13a"),
        time_to_target_minutes=time_to_target(records, target) if target is not None else None,
        target=target,
        decode_sent_per_s=test["sentences_per_s"] if test and test.get("beam") == 5 else None,
        tokenizer_sha256=files.sha256(spm) if spm.is_file() else "",
        test_set=(test.get("ref_sha256") or Path(test["ref"]).name) if test else "",
        test_source=Path(test.get("src", "")).name if test else "",
        test_checkpoint=_checkpoint_label(test) if test else "",
        test_note=test_note,
        init_from=_origin(cfg),
        bleu_at={f"{m:g}": bleu_at(records, m) for m in at},
        seed=(cfg.get("train") or {}).get("seed"),
        cpu=hardware.machine(start),
        cpu_kind=start.get("cpu_kind", ""),
        moved_to=_moved_to(start, records),
        test_hyp=str(run / rundir.EVAL_DIR / test["hyp"]) if test and test.get("hyp") else "",
        test_hyp_sha256=test.get("hyp_sha256", "") if test else "",
        test_ref=test.get("ref", "") if test else "",
        machine_use=use,
        loaded_windows=loaded,
        updates_to_target=(reaching(records, target) or {}).get("step") if target is not None else None,
        bleu_at_updates={str(n): best_by(records, "step", n) for n in at_updates},
        ended=end.get("reason", "") if end else "",
        best_step=best_step(records),
    )


def _moved_to(start: dict, records: list[dict]) -> str:
    """The hardware of the resumes that ran elsewhere than ``start`` ("" where all ran alike)."""
    elsewhere = []
    for r in records:
        if r["event"] == "resume" and hardware.machine(r) and not hardware.same_machine(start, r):
            where = hardware.describe_hardware(r)
            elsewhere += [where] if where not in elsewhere else []
    return "; ".join(elsewhere)


def _origin(cfg: dict) -> str:
    """Where a fine-tuned run's weights came from, as its config.yaml records it; "" for a run from scratch."""
    init = cfg.get("init_from")
    if not isinstance(init, dict) or not init.get("run"):
        return ""
    which = str(init.get("checkpoint") or "best")
    which = f"{which}.pt" if which in rundir.NAMED_CHECKPOINTS else which
    step = f" step {init['step']}" if init.get("step") is not None else ""
    return f"{init['run']} {which}{step}"


def read_config(run: Path) -> dict:
    """The run's resolved recipe, as written by nmt train."""
    import yaml

    try:
        cfg = yaml.safe_load((run / rundir.CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        cfg = None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "kind" not in cfg["model"]:
        raise NmtError(f"{run}: no readable {rundir.CONFIG_FILE}; is it a run directory written by nmt train?")
    return cfg


def model_kind(run: Path, cfg: dict | None = None) -> str:
    return (cfg or read_config(run))["model"]["kind"]


def check_comparable(rows: list[RunSummary], machines: bool = True) -> None:
    """Refuse a table of runs with different tokenizers, test sets or (``machines``) CPUs, naming which differ."""
    for attr, what in (("tokenizer_sha256", "SentencePiece models"), ("test_set", "test sets"),
                       ("bleu_tokenize", "BLEU tokenizations (data.bleu_tokenize)")):
        groups: dict[str, list[str]] = {}
        for row in rows:
            if getattr(row, attr):
                groups.setdefault(getattr(row, attr), []).append(row.run)
        if len(groups) > 1:
            listing = "; ".join(", ".join(names) for names in groups.values())
            raise NmtError(f"these runs use different {what} ({listing}), so their numbers do not "
                           "compare; train with tokenizer.reuse / evaluate on the same files / score alike, or pass "
                           "--allow-mixed")
    if not machines:
        return
    for row in rows:
        if row.moved_to:
            raise NmtError(f"{row.run} started on {machine_of(row)} and was resumed on {row.moved_to}, so its "
                           "training time mixes their speeds; report it alone, project it with --time-from, or "
                           "pass --allow-mixed")
    cpus: dict[str, list[str]] = {}
    for row in rows:
        if row.cpu:  # a run logged before nmt recorded its CPU compares, with a note
            cpus.setdefault(row.cpu, []).append(row.run)
    kinds: dict[str, list[str]] = {}
    for row in rows:
        if row.cpu_kind:  # one logged before nmt recorded the kind is matched on name and cores, with a note
            kinds.setdefault(machine_of(row), []).append(row.run)
    for found in (cpus, kinds):
        if len(found) > 1:
            listing = "; ".join(f"{', '.join(names)} on {cpu}" for cpu, names in found.items())
            raise NmtError(f"these runs trained on different CPUs or GPUs ({listing}), so their training times "
                           "do not compare; report them separately, project them onto one machine with "
                           "--time-from PROBE.json, or pass --allow-mixed")


def machine_of(row: RunSummary) -> str:
    """The run's hardware with its CPU kind: "AMD EPYC (2 cores) [family 23 model 1, AVX2]"."""
    return hardware.describe_hardware({"cpu": row.cpu, "cpu_kind": row.cpu_kind})
