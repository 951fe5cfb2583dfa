"""Where each model wins (``nmt report --breakdown``): compare-mt's two analyses of the kept test
hypotheses, each bucket with a bootstrap interval and a paired p-value against the baseline.

- ``length``: test BLEU and chrF of the sentences in each source-length bucket. A sentence's
  length is the number of words of its source line split at spaces (punctuation stays attached).
  The buckets are the same for every run: up to ``parts`` of about equal size, cut at the lengths
  nearest the quantiles, then merged until each holds at least ``min_sentences`` (``length_buckets``).
- ``frequency``: target-word precision, recall and F-measure by how often each word occurs in the
  target side of the baseline's training data (compare-mt's buckets 0, 1, 2, 3, 4, 5-9, 10-99,
  100-999, 1000+). Words are the tokens BLEU counts under the baseline's ``data.bleu_tokenize``
  (13a: punctuation split off; none: the spaces given), case kept, in the training data, the
  hypotheses and the references alike.

The resamples are sacreBLEU's (test sentences drawn with replacement, seed ``SACREBLEU_SEED``):
BLEU and chrF through ``nmt.metrics.paired_bootstrap`` on each bucket's sentences, the
F-measure from the same draws over the whole test set. The p-values of each run and metric are
Holm-corrected for the number of buckets, and both are shown.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nmt import rundir
from nmt.config import DataConfig, split_paths, train_corpora
from nmt.data import read_lines
from nmt.download import data_root
from nmt.errors import NmtError
from nmt.metrics import BOOTSTRAP_SAMPLES, DEFAULT_TOKENIZE, bleu_metric, paired_bootstrap
from nmt.report.bootstrap import find_run, kept_hypotheses, same_resamples
from nmt.report.runs import RunSummary, cached_sha256, read_config, summarize

KINDS = ("length", "frequency")
MIN_SENTENCES = 100  # fewest test sentences in a source-length bucket
LENGTH_PARTS = 5  # source-length buckets before merging
# compare-mt's frequency buckets: (lowest, highest) training count, None for no upper edge.
FREQUENCY_BUCKETS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 9), (10, 99), (100, 999), (1000, None))
SIGNIFICANT = 0.05


@dataclass
class Bucket:
    low: int
    high: int | None  # None: no upper edge
    size: int  # test sentences (length) or reference words (frequency) in it

    @property
    def label(self) -> str:
        if self.high is None:
            return f"{self.low}+"
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    def holds(self, value: int) -> bool:
        return self.low <= value and (self.high is None or value <= self.high)


@dataclass
class BucketScore:
    """One run's score on one metric in one bucket: a row of the csv and json output."""
    breakdown: str  # "length" or "frequency"
    bucket: str  # "9-10", "1000+"
    low: int
    high: int | None
    size: int  # sentences (length) or reference words (frequency) in the bucket
    run: str
    metric: str  # "BLEU", "chrF2" or "F" (word F-measure, in %)
    score: float
    mean: float  # over the bootstrap resamples
    ci: float  # half-width of their middle 95%
    p: float | None  # paired bootstrap p-value against the baseline; None for the baseline
    p_holm: float | None  # Holm-corrected over the buckets of this run and metric
    note: str = ""  # "baseline", or why there is no p-value
    hyp_words: int | None = None  # frequency: the run's words in the bucket
    matches: int | None = None  # frequency: those that match a reference word
    precision: float | None = None  # frequency: matches / hyp_words, in %
    recall: float | None = None  # frequency: matches / reference words, in %


@dataclass
class Breakdown:
    kinds: list[str]
    runs: list[str]
    baseline: str
    scores: list[BucketScore]
    n_samples: int
    min_sentences: int
    parts: int
    frequency_source: str = ""  # the training files the word counts come from
    words: str = DEFAULT_TOKENIZE  # the sacreBLEU tokenization that splits lines into words (frequency)
    notes: list[str] = dataclasses.field(default_factory=list)


# --- buckets ---------------------------------------------------------------------------------

