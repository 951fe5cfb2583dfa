"""Runs -> one table of cost and quality, and a picture of valid BLEU against training time.

Everything is read from the run directories: ``config.yaml``, ``log.jsonl`` (training and
validation clocks kept apart) and ``eval/*.json`` (``nmt eval --model`` results). The test
score shown is the evaluation of the recipe's test split with the best checkpoint; where the
run has none, the table says which evaluation it shows instead. Runs are put in one table
only when they share the tokenizer, the test set and the CPU, unless asked.

The test scores come with sacreBLEU's 95% bootstrap intervals and its paired bootstrap
p-value against a baseline run, computed from the hypotheses ``nmt eval`` kept; runs of one
recipe that differ only in their seed can be summarized as one group (mean ± sd).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nmt.config import DataConfig, split_paths
from nmt.errors import NmtError
from nmt.evaluate import BOOTSTRAP_SAMPLES, paired_bootstrap
from nmt.tokenizer import MODEL_FILE, file_sha256


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
    p_baseline: str = ""
    significance_note: str = ""  # "baseline", or why there is no interval or p-value


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        raise NmtError(f"{path}: missing; is {path.parent} a run directory written by nmt train?")
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write: the lines before it stand
                break
            raise NmtError(f"{path}:{n}: not a JSON record; the log is corrupt (truncate the bad line "
                           "or report the run without it)") from None
        if not isinstance(record, dict) or "event" not in record:
            raise NmtError(f"{path}:{n}: not an nmt log record (no 'event')")
        records.append(record)
    if not records:
        raise NmtError(f"{path}: empty; the run has not started training")
    return records


def time_to_target(records: list[dict], target: float) -> float | None:
    """Training minutes at the first validation whose BLEU reached ``target``."""
    for r in records:
        if r["event"] == "valid" and r.get("valid_bleu", -1) >= target:
            return r["train_seconds"] / 60
    return None


# A run stopped by a time limit finishes the update in flight, so its last validation lands a
# little after the mark; this much slack still counts it as "at" the mark.
AT_SLACK = 1.01


def bleu_at(records: list[dict], minutes: float) -> float | None:
    """Best valid BLEU among validations by ``minutes`` of training, None if it trained less."""
    limit = minutes * 60 * AT_SLACK
    if max((r.get("train_seconds", 0.0) for r in records), default=0.0) < minutes * 60 / AT_SLACK:
        return None
    scores = [r["valid_bleu"] for r in records if r["event"] == "valid" and r["train_seconds"] <= limit]
    return max(scores, default=None)


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
    for path in sorted((run / "eval").glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "BLEU" in record:
            results.append((path.stat().st_mtime, record))
    return results


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, mtime_ns: int) -> str:
    return file_sha256(path)


def _is_file(recorded: str | None, recorded_sha256: str | None, expected: Path) -> bool:
    """Whether an evaluation read ``expected``: by content where both hashes are known, else by name."""
    if recorded_sha256 and expected.is_file():
        return recorded_sha256 == _sha256_of(expected, expected.stat().st_mtime_ns)
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

    _, chosen = max(evaluations, key=lambda item: (*fits(item[1]), not item[1].get("int8"),
                                                   item[1].get("beam") == beam, item[0]))
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
    return chosen, "; ".join(differences)


def _checkpoint_label(record: dict) -> str:
    step = record.get("checkpoint_step")
    return f"{record.get('checkpoint', '?')}" + (f" step {step}" if step is not None else "")


def summarize(run: Path, target: float | None = None, at: list[float] = ()) -> RunSummary:
    run = Path(run)
    records = read_log(run / "log.jsonl")
    start = next((r for r in records if r["event"] == "start"), {})
    train = [r for r in records if r["event"] == "train"]
    valid = [r for r in records if r["event"] == "valid"]
    end = next((r for r in reversed(records) if r["event"] == "end"), None)
    last = records[-1]
    cfg = _read_config(run)
    test, test_note = _test_result(run, cfg, records)
    spm = run / MODEL_FILE
    return RunSummary(
        run=run.name,
        model=_model_kind(run, cfg),
        params=start.get("params"),
        device=start.get("device", "?"),
        ranks=start.get("world_size", 1),
        precision=start.get("precision", "fp32"),
        effective_batch=start.get("effective_batch_tokens"),
        steps=last.get("step", 0),
        epochs=max((r.get("epoch", 1) for r in records), default=1),
        status="finished" if end else "unfinished",
        train_minutes=last.get("train_seconds", 0.0) / 60,
        valid_minutes=last.get("valid_seconds", 0.0) / 60,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in train) if train else None,
        best_valid_bleu=max((r["valid_bleu"] for r in valid), default=None),
        test_bleu=test["BLEU"]["score"] if test else None,
        test_chrf=test["chrF2"]["score"] if test else None,
        test_signature=test["BLEU"]["signature"] if test else "",
        time_to_target_minutes=time_to_target(records, target) if target is not None else None,
        target=target,
        decode_sent_per_s=test["sentences_per_s"] if test and test.get("beam") == 5 else None,
        tokenizer_sha256=file_sha256(spm) if spm.is_file() else "",
        test_set=(test.get("ref_sha256") or Path(test["ref"]).name) if test else "",
        test_source=Path(test.get("src", "")).name if test else "",
        test_checkpoint=_checkpoint_label(test) if test else "",
        test_note=test_note,
        init_from=_origin(cfg),
        bleu_at={f"{m:g}": bleu_at(records, m) for m in at},
        seed=(cfg.get("train") or {}).get("seed"),
        cpu=_hardware(start),
        cpu_kind=start.get("cpu_kind", ""),
        moved_to=_moved_to(start, records),
        test_hyp=str(run / "eval" / test["hyp"]) if test and test.get("hyp") else "",
        test_hyp_sha256=test.get("hyp_sha256", "") if test else "",
        test_ref=test.get("ref", "") if test else "",
    )


def _hardware(start: dict) -> str:
    """The CPU (and GPU) of a run's start record; "" for a log written before nmt recorded them."""
    return ", ".join(start[key] for key in ("cpu", "gpu") if start.get(key))


