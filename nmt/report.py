"""Runs -> one table of cost and quality, and a picture of valid BLEU against training time.

Everything is read from the run directories: ``config.yaml``, ``log.jsonl`` (training and
validation clocks kept apart) and ``eval/*.json`` (``nmt eval --model`` results). The test
score shown is the evaluation of the recipe's test split with the best checkpoint; where the
run has none, the table says which evaluation it shows instead. Runs are put in one table
only when they share the tokenizer and the test set, unless asked.
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
        decode_sent_per_s=test["sentences_per_s"] if test and test.get("beam") == 5 else None,
        tokenizer_sha256=file_sha256(spm) if spm.is_file() else "",
        test_set=(test.get("ref_sha256") or Path(test["ref"]).name) if test else "",
        test_source=Path(test.get("src", "")).name if test else "",
        test_checkpoint=_checkpoint_label(test) if test else "",
        test_note=test_note,
        init_from=_origin(cfg),
        bleu_at={f"{m:g}": bleu_at(records, m) for m in at},
    )


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
    """Refuse a table of runs with different tokenizers or test sets, naming which differ."""
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


def _flat(row: RunSummary) -> dict:
    """The row as one level of named values: bleu_at becomes valid_bleu_at_<m>min columns."""
    values = asdict(row)
    for minutes, score in values.pop("bleu_at").items():
        values[f"valid_bleu_at_{minutes}min"] = score
    return values


def render(rows: list[RunSummary], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([_flat(r) for r in rows], indent=1)
    if fmt == "csv":
        flat = [_flat(r) for r in rows]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(flat[0]) if flat else [], lineterminator="\n")
        writer.writeheader()
        for values in flat:
            writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
        return out.getvalue()
    if fmt == "md":
        return _markdown(rows)
    raise NmtError(f"--format {fmt}: choose md, csv or json")


def _markdown(rows: list[RunSummary]) -> str:
    def num(value, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    head = ["run", "model", "params", "device × ranks", "precision", "batch", "steps", "epochs",
            "train min", "valid min", "tok/s", "best valid BLEU", "test BLEU", "test chrF",
            "to target (min)", "beam-5 sent/s"]
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
    notes = [f"{r.run}: test BLEU of {r.test_note}" for r in rows if r.test_note]
    if notes:
        lines += ["", "\\* not the recipe's test split with the best checkpoint:", ""] + [f"- {n}" for n in notes]
    origins = [f"- {r.run}: from {r.init_from}" for r in rows if r.init_from]
    if origins:  # their training time and steps count from that checkpoint, not from scratch
        lines += ["", "Fine-tuned (time and steps counted from the starting checkpoint):", "", *origins]
    signatures = sorted({r.test_signature for r in rows if r.test_signature})
    if signatures:
        lines.append("")
        lines.append("Test BLEU signature: " + "; ".join(signatures))
    return "\n".join(lines) + "\n"


def plot(runs: list[Path], out: Path, target: float | None = None, speed: bool = False) -> None:
    """Valid BLEU against training minutes, a line per run; tokens/s below it if ``speed``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if speed else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 4 * rows), squeeze=False)
    ax = axes[0][0]
    for run in runs:
        records = read_log(Path(run) / "log.jsonl")
        valid = [r for r in records if r["event"] == "valid"]
        label = f"{Path(run).name} ({_model_kind(Path(run))})"
        ax.plot([r["train_seconds"] / 60 for r in valid], [r["valid_bleu"] for r in valid], marker="o",
                markersize=3, label=label)
        if speed:
            train = [r for r in records if r["event"] == "train"]
            axes[1][0].plot([r["train_seconds"] / 60 for r in train], [r["tokens_per_s"] for r in train],
                            label=label)
    if target is not None:
        ax.axhline(target, linestyle="--", color="grey", label=f"target {target:g}")
    ax.set_xlabel("training time (minutes, validation excluded)")
    ax.set_ylabel("valid BLEU")
    ax.grid(alpha=0.3)
    ax.legend()
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