def length_buckets(lengths: list[int], min_sentences: int = MIN_SENTENCES, parts: int = LENGTH_PARTS) -> list[Bucket]:
    """Source-length buckets holding every sentence, each at least ``min_sentences`` of them.

    Cut after the length whose cumulative count is nearest each of ``parts - 1`` quantiles (a
    length is never split, so buckets are about equal, not equal); then the smallest bucket
    under ``min_sentences`` joins its smaller neighbour, until none is under it (or one is left).
    """
    counts = Counter(lengths)
    values = sorted(counts)
    cumulative = np.cumsum([counts[v] for v in values])
    cuts = {int(np.argmin(np.abs(cumulative - k * len(lengths) / parts))) for k in range(1, parts)}
    cuts.add(len(values) - 1)
    buckets, start = [], 0
    for end in sorted(cuts):
        buckets.append(Bucket(values[start], values[end], int(sum(counts[v] for v in values[start:end + 1]))))
        start = end + 1
    while len(buckets) > 1 and min(b.size for b in buckets) < min_sentences:
        i = min(range(len(buckets)), key=lambda j: buckets[j].size)
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(buckets)]
        j = min(neighbours, key=lambda k: buckets[k].size)
        a, b = sorted((i, j))
        buckets[a:b + 1] = [Bucket(buckets[a].low, buckets[b].high, buckets[a].size + buckets[b].size)]
    return buckets


def frequency_bucket(count: int) -> int:
    """The index in ``FREQUENCY_BUCKETS`` of a word seen ``count`` times in training."""
    return next(i for i, (_, high) in enumerate(FREQUENCY_BUCKETS) if high is None or count <= high)


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenize: str):
    return bleu_metric(tokenize).tokenizer


def words(line: str, tokenize: str = DEFAULT_TOKENIZE) -> list[str]:
    """The words of a line as BLEU counts them under sacreBLEU's ``tokenize``, case kept."""
    return _tokenizer(tokenize)(line.rstrip("\n")).split()


def word_stats(hyp: list[str], ref: list[str], counts: Counter) -> np.ndarray:
    """(buckets, 3) counts of one sentence: matched words, hypothesis words, reference words.

    A hypothesis word matches when the reference has that word, each reference occurrence
    matched once (compare-mt's matching); every word goes to its training-frequency bucket.
    """
    stats = np.zeros((len(FREQUENCY_BUCKETS), 3), dtype=np.int64)
    in_ref, in_hyp = Counter(ref), Counter(hyp)
    for word, n in in_ref.items():
        stats[frequency_bucket(counts[word]), 2] += n
    for word, n in in_hyp.items():
        b = frequency_bucket(counts[word])
        stats[b, 1] += n
        stats[b, 0] += min(n, in_ref[word])
    return stats


def f_measure(stats: np.ndarray) -> np.ndarray:
    """F-measure in % from (..., 3) sums of matches, hypothesis and reference words; 0 where
    either precision or recall is 0 or undefined (as compare-mt)."""
    matches, hyp, ref = (stats[..., k].astype(float) for k in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(hyp > 0, matches / hyp, 0.0)
        recall = np.where(ref > 0, matches / ref, 0.0)
        both = precision + recall
        return np.where(both > 0, 200 * precision * recall / np.where(both > 0, both, 1), 0.0)


# --- significance ----------------------------------------------------------------------------

def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down correction of a family of p-values (None: not tested, left out)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def _resample_counts(n: int, n_samples: int) -> np.ndarray:
    """(n_samples, n): how often each sentence is drawn in each resample, sacreBLEU's draws."""
    seed = os.environ.get("SACREBLEU_SEED", "12345")
    rng = np.random.default_rng(None if seed.lower() == "none" else int(seed) or None)  # 0 too, as sacreBLEU
    idxs = rng.choice(n, size=(n_samples, n), replace=True)
    rows = np.arange(n_samples)[:, None] * n
    return np.bincount((rows + idxs).ravel(), minlength=n_samples * n).reshape(n_samples, n)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """sacreBLEU's mean and 95% half-width of bootstrap scores (``significance.estimate_ci``)."""
    from sacrebleu.significance import estimate_ci

    mean, ci = estimate_ci(samples)
    return float(mean), float(ci)


def _p_value(system: np.ndarray, base: np.ndarray, real: float) -> float:
    """sacreBLEU's paired bootstrap p-value: how often a resampled |difference|, centred, exceeds the real one."""
    diffs = np.abs(system - base)
    return float((np.sum(diffs - diffs.mean() > real) + 1) / (len(diffs) + 1))


# --- the test set and training counts of the runs --------------------------------------------

@dataclass
class _TestSet:
    source: list[str]
    refs: list[str]
    hyps: list[list[str]]  # per run
    notes: list[str]


def _data_config(cfg: dict) -> DataConfig:
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    known = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in data.items() if k in known})