def describe_hardware(record: dict) -> str:
    """A start or resume record's hardware in one phrase: "AMD EPYC (2 cores) [family 23 model 1, AVX2]"."""
    return f"{_hardware(record)} [{record['cpu_kind']}]" if record.get("cpu_kind") else _hardware(record)


def same_machine(a: dict, b: dict) -> bool:
    """Whether two start/resume records name the same hardware; a kind not logged matches any."""
    kinds = a.get("cpu_kind"), b.get("cpu_kind")
    return _hardware(a) == _hardware(b) and (not all(kinds) or kinds[0] == kinds[1])


def _moved_to(start: dict, records: list[dict]) -> str:
    """The hardware of the resumes that ran elsewhere than ``start`` ("" where all ran alike)."""
    elsewhere = []
    for r in records:
        if r["event"] == "resume" and _hardware(r) and not same_machine(start, r):
            where = describe_hardware(r)
            elsewhere += [where] if where not in elsewhere else []
    return "; ".join(elsewhere)


def _origin(cfg: dict) -> str:
    """Where a fine-tuned run's weights came from, as its config.yaml records it; "" for a run from scratch."""
    init = cfg.get("init_from")
    if not isinstance(init, dict) or not init.get("run"):
        return ""
    which = str(init.get("checkpoint") or "best")
    which = f"{which}.pt" if which in ("best", "last", "averaged") else which
    step = f" step {init['step']}" if init.get("step") is not None else ""
    return f"{init['run']} {which}{step}"


def _read_config(run: Path) -> dict:
    """The run's resolved recipe, as written by nmt train."""
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        cfg = None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "kind" not in cfg["model"]:
        raise NmtError(f"{run}: no readable config.yaml; is it a run directory written by nmt train?")
    return cfg


def _model_kind(run: Path, cfg: dict | None = None) -> str:
    return (cfg or _read_config(run))["model"]["kind"]


