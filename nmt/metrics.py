"""BLEU, chrF and the paired bootstrap test, with sacreBLEU, on detokenized text against raw references.

Its one job is scoring: validation during training, ``nmt eval`` and ``nmt report`` call the
same functions, so the number a run reports is the number the sacrebleu command line gives on
the same files.

BLEU's tokenization is sacreBLEU's ``tokenize`` (a run's ``data.bleu_tokenize``): ``13a`` (its
default) for raw text, ``none`` for text that is already tokenized, where the spaces given are
the words BLEU counts. The signature names it (``tok:none``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF

from nmt.errors import NmtError


@dataclass
class Score:
    metric: str  # "BLEU" or "chrF2"
    score: float
    signature: str
    verbose: str  # sacreBLEU's detail: n-gram precisions, brevity penalty, lengths

    def line(self, width: int = 1) -> str:
        """The line ``sacrebleu -f text -w WIDTH`` prints."""
        return f"{self.metric}|{self.signature} = {self.score:.{width}f} {self.verbose}".rstrip()

    def to_json(self, width: int = 1) -> dict:
        """The object ``sacrebleu -w WIDTH`` prints as JSON."""
        out = {"name": self.metric, "score": round(self.score, width), "signature": self.signature}
        if self.verbose:
            out["verbose_score"] = self.verbose
        out.update(part.split(":", 1) for part in self.signature.split("|"))
        return out


# sacreBLEU's BLEU tokenizations (its command line's --tokenize choices) and its default.
BLEU_TOKENIZERS: tuple[str, ...] = tuple(BLEU.TOKENIZERS)
DEFAULT_TOKENIZE = BLEU.TOKENIZER_DEFAULT  # "13a"


def check_tokenize(name: str, where: str = "BLEU tokenization") -> None:
    """Refuse a name that is not one of sacreBLEU's BLEU tokenizations, in one line."""
    if name not in BLEU_TOKENIZERS:
        raise NmtError(f"{where} {name!r}: not one of sacreBLEU's tokenizations; choose from "
                       f"{', '.join(BLEU_TOKENIZERS)} (13a for raw text, none for text already tokenized)")


def bleu_metric(tokenize: str = DEFAULT_TOKENIZE) -> BLEU:
    """sacreBLEU's BLEU with the given tokenization; one that cannot load here is one line saying why.

    ja-mecab and ko-mecab need sacreBLEU's extras (``pip install "sacrebleu[ja]"``, ``[ko]``); the
    flores and spm ones download a SentencePiece model on first use.
    """
    check_tokenize(tokenize)
    try:
        # none scores tokenized text on purpose: sacreBLEU's "forgot to detokenize?" warning (its
        # force) would only repeat at every validation. force changes no score and no signature.
        return BLEU(tokenize=tokenize, force=tokenize == "none")
    except (ImportError, RuntimeError, OSError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise NmtError(f"BLEU tokenization {tokenize}: sacreBLEU cannot load it here ({why})") from None


def signature_tokenize(signature: str) -> str:
    """The tokenization a BLEU signature names (``...|tok:none|...`` -> ``none``); 13a where it names none."""
    for part in signature.split("|"):
        key, _, value = part.partition(":")
        if key == "tok" and value:
            return value
    return DEFAULT_TOKENIZE


def _check(hyps: list[str], refs: list[str], hyp_name: str, ref_name: str) -> None:
    if len(hyps) != len(refs):
        raise NmtError(f"{hyp_name} has {len(hyps)} lines but {ref_name} has {len(refs)}; "
                       "hypotheses and references must be line-aligned")
    if not refs:  # sacreBLEU has no score for an empty corpus (as its command line says)
        raise NmtError(f"{hyp_name} and {ref_name} have no lines: there is nothing to score")


def bleu(hyps: list[str], refs: list[str], hyp_name: str = "hypotheses",
         ref_name: str = "references", tokenize: str = DEFAULT_TOKENIZE) -> Score:
    _check(hyps, refs, hyp_name, ref_name)
    metric = bleu_metric(tokenize)
    result = metric.corpus_score(hyps, [refs])
    verbose = str(result)[len(f"BLEU = {result.score:.2f} "):]
    return Score("BLEU", result.score, str(metric.get_signature()), verbose)


def chrf(hyps: list[str], refs: list[str], hyp_name: str = "hypotheses",
         ref_name: str = "references") -> Score:
    _check(hyps, refs, hyp_name, ref_name)
    metric = CHRF()
    result = metric.corpus_score(hyps, [refs])
    return Score("chrF2", result.score, str(metric.get_signature()), "")


# --- confidence intervals and paired significance ----------------------------------------------

BOOTSTRAP_SAMPLES = 1000


@dataclass
class Interval:
    """One system's score on one metric, as sacreBLEU's paired bootstrap test gives it."""
    score: float
    mean: float  # the mean over bootstrap resamples
    ci: float  # half-width of the 95% interval around ``mean``: sacreBLEU prints ``mean ± ci``
    p_value: float | None  # against the baseline (the first system); None for the baseline itself


def paired_bootstrap(systems: list[tuple[str, list[str]]], refs: list[str], n_samples: int = BOOTSTRAP_SAMPLES,
                     tokenize: str = DEFAULT_TOKENIZE) -> tuple[dict[str, dict[str, Interval]], dict[str, str]]:
    """sacreBLEU's paired bootstrap test of every system against the first, on BLEU (tokenized by
    ``tokenize``) and chrF.

    Returns ({system: {"BLEU": Interval, "chrF2": Interval}}, {metric: signature}). The resamples
    come from ``SACREBLEU_SEED`` (default 12345), as on sacreBLEU's command line, so
    ``sacrebleu REF -i SYS1 SYS2 -m bleu chrf --paired-bs`` prints the same numbers.
    """
    from sacrebleu.significance import PairedTest

    for name, hyps in systems:
        _check(hyps, refs, name, "the reference")
    metrics = {"BLEU": bleu_metric(tokenize), "chrF2": CHRF()}
    test = PairedTest(systems, metrics, [refs], test_type="bs", n_samples=n_samples)
    signatures, columns = test()
    results: dict[str, dict[str, Interval]] = {name: {} for name, _ in systems}
    for metric, values in columns.items():
        if metric == "System":
            continue
        for (name, _), r in zip(systems, values):
            results[name][metric] = Interval(float(r.score), float(r.mean), float(r.ci),
                                             None if r.p_value is None else float(r.p_value))
    return results, {metric: str(sig) for metric, sig in signatures.items()}


def format_scores(scores: list[Score], as_json: bool, width: int = 1) -> str:
    """The scores as ``nmt eval --bleu/--chrf`` prints them: sacreBLEU's lines, or its JSON."""
    if as_json:
        items = [s.to_json(width) for s in scores]
        return json.dumps(items[0] if len(items) == 1 else items, indent=1, ensure_ascii=False)
    return "\n".join(s.line(width) for s in scores)