def _record(run: Path, hyp_name: str) -> dict:
    """The evaluation record (``eval/*.json``) that kept ``hyp_name``."""
    for path in sorted((run / rundir.EVAL_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("hyp") == hyp_name:
            return record
    return {}


def _data_file(recorded: str, sha256: str, fallback: Path | None, what: str, run: str) -> Path:
    """The file an evaluation read: where it recorded it, else the recipe's file under $NMT_DATA,
    whichever has its content (by sha256 where recorded, else by name)."""
    for path in (Path(recorded), fallback):
        if path is None or not path.is_file():
            continue
        if (cached_sha256(path, path.stat().st_mtime_ns) == sha256) if sha256 else path.name == Path(recorded).name:
            return path
    raise NmtError(f"--breakdown: the test {what} {recorded} that {run} was scored on is missing or changed since; "
                   f"set NMT_DATA to the directory holding it (now {data_root()}; nmt data multi30k downloads "
                   "Multi30k), or re-run nmt eval on the file as it is now")


def _hypotheses(run: Path, row: RunSummary, test_files: tuple[Path, Path] | None) -> list[str]:
    """A run's kept test hypotheses, or an error saying how to keep them."""
    found = kept_hypotheses(row)
    if isinstance(found, str):
        src, ref = test_files or ("SRC", "REF")
        raise NmtError(f"--breakdown: {run}: {found}; run nmt eval --model {run} --src {src} --ref {ref} to keep "
                       f"them in {run / rundir.EVAL_DIR}/")
    return found


def _test_set(runs: list[Path], rows: list[RunSummary]) -> _TestSet:
    """Source, references and every run's hypotheses, checked to be one test set."""
    hyps, files, notes = [], [], []
    for run, row in zip(runs, rows):
        cfg = _data_config(read_config(run))
        test_files = split_paths(cfg, "test") if cfg.test else None
        hyps.append(_hypotheses(run, row, test_files))
        record = _record(run, Path(row.test_hyp).name)
        found = tuple(_data_file(record.get(key, ""), record.get(f"{key}_sha256", ""),
                                 test_files[i] if test_files else None, what, row.run)
                      for i, (key, what) in enumerate((("src", "source"), ("ref", "reference"))))
        files.append(found)
        if row.test_note:
            notes.append(f"{row.run}: the hypotheses of {row.test_note}")
    for row, pair in zip(rows[1:], files[1:]):
        if [cached_sha256(p, p.stat().st_mtime_ns) for p in pair] != \
                [cached_sha256(p, p.stat().st_mtime_ns) for p in files[0]]:
            raise NmtError(f"--breakdown compares runs on one test set: {rows[0].run} was scored on "
                           f"{files[0][0]} -> {files[0][1]}, {row.run} on {pair[0]} -> {pair[1]}; "
                           "evaluate them on the same files")
    source, refs = read_lines(files[0][0]), read_lines(files[0][1])
    if len(source) != len(refs):
        raise NmtError(f"--breakdown: {files[0][0]} has {len(source)} lines but {files[0][1]} has {len(refs)}")
    for row, lines in zip(rows, hyps):
        if len(lines) != len(refs):
            raise NmtError(f"--breakdown: {row.test_hyp} has {len(lines)} lines against {len(refs)} references; "
                           "re-run nmt eval")
    return _TestSet(source, refs, hyps, notes)


def _training_targets(run: Path) -> list[tuple[str, Path]]:
    """(recipe key, file) of the target side of every corpus the run trains on (``data.train``)."""
    return [(corpus.name, corpus.tgt) for corpus in train_corpora(_data_config(read_config(run)))]


def training_counts(paths: list[Path], tokenize: str = DEFAULT_TOKENIZE) -> Counter:
    """How often each word (``words``) occurs in the files (each file once, whatever its sampling weight)."""
    counts: Counter = Counter()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                counts.update(words(line, tokenize))
    return counts


# --- the two breakdowns ----------------------------------------------------------------------

def _length_scores(test: _TestSet, names: list[str], base: int, min_sentences: int, parts: int,
                   n_samples: int, tokenize: str) -> list[BucketScore]:
    lengths = [len(line.split()) for line in test.source]
    scores = []
    order = sorted(range(len(names)), key=lambda k: k != base)  # the baseline first, as sacreBLEU wants
    for bucket in length_buckets(lengths, min_sentences, parts):
        chosen = [i for i, n in enumerate(lengths) if bucket.holds(n)]
        systems = [(str(k), [test.hyps[k][i] for i in chosen]) for k in order]
        results, _ = paired_bootstrap(systems, [test.refs[i] for i in chosen], n_samples, tokenize)
        for k in order:
            for metric in ("BLEU", "chrF2"):
                r, b = results[str(k)][metric], results[str(base)][metric]
                p, note = r.p_value, ""
                if k == base:
                    note = "baseline"
                elif systems[order.index(k)][1] == systems[0][1]:
                    p, note = None, "identical to the baseline's output"
                elif same_resamples(r, b):
                    p, note = None, "same as the baseline on every resample"
                scores.append(BucketScore("length", bucket.label, bucket.low, bucket.high, bucket.size, names[k],
                                          metric, r.score, r.mean, r.ci, p, None, note))
    return scores


def _frequency_scores(test: _TestSet, names: list[str], base: int, counts: Counter,
                      n_samples: int, tokenize: str) -> list[BucketScore]:
    refs = [words(line, tokenize) for line in test.refs]
    stats = np.stack([np.stack([word_stats(words(h, tokenize), r, counts) for h, r in zip(hyps, refs)])
                      for hyps in test.hyps])  # (runs, sentences, buckets, 3)
    totals = stats.sum(1)  # (runs, buckets, 3)
    draws = _resample_counts(stats.shape[1], n_samples)  # (n_samples, sentences)
    resampled = np.stack([(draws @ run.reshape(len(run), -1).astype(float)).reshape(n_samples, *run.shape[1:])
                          for run in stats])  # (runs, n_samples, buckets, 3)
    f_samples, f_real = f_measure(resampled), f_measure(totals)  # (runs, n_samples, buckets), (runs, buckets)
    scores = []
    for b, (low, high) in enumerate(FREQUENCY_BUCKETS):
        size = int(totals[0, b, 2])
        if size == 0 and not totals[:, b, 1].any():
            continue  # no word of the test set or of any output has this frequency
        for k in sorted(range(len(names)), key=lambda k: k != base):
            mean, ci = _interval(f_samples[k, :, b])
            p, note = None, "baseline"
            if k != base and test.hyps[k] == test.hyps[base]:
                note = "identical to the baseline's output"
            elif k != base and np.array_equal(f_samples[k, :, b], f_samples[base, :, b]):
                # sacreBLEU's test would give this its smallest p-value, as if it differed
                note = "same as the baseline on every resample"
            elif k != base:
                p, note = _p_value(f_samples[k, :, b], f_samples[base, :, b], abs(f_real[k, b] - f_real[base, b])), ""
            matches, hyp = (int(v) for v in totals[k, b, :2])
            scores.append(BucketScore("frequency", Bucket(low, high, size).label, low, high, size, names[k], "F",
                                      float(f_real[k, b]), mean, ci, p, None, note, hyp, matches,
                                      100 * matches / hyp if hyp else None, 100 * matches / size if size else None))
    return scores


def _corrected(scores: list[BucketScore]) -> list[BucketScore]:
    """The scores with Holm's correction over the buckets of each breakdown, run and metric."""
    families: dict[tuple, list[int]] = {}
    for i, s in enumerate(scores):
        families.setdefault((s.breakdown, s.run, s.metric), []).append(i)
    out = list(scores)
    for members in families.values():
        for i, p in zip(members, holm([scores[i].p for i in members])):
            out[i] = dataclasses.replace(scores[i], p_holm=p)
    return out


def breakdown(runs: list[Path], kinds: list[str], baseline: str | None = None,
              min_sentences: int = MIN_SENTENCES, parts: int = LENGTH_PARTS,
              n_samples: int = BOOTSTRAP_SAMPLES) -> Breakdown:
    """The runs' test scores by source length and/or word F-measure by training frequency.

    Every run needs its kept test hypotheses (``nmt eval --model``) on one test set; the
    baseline (default the first run) gives the p-values and, for ``frequency``, the training data.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise NmtError(f"--breakdown {unknown[0] if unknown else ''}: choose length or frequency "
                       "(repeat --breakdown for both)")
    if min_sentences < 1 or parts < 1:
        raise NmtError("--bucket-min and --buckets must be at least 1")
    runs = [Path(run) for run in runs]
    rows = [summarize(run) for run in runs]
    names = [row.run for row in rows]
    base = find_run(rows, baseline) if baseline else 0
    test = _test_set(runs, rows)
    kinds = [k for k in KINDS if k in kinds]
    found = Breakdown(kinds, names, names[base], [], n_samples, min_sentences, parts, notes=list(test.notes))
    if "length" in kinds:
        # BLEU's words as the baseline's recipe scores them (data.bleu_tokenize)
        found.scores += _length_scores(test, names, base, min_sentences, parts, n_samples, rows[base].bleu_tokenize)
    if "frequency" in kinds:
        targets = _training_targets(runs[base])
        for key, path in targets:
            if not path.is_file():
                raise NmtError(f"--breakdown frequency: {names[base]}'s training data {path} ({key}) is missing; set "
                               f"NMT_DATA to the directory holding it (now {data_root()}; nmt data multi30k downloads "
                               "Multi30k)")
        paths = [path for _, path in targets]
        others = [names[i] for i, run in enumerate(runs) if i != base and _training_targets(run) != targets]
        if others:
            found.notes.append(f"{', '.join(others)} trained on other data than {names[base]}; their words are "
                               f"bucketed by {names[base]}'s training counts all the same")
        found.frequency_source = ", ".join(str(p) for p in paths)
        found.words = rows[base].bleu_tokenize
        found.scores += _frequency_scores(test, names, base, training_counts(paths, found.words), n_samples,
                                          found.words)
    found.scores = _corrected(found.scores)
    return found


# --- output ----------------------------------------------------------------------------------

def _words_label(tokenize: str) -> str:
    return "the tokens given, split at spaces (tok:none)" if tokenize == "none" else f"sacreBLEU's {tokenize} tokens"


def render_breakdown(found: Breakdown, fmt: str) -> str:
    """The breakdown as md (a table per analysis, with what its buckets are), or as csv or json
    with one flat row per breakdown, bucket, run and metric."""
    flat = [dataclasses.asdict(s) for s in found.scores]
    if fmt == "json":
        return json.dumps(flat, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[f.name for f in dataclasses.fields(BucketScore)],
                                lineterminator="\n")
        writer.writeheader()
        for values in flat:
            writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
        return out.getvalue()
    if fmt == "md":
        return _markdown(found)
    raise NmtError(f"--format {fmt}: choose md, csv or json")


def _p(score: BucketScore) -> str:
    """``0.0120 (0.0480*)``: the p-value and its Holm correction, * where the corrected one is at most 0.05."""
    if score.p is None:
        return score.note or "–"
    star = "*" if score.p_holm is not None and score.p_holm <= SIGNIFICANT else ""
    return f"{score.p:.4f} ({score.p_holm:.4f}{star})"


def _interval_cell(s: BucketScore) -> str:
    return f"{s.score:.2f} ({s.mean:.2f} ± {s.ci:.2f})"


def _by_bucket(scores: list[BucketScore], kind: str) -> dict[str, list[BucketScore]]:
    found: dict[str, list[BucketScore]] = {}
    for s in scores:
        if s.breakdown == kind:
            found.setdefault(s.bucket, []).append(s)
    return found


def _markdown(found: Breakdown) -> str:
    lines: list[str] = []
    against = (f"paired bootstrap over {found.n_samples} resampled test sets, p-values against {found.baseline} "
               "and, in brackets, Holm-corrected for the number of buckets")
    if "length" in found.kinds:
        buckets = _by_bucket(found.scores, "length")
        lines += [f"Test BLEU and chrF by source length (words of the source line split at spaces; up to "
                  f"{found.parts} buckets of about equal size, cut at the lengths nearest the quantiles, a bucket "
                  f"under {found.min_sentences} sentences merged with its smaller neighbour; the same buckets for "
                  f"every run); {against}:", "",
                  "| source words | sentences | run | BLEU (μ ± 95% CI) | p (Holm) | chrF (μ ± 95% CI) | p (Holm) |",
                  "|---|---|---|---|---|---|---|"]
        for label, scores in buckets.items():
            for i, run in enumerate(dict.fromkeys(s.run for s in scores)):
                bleu, chrf = (next(s for s in scores if s.run == run and s.metric == m) for m in ("BLEU", "chrF2"))
                head = f"| {label} | {bleu.size} |" if i == 0 else "| | |"
                lines.append(f"{head} {run} | {_interval_cell(bleu)} | {_p(bleu)} | {_interval_cell(chrf)} | "
                             f"{_p(chrf)} |")
        lines.append("")
    if "frequency" in found.kinds:
        lines += [f"Target-word F-measure by training frequency (words: {_words_label(found.words)}, case kept; "
                  f"frequency: the word's count in the target side of {found.baseline}'s training data, "
                  f"{found.frequency_source}). Precision: the run's words of the bucket that match a reference "
                  "word (each reference word matched once); recall: the reference words of the bucket matched; "
                  f"F and both in %; {against}:", "",
                  "| training frequency | reference words | run | words | precision | recall | F (μ ± 95% CI) | "
                  "p (Holm) |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, scores in _by_bucket(found.scores, "frequency").items():
            for i, s in enumerate(scores):
                head = f"| {label} | {s.size:,} |" if i == 0 else "| | |"
                pct = ["–" if v is None else f"{v:.2f}" for v in (s.precision, s.recall)]
                lines.append(f"{head} {s.run} | {s.hyp_words:,} | {pct[0]} | {pct[1]} | {_interval_cell(s)} | "
                             f"{_p(s)} |")
        lines.append("")
    lines.append("μ ± CI: mean and half-width of the middle 95% of the bucket's scores over resampled test sets "
                 "(sacreBLEU's resamples, seed SACREBLEU_SEED). p (Holm): how often resampling gives a difference "
                 "from the baseline at least this large by chance, then corrected for testing every bucket; "
                 "* marks a corrected p ≤ 0.05.")
    lines += [f"- {note}" for note in found.notes]
    return "\n".join(lines) + "\n"


def plot_breakdown(found: Breakdown, out: Path) -> None:
    """A panel per metric (BLEU and chrF by source length, word F by training frequency): each run's
    score with its 95% interval per bucket; filled where the Holm-corrected p is at most 0.05."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(kind, metric) for kind, metrics in (("length", ("BLEU", "chrF2")), ("frequency", ("F",)))
              if kind in found.kinds for metric in metrics]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.6 * len(panels)), squeeze=False)
    for ax, (kind, metric) in zip(axes[:, 0], panels):
        buckets = _by_bucket([s for s in found.scores if s.metric == metric], kind)
        width = 0.7 / max(1, len(found.runs))
        for r, run in enumerate(found.runs):
            points = [(x, s) for x, scores in enumerate(buckets.values()) for s in scores if s.run == run]
            xs = [x + (r - (len(found.runs) - 1) / 2) * width for x, _ in points]
            color = f"C{r}"
            ax.errorbar(xs, [s.mean for _, s in points], yerr=[s.ci for _, s in points], fmt="none", capsize=3,
                        color=color)
            strong = [s.note == "baseline" or (s.p_holm is not None and s.p_holm <= SIGNIFICANT) for _, s in points]
            ax.scatter(xs, [s.score for _, s in points], color=color, zorder=3,
                       facecolors=[color if f else "white" for f in strong])
            ax.plot([], [], "o", color=color, label=run)  # the legend's marker, filled whatever the points
        ax.set_xticks(range(len(buckets)))
        ax.set_xticklabels([f"{label}\n({scores[0].size:,})" for label, scores in buckets.items()], fontsize="small")
        ax.set_xlabel("source words (test sentences)" if kind == "length"
                      else "training frequency of the word (reference words)")
        ax.set_ylabel(f"{'word F (%)' if metric == 'F' else metric}")
        what = "word F-measure by training frequency" if kind == "frequency" else f"{metric} by source length"
        ax.set_title(f"{what} (hollow: Holm-corrected p > {SIGNIFICANT} against {found.baseline})", fontsize="small")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