def check_comparable(rows: list[RunSummary]) -> None:
    """Refuse a table of runs with different tokenizers, test sets or CPUs, naming which differ."""
    for attr, what in (("tokenizer_sha256", "SentencePiece models"), ("test_set", "test sets")):
        groups: dict[str, list[str]] = {}
        for row in rows:
            if getattr(row, attr):
                groups.setdefault(getattr(row, attr), []).append(row.run)
        if len(groups) > 1:
            listing = "; ".join(", ".join(names) for names in groups.values())
            raise NmtError(f"these runs use different {what} ({listing}), so their numbers do not "
                           "compare; train with tokenizer.reuse / evaluate on the same files, or pass "
                           "--allow-mixed")
    for row in rows:
        if row.moved_to:
            raise NmtError(f"{row.run} started on {_machine(row)} and was resumed on {row.moved_to}, so its "
                           "training time mixes their speeds; report it alone, or pass --allow-mixed")
    machines: dict[str, list[str]] = {}
    for row in rows:
        if row.cpu:  # a run logged before nmt recorded its CPU compares, with a note
            machines.setdefault(row.cpu, []).append(row.run)
    kinds: dict[str, list[str]] = {}
    for row in rows:
        if row.cpu_kind:  # one logged before nmt recorded the kind is matched on name and cores, with a note
            kinds.setdefault(_machine(row), []).append(row.run)
    for found in (machines, kinds):
        if len(found) > 1:
            listing = "; ".join(f"{', '.join(names)} on {cpu}" for cpu, names in found.items())
            raise NmtError(f"these runs trained on different CPUs or GPUs ({listing}), so their training times "
                           "do not compare; report them separately, or pass --allow-mixed")


def check_here(runs: list[Path]) -> tuple[str, list[str]]:
    """This machine as a run's log records it, checked against the runs' start records before a run
    is added to them: raises naming the first that trained on other hardware; else returns
    (this machine, notes on runs whose log names the CPU without its kind, matched on name and cores)."""
    from nmt.train import hardware, pick_device

    here = hardware(pick_device())
    described = describe_hardware(here)
    notes = []
    for run in runs:
        start = next((r for r in read_log(Path(run) / "log.jsonl") if r["event"] == "start"), {})
        if not _hardware(start) or not start.get("cpu_kind"):
            notes.append(f"{run}: CPU kind not recorded (logged before nmt recorded it), matched on name and cores "
                         "only" if _hardware(start) else f"{run}: CPU not recorded, not checked")
        if _hardware(start) and not same_machine(start, here):
            raise NmtError(f"{run} trained on {describe_hardware(start)}, this machine is {described}: a run "
                           "made here would not compare with it; train on a machine of its kind")
    return described, notes


def _machine(row: RunSummary) -> str:
    """The run's hardware with its CPU kind: "AMD EPYC (2 cores) [family 23 model 1, AVX2]"."""
    return describe_hardware({"cpu": row.cpu, "cpu_kind": row.cpu_kind})


# --- confidence intervals and paired significance -------------------------------------------------

NO_HYPOTHESES = "no significance: re-run nmt eval"


@dataclass
class Significance:
    baseline: str  # the run every p-value compares with; "" where it has no kept hypotheses
    signatures: dict[str, str]  # sacreBLEU's, per metric (with bs:1000 and the seed)
    notes: list[str]  # one line each: runs that were not compared, and why


def _kept_hypotheses(row: RunSummary) -> list[str] | str:
    """The test hypotheses of a run, or why there are none to test."""
    if row.test_bleu is None:
        return "no significance: no test evaluation (nmt eval --model RUN --src ... --ref ...)"
    if not row.test_hyp or not row.test_hyp_sha256:
        return f"{NO_HYPOTHESES} (its record keeps no hypotheses)"
    path = Path(row.test_hyp)
    if not path.is_file():
        return f"{NO_HYPOTHESES} ({path} is missing)"
    if _sha256_of(path, path.stat().st_mtime_ns) != row.test_hyp_sha256:
        return f"{NO_HYPOTHESES} ({path} changed since it was scored)"
    return path.read_text(encoding="utf-8").splitlines()


def _reference(rows: list[RunSummary]) -> list[str] | str:
    """The reference lines the rows were scored against (all share ``test_set``), checked by sha256."""
    for row in rows:
        path = Path(row.test_ref)
        if path.is_file() and row.test_set in (_sha256_of(path, path.stat().st_mtime_ns), path.name):
            return path.read_text(encoding="utf-8").splitlines()
    return f"no significance: the reference {rows[0].test_ref or '?'} is missing or changed since scoring"


def _same_resamples(a, b) -> bool:
    """Whether two systems' bootstrap results are equal: their sentence statistics are the same."""
    return (a.score, a.mean, a.ci) == (b.score, b.mean, b.ci)


def _find_run(rows: list[RunSummary], name: str) -> int:
    for i, row in enumerate(rows):
        if row.run in (name, Path(name).name):
            return i
    raise NmtError(f"--baseline {name}: not one of the reported runs ({', '.join(r.run for r in rows)})")


def significance(rows: list[RunSummary], baseline: str | int | None = None,
                 n_samples: int = BOOTSTRAP_SAMPLES) -> tuple[list[RunSummary], Significance]:
    """Each run's test BLEU/chrF with its 95% interval, and the paired bootstrap p-value against the baseline.

    The numbers are sacreBLEU's (``sacrebleu.significance.PairedTest``, paired bootstrap, seed from
    ``SACREBLEU_SEED``), computed from the hypotheses ``nmt eval`` kept. Only runs scored against the
    baseline's reference get a p-value. Output identical to the baseline's is said so: sacreBLEU
    would give it the smallest p-value, 1/(n+1), as if the difference were significant.
    """
    if not rows:
        return rows, Significance("", {}, [])
    base = baseline if isinstance(baseline, int) else _find_run(rows, baseline) if baseline else 0
    updates: dict[int, dict] = {}
    hyps: dict[int, list[str]] = {}
    for i, row in enumerate(rows):
        found = _kept_hypotheses(row)
        if isinstance(found, str):
            updates[i] = {"significance_note": found}
        else:
            hyps[i] = found
    by_test_set: dict[str, list[int]] = {}
    for i in hyps:
        by_test_set.setdefault(rows[i].test_set, []).append(i)
    notes, signatures = [], {}
    base_name = rows[base].run if base in hyps else ""
    if not base_name:
        notes.append(f"no p-values: the baseline {rows[base].run} has no kept test hypotheses; re-run nmt eval "
                     "for it, or choose another with --baseline")
    for test_set, members in by_test_set.items():
        refs = _reference([rows[i] for i in members])
        if isinstance(refs, str):
            updates.update({i: {"significance_note": refs} for i in members})
            continue
        short = [i for i in members if len(hyps[i]) != len(refs)]
        for i in short:
            updates[i] = {"significance_note": f"no significance: {len(hyps[i])} hypotheses against "
                                               f"{len(refs)} references; re-run nmt eval"}
        members = sorted((i for i in members if i not in short), key=lambda i: i != base)  # baseline first
        if not members:
            continue
        compared = base in members
        results, signatures = paired_bootstrap([(str(i), hyps[i]) for i in members], refs, n_samples)
        for i in members:
            bleu, chrf = results[str(i)]["BLEU"], results[str(i)]["chrF2"]
            values = {"test_bleu_mean": bleu.mean, "test_bleu_ci": bleu.ci, "test_chrf_mean": chrf.mean,
                      "test_chrf_ci": chrf.ci}
            if i == base:
                values["significance_note"] = "baseline"
            elif compared and hyps[i] == hyps[base]:
                values.update(p_baseline=base_name, significance_note="identical to the baseline's output")
            elif compared:
                # Equal scores on every resample (outputs that differ only where neither scores)
                # also get sacreBLEU's smallest p-value; say so instead.
                same = [m for m, r in results[str(i)].items() if _same_resamples(r, results[str(base)][m])]
                values.update(p_bleu=None if "BLEU" in same else bleu.p_value,
                              p_chrf=None if "chrF2" in same else chrf.p_value, p_baseline=base_name)
                if same:
                    values["significance_note"] = f"same {' and '.join(same)} as the baseline on every resample"
            elif base_name:
                values["significance_note"] = f"not compared: another test set than {base_name}'s"
            updates[i] = values
        if not compared and base_name:
            notes.append(f"not compared with {base_name} (scored on another test set, {test_set[:12]}): "
                         + ", ".join(rows[i].run for i in members))
    rows = [dataclasses.replace(row, **updates.get(i, {})) for i, row in enumerate(rows)]
    return rows, Significance(base_name, signatures, notes)


# --- runs of one recipe with different seeds ------------------------------------------------------

# What the runs of one recipe may differ in and still count as seeds of it.
SEED_KEYS = ("name", "train.seed", "tokenizer.reuse")


@dataclass
class Spread:
    """Mean and sample standard deviation over the seeds that have the value (n of them)."""
    mean: float | None
    sd: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Spread:
        known = [v for v in values if v is not None]
        return cls(statistics.mean(known) if known else None,
                   statistics.stdev(known) if len(known) > 1 else None, len(known))


@dataclass
class SeedGroup:
    recipe: str  # the recipe's name
    model: str
    runs: list[str]  # by seed
    seeds: list[int | None]
    best_valid_bleu: Spread
    test_bleu: Spread
    test_chrf: Spread
    time_to_target_minutes: Spread
    bleu_at: dict[str, Spread]
    # The p-values of the group's first seed against the baseline group's first seed.
    p_run: str
    p_bleu: float | None
    p_chrf: float | None
    p_note: str
    members: list[int] = field(default_factory=list)  # indices of the runs in the report


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def seed_groups(runs: list[Path]) -> list[tuple[str, list[int]]]:
    """(recipe name, indices of its ``runs``) in order of appearance, each sorted by ``train.seed``.

    Refuses runs of one recipe that differ in anything but the seed, the name and
    ``tokenizer.reuse``, naming the key.
    """
    configs = [_flatten(_read_config(Path(run))) for run in runs]
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(str(cfg.get("name", Path(runs[i]).name)), []).append(i)
    for recipe, members in groups.items():
        first = configs[members[0]]
        for i in members[1:]:
            keys = sorted(k for k in first.keys() | configs[i].keys()
                          if k not in SEED_KEYS and first.get(k) != configs[i].get(k))
            if keys:
                a, b = Path(runs[members[0]]).name, Path(runs[i]).name
                raise NmtError(f"--group-seeds: runs {a} and {b} of recipe {recipe} differ in {keys[0]} "
                               f"({first.get(keys[0])!r} against {configs[i].get(keys[0])!r}), not only in "
                               "train.seed; report them without --group-seeds")
    order = {i: (configs[i].get("train.seed") is None, configs[i].get("train.seed") or 0) for i in range(len(runs))}
    return [(recipe, sorted(members, key=order.__getitem__)) for recipe, members in groups.items()]


def summarize_group(rows: list[RunSummary], members: list[int], recipe: str) -> SeedGroup:
    group = [rows[i] for i in members]
    first = group[0]
    return SeedGroup(
        recipe=recipe, model=first.model, runs=[r.run for r in group], seeds=[r.seed for r in group],
        best_valid_bleu=Spread.of([r.best_valid_bleu for r in group]),
        test_bleu=Spread.of([r.test_bleu for r in group]),
        test_chrf=Spread.of([r.test_chrf for r in group]),
        time_to_target_minutes=Spread.of([r.time_to_target_minutes for r in group]),
        bleu_at={m: Spread.of([r.bleu_at.get(m) for r in group]) for m in first.bleu_at},
        p_run=first.run, p_bleu=first.p_bleu, p_chrf=first.p_chrf, p_note=first.significance_note,
        members=list(members))


@dataclass
class Comparison:
    rows: list[RunSummary]
    groups: list[SeedGroup]  # empty unless seeds are grouped
    significance: Significance


def compare(runs: list[Path], target: float | None = None, at: list[float] = (), baseline: str | None = None,
            group_seeds: bool = False, allow_mixed: bool = False) -> Comparison:
    """Everything ``nmt report`` shows: a row per run, the significance tests, the seed groups.

    With ``group_seeds`` the baseline is the first seed of the group of ``baseline`` (default:
    the first group), and each group's p-value is its first seed's.
    """
    rows = [summarize(run, target, at) for run in runs]
    if not allow_mixed:
        check_comparable(rows)
    groups = seed_groups(runs) if group_seeds else []
    if groups:
        chosen = _find_run(rows, baseline) if baseline else 0
        baseline = next(members for _, members in groups if chosen in members)[0]
    rows, tested = significance(rows, baseline)
    return Comparison(rows, [summarize_group(rows, members, recipe) for recipe, members in groups], tested)


def _flat(row: RunSummary) -> dict:
    """The row as one level of named values: bleu_at becomes valid_bleu_at_<m>min columns."""
    values = asdict(row)
    for minutes, score in values.pop("bleu_at").items():
        values[f"valid_bleu_at_{minutes}min"] = score
    return values


def _flat_group(group: SeedGroup) -> dict:
    """A seed group as one level of named values: <value>_seed_mean, <value>_seed_sd, <value>_seed_n."""
    values: dict = {"recipe": group.recipe, "model": group.model, "runs": " ".join(group.runs),
                    "seeds": " ".join(str(s) for s in group.seeds), "n": len(group.runs)}
    spreads = {name: getattr(group, name) for name in ("best_valid_bleu", "test_bleu", "test_chrf",
                                                       "time_to_target_minutes")}
    spreads.update({f"valid_bleu_at_{m}min": spread for m, spread in group.bleu_at.items()})
    for name, spread in spreads.items():
        values.update({f"{name}_seed_mean": spread.mean, f"{name}_seed_sd": spread.sd, f"{name}_seed_n": spread.n})
    values.update(p_run=group.p_run, p_bleu=group.p_bleu, p_chrf=group.p_chrf, p_note=group.p_note)
    return values


def render(rows: list[RunSummary], fmt: str, groups: list[SeedGroup] = (),
           tested: Significance | None = None) -> str:
    """The report as md, csv or json. With seed groups, csv and json list the runs ("row": "run")
    and then the groups ("row": "group") with their own columns."""
    flat = [_flat(r) for r in rows]
    if groups:
        flat = [{"row": "run", **values} for values in flat] + [{"row": "group", **_flat_group(g)} for g in groups]
    if fmt == "json":
        return json.dumps(flat, indent=1)
    if fmt == "csv":
        columns = list(dict.fromkeys(key for values in flat for key in values))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        for values in flat:
            writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
        return out.getvalue()
    if fmt == "md":
        return _markdown(rows, groups, tested)
    raise NmtError(f"--format {fmt}: choose md, csv or json")


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _p(value: float | None) -> str:
    """A p-value as sacreBLEU prints it: four decimals, ``*`` where it is at most 0.05."""
    return "–" if value is None else f"{value:.4f}" + ("*" if value <= 0.05 else "")


def _markdown(rows: list[RunSummary], groups: list[SeedGroup] = (), tested: Significance | None = None) -> str:
    num = _num
    head = ["run", "model", "params", "device × ranks", "precision", "batch", "steps", "epochs",
            "train min", "valid min", "tok/s", "best valid BLEU", "test BLEU", "test chrF",
            _to_target(rows), "beam-5 sent/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flags = (" (fine-tuned)" if r.init_from else "") + ("" if r.status == "finished" else " (unfinished)")
        cells = [r.run + flags, r.model, num(r.params, ","),
                 f"{r.device} × {r.ranks}", r.precision, num(r.effective_batch, ","), str(r.steps),
                 str(r.epochs), f"{r.train_minutes:.1f}", f"{r.valid_minutes:.1f}", num(r.tokens_per_s, ",.0f"),
                 num(r.best_valid_bleu, ".2f"), num(r.test_bleu, ".2f") + (" *" if r.test_note else ""),
                 num(r.test_chrf, ".2f"),
                 num(r.time_to_target_minutes, ".1f"), num(r.decode_sent_per_s, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    marks = list(rows[0].bleu_at) if rows else []
    if marks:
        lines += ["", "Best valid BLEU by training time:", "",
                  "| run | model | " + " | ".join(f"{m} min" for m in marks) + " |",
                  "|---|---|" + "---|" * len(marks)]
        for r in rows:
            lines.append(f"| {r.run} | {r.model} | " + " | ".join(num(r.bleu_at[m], ".2f") for m in marks) + " |")
    if tested is not None and any(r.test_bleu is not None for r in rows):
        lines += _significance_lines(rows, tested, bool(groups))
    if groups:
        lines += _group_lines(groups, marks, _to_target(rows))
    notes = [f"{r.run}: test BLEU of {r.test_note}" for r in rows if r.test_note]
    if notes:
        lines += ["", "\\* not the recipe's test split with the best checkpoint:", ""] + [f"- {n}" for n in notes]
    origins = [f"- {r.run}: from {r.init_from}" for r in rows if r.init_from]
    if origins:  # their training time and steps count from that checkpoint, not from scratch
        lines += ["", "Fine-tuned (time and steps counted from the starting checkpoint):", "", *origins]
    lines += _hardware_lines(rows)
    signatures = sorted({r.test_signature for r in rows if r.test_signature})
    if signatures:
        lines.append("")
        lines.append("Test BLEU signature: " + "; ".join(signatures))
    return "\n".join(lines) + "\n"


def _significance_lines(rows: list[RunSummary], tested: Significance, grouped: bool) -> list[str]:
    against = f"p-values against {tested.baseline}" if tested.baseline else "no p-values"
    lines = ["", f"Test scores with 95% confidence intervals (sacreBLEU paired bootstrap, {BOOTSTRAP_SAMPLES} "
             f"resamples); {against}:", "",
             "| run | test BLEU (μ ± 95% CI) | p (BLEU) | test chrF (μ ± 95% CI) | p (chrF) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r.test_bleu_mean is None:
            lines.append(f"| {r.run} | {r.significance_note} | | | |")
            continue
        bleu = f"{r.test_bleu:.2f} ({r.test_bleu_mean:.2f} ± {r.test_bleu_ci:.2f})"
        chrf = f"{r.test_chrf:.2f} ({r.test_chrf_mean:.2f} ± {r.test_chrf_ci:.2f})"
        p_bleu = r.significance_note if r.p_bleu is None and r.significance_note else _p(r.p_bleu)
        p_chrf = r.significance_note if r.p_chrf is None and r.significance_note else _p(r.p_chrf)
        lines.append(f"| {r.run} | {bleu} | {p_bleu} | {chrf} | {p_chrf} |")
    if any(r.test_bleu_mean is not None for r in rows):
        lines += ["", "μ ± CI: mean and half-width of the middle 95% of the scores on test sets resampled "
                  "from this one. p: how often resampling gives a difference from the baseline at least this "
                  "large by chance alone; * marks p ≤ 0.05, a difference unlikely to be chance."]
    if grouped:
        lines.append("Seed groups: the baseline is its group's first seed, and each group's p-value is its "
                     "first seed's against it.")
    lines += [f"- {note}" for note in tested.notes]
    if tested.signatures:
        lines.append("Signatures: " + "; ".join(f"{m} {sig}" for m, sig in tested.signatures.items()))
    return lines


def _spread(spread: Spread, of: int, spec: str = ".2f") -> str:
    if spread.mean is None:
        return "–"
    text = format(spread.mean, spec) + (f" ± {format(spread.sd, spec)}" if spread.sd is not None else "")
    return text + (f" (n={spread.n})" if spread.n < of else "")


def _to_target(rows: list[RunSummary]) -> str:
    """The time-to-target column's heading, naming the target ("to valid BLEU 28 (min)")."""
    target = rows[0].target if rows else None
    return "to target (min)" if target is None else f"to valid BLEU {target:g} (min)"


def _group_lines(groups: list[SeedGroup], marks: list[str], to_target: str) -> list[str]:
    head = ["recipe", "model", "seeds", "best valid BLEU", "test BLEU", "test chrF", to_target,
            "p (BLEU), first seeds", "p (chrF), first seeds"]
    lines = ["", "Seed groups: mean ± sd over the seeds (sample sd; n where fewer seeds have the value):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        n = len(g.runs)
        seeds = f"{', '.join(str(s) for s in g.seeds)} (n={n})"
        p_bleu, p_chrf = (_p(g.p_bleu), _p(g.p_chrf)) if g.p_bleu is not None else (g.p_note or "–",) * 2
        lines.append(f"| {g.recipe} | {g.model} | {seeds} | {_spread(g.best_valid_bleu, n)} | "
                     f"{_spread(g.test_bleu, n)} | {_spread(g.test_chrf, n)} | "
                     f"{_spread(g.time_to_target_minutes, n, '.1f')} | {p_bleu} | {p_chrf} |")
    if marks:
        lines += ["", "Seed groups, best valid BLEU by training time (mean ± sd):", "",
                  "| recipe | model | " + " | ".join(f"{m} min" for m in marks) + " |",
                  "|---|---|" + "---|" * len(marks)]
        for g in groups:
            cells = " | ".join(_spread(g.bleu_at[m], len(g.runs)) for m in marks)
            lines.append(f"| {g.recipe} | {g.model} | {cells} |")
    return lines


def _hardware_lines(rows: list[RunSummary]) -> list[str]:
    known = sorted({_machine(r) for r in rows if r.cpu})
    unknown = [r.run for r in rows if not r.cpu]
    lines = ["", "Trained on: " + "; ".join(known)] if known else []
    if unknown and len(rows) > 1:
        lines += ["", f"CPU not recorded (logged before nmt recorded it), compared as if alike: {', '.join(unknown)}"]
    unkinded = [r.run for r in rows if r.cpu and not r.cpu_kind]
    if unkinded and len(rows) > 1:
        lines += ["", "CPU kind not recorded (logged before nmt recorded the CPU generation and instruction set), "
                  f"matched on model name and cores only: {', '.join(unkinded)}"]
    moved = [f"{r.run} (resumed on {r.moved_to})" for r in rows if r.moved_to]
    if moved:
        lines += ["", "Trained on more than one machine: " + "; ".join(moved)]
    return lines


def mean_curve(curves: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float],
                                                                       list[float]]:
    """(times, mean, min, max) of several (times, values) curves, linearly interpolated at every
    time any of them was measured, over the span all of them cover."""
    import numpy as np

    start = max(times[0] for times, _ in curves)
    stop = min(times[-1] for times, _ in curves)
    grid = sorted({t for times, _ in curves for t in times if start <= t <= stop}) or [stop]
    values = np.array([np.interp(grid, times, ys) for times, ys in curves])  # (runs, len(grid))
    return grid, values.mean(0).tolist(), values.min(0).tolist(), values.max(0).tolist()


def plot(runs: list[Path], out: Path, target: float | None = None, speed: bool = False,
         groups: list[SeedGroup] = ()) -> None:
    """Valid BLEU against training minutes, a line per run; tokens/s below it if ``speed``.

    With seed groups: a line per group, the mean over its seeds, in a band from the lowest to the
    highest seed (over the training time all its seeds reached).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if speed else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 4 * rows), squeeze=False)
    ax = axes[0][0]
    curves, speeds, colors = [], [], {}
    for run in runs:
        records = read_log(Path(run) / "log.jsonl")
        valid = [r for r in records if r["event"] == "valid"]
        train = [r for r in records if r["event"] == "train"]
        curves.append(([r["train_seconds"] / 60 for r in valid], [r["valid_bleu"] for r in valid]))
        speeds.append(([r["train_seconds"] / 60 for r in train], [r["tokens_per_s"] for r in train]))
        if not groups:
            ax.plot(*curves[-1], marker="o", markersize=3, label=f"{Path(run).name} ({_model_kind(Path(run))})")
    for g in groups:
        members = [curves[i] for i in g.members if curves[i][0]]
        if len(members) == 1:
            line, = ax.plot(*members[0], marker="o", markersize=3, label=f"{g.recipe} ({g.model}), 1 seed")
        elif members:
            grid, mean, low, high = mean_curve(members)
            line, = ax.plot(grid, mean, label=f"{g.recipe} ({g.model}): mean of {len(members)} seeds, band min–max")
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        colors.update({i: line.get_color() for i in g.members} if members else {})
    if speed:  # a line per run, in its group's colour
        for i, run in enumerate(runs):
            axes[1][0].plot(*speeds[i], color=colors.get(i), label=f"{Path(run).name} ({_model_kind(Path(run))})")
    if target is not None:
        ax.axhline(target, linestyle="--", color="grey", label=f"target {target:g}")
    ax.set_xlabel("training time (minutes, validation excluded)")
    ax.set_ylabel("valid BLEU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if speed:
        axes[1][0].set_xlabel("training time (minutes)")
        axes[1][0].set_ylabel("target tokens/s")
        axes[1][0].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def attention_plot(src_pieces: list[str], tgt_pieces: list[str], weights, out: Path, title: str = "") -> None:
    """Heat map of (target x source) attention weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(src_pieces) + 2), max(3, 0.35 * len(tgt_pieces) + 1.5)))
    ax.imshow(weights, cmap="Greys", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90)
    ax.set_yticks(range(len(tgt_pieces)), tgt_pieces)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
