"""Recipes: typed dataclasses, stored as YAML.

A recipe is a YAML file with the sections ``data``, ``tokenizer``, ``model``, ``train``
and ``search``. Every key is checked against the dataclasses below: an unknown key or a
value of the wrong type is an error naming the key and what is valid. The ``model``
section is chosen by ``model.kind``; each kind has its own dataclass, so a key that
belongs to another kind is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nmt.download import data_root
from nmt.errors import NmtError

log = logging.getLogger("nmt")


@dataclass
class DataConfig:
    src_lang: str = "en"
    tgt_lang: str = "de"
    # A directory holding {train,valid,test}.{lang}; relative paths are read under $NMT_DATA.
    dir: str = "multi30k"
    # A prefix (train -> DIR/train.{src_lang,tgt_lang}; one with a "/" is a path prefix), or a
    # list of corpora with sampling weights: [{path: train}, {path: /data/bt, weight: 0.5}].
    # Each epoch takes round(weight * pairs) pairs of each corpus (see nmt.batching.draw_epoch).
    train: str | list = "train"
    valid: str = "valid"
    test: str = "test2016"
    # Training pairs longer than this (in subword tokens, either side) are dropped and counted.
    max_len: int = 100
    # How BLEU splits this data's references and the translations into words: one of sacreBLEU's
    # tokenizations, for every BLEU of the run (validation, nmt eval --model, sweeps, nmt report).
    # 13a (sacreBLEU's default) for raw text; none for text already tokenized (the spaces given are
    # the words); zh, ja-mecab, ... for raw text in those languages. Signatures name it (tok:none).
    bleu_tokenize: str = "13a"

    def __post_init__(self) -> None:
        # An entry's weight written out (1.0 when left out): the saved config.yaml says what each
        # corpus weighed, and {path: x} and {path: x, weight: 1.0} are the same data at resume.
        if isinstance(self.train, list):
            self.train = [{**e, "weight": e.get("weight", 1.0)} if isinstance(e, dict) else e for e in self.train]


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    model_type: str = "unigram"
    # Reuse the SentencePiece model of another run (a run directory or a .model file), so
    # that two models compared with each other see exactly the same subwords.
    reuse: str | None = None
    # Lines per side drawn uniformly from the training files to train SentencePiece on
    # (nmt prepare); a corpus with fewer lines gives all of them.
    sample_sentences: int = 1_000_000


@dataclass
class TransformerConfig:
    kind: str = "transformer"
    d_model: int = 256
    heads: int = 4
    ffn: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    # Longest source or target the positions table covers; longer input is truncated.
    max_positions: int = 256


@dataclass
class GNMTConfig:
    kind: str = "gnmt"
    embed_dim: int = 256
    hidden: int = 256
    encoder_layers: int = 2  # the first is bidirectional
    decoder_layers: int = 2
    dropout: float = 0.2
    # Longest source or target accepted; longer input is truncated.
    max_positions: int = 256


MODEL_CONFIGS: dict[str, type] = {"transformer": TransformerConfig, "gnmt": GNMTConfig}


@dataclass
class TrainConfig:
    seed: int = 1
    max_tokens: int = 4096  # padded tokens per batch (source or target, the larger)
    update_freq: int = 1
    lr: float = 7e-4
    warmup_steps: int = 1000
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    max_steps: int = 0  # 0: no limit
    max_epochs: int = 0
    max_minutes: float = 0.0  # training clock, validation excluded
    valid_every: int = 500
    valid_beam: int = 1
    # Valid BLEU is measured on the first N sentences of the valid split (0: all of them);
    # the valid loss always covers the whole split.
    valid_max_sentences: int = 0
    patience: int = 0  # validations without a better valid BLEU before stopping; 0: never
    log_every: int = 50
    keep_last: int = 5  # step checkpoints kept for averaging
    average_last: int = 0  # average this many last step checkpoints into averaged.pt at the end
    threads: int = 0  # torch intra-op threads; 0: the cores this process may use, shared among a node's ranks
    precision: str = "fp32"
    # fp32 on CUDA: matmuls in TF32 (cuDNN's convolutions and RNNs use it by default anyway);
    # null: on where it applies. Ignored, with one line, on the CPU.
    tf32: bool | None = None
    # GNMT under bf16 or fp16 on CUDA: the LSTMs' dtype (fp32, TF32 where allowed, or bf16),
    # never autocast's (which would run cuDNN's RNNs in fp16 whatever the autocast dtype).
    lstm_dtype: str = "fp32"
    # Several ranks: gradients travel in buckets during the last micro-batch's backward pass
    # (PyTorch's DistributedDataParallel); false: after it, all at once, which lets a rank that
    # runs out of memory in any micro-batch split it (see README, "Several GPUs").
    overlap: bool = True
    bucket_cap_mb: float = 25.0  # DistributedDataParallel's bucket size
    grad_compression: str = "none"  # none | bf16: gradients travel as bf16 (half the bytes)
    # Collate (and pin) the next update's micro-batches on a thread while this one trains;
    # null: on CUDA only (on a 2-core CPU the thread competes with the intra-op threads).
    prefetch: bool | None = None
    # How long a collective may wait for a peer before the job fails (torch's default is 30 min).
    dist_timeout_minutes: float = 10.0
    # Also write the logged scalars to RUN/tb/ for TensorBoard (needs the tensorboard package).
    tensorboard: bool = False


@dataclass
class SearchConfig:
    beam: int = 5
    length_penalty: float = 0.6
    coverage_penalty: float = 0.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    n_best: int = 1
    max_tokens: int = 6000  # source tokens per decoding batch
    max_sentences: int = 128
    # Decode with an int8 copy of the model (dynamic quantization; CPU only, ignored on a GPU).
    int8: bool = False
    # Fewest target tokens before EOS may end a sentence (1: a non-empty input never gets an
    # empty translation).
    min_len: int = 1
    # When beam search retires a sentence: "standard" once it has `beam` finished hypotheses,
    # "exact" once no alive hypothesis can still beat the n_best-th finished one (slower).
    stop: str = "standard"
    # Draw translations instead of searching (back-translation): "none", "topk:K" (among the K
    # most probable tokens) or "topp:P" (among the fewest tokens holding probability P); beam
    # and penalties are then not used, n_best is the number of samples per sentence.
    sampling: str = "none"
    temperature: float = 1.0  # log-probs are divided by it before sampling
    seed: int = 0  # with the input line number, fixes every draw (any batch size gives the same)
    # A vocabulary shortlist when a run is loaded to translate (nmt translate, nmt eval --model):
    # "FIRST,BEST", each sentence's output layer over the FIRST most frequent target pieces
    # and the BEST translations of each of its source pieces (RUN/shortlist.npz, built by
    # `nmt shortlist RUN`); "" (or "none"): the whole vocabulary. Not used in training's validation.
    shortlist: str = ""

    def __post_init__(self) -> None:
        # Checked here, not in _validate, so that settings from the command line and from
        # a run's search.yaml (dataclasses.replace) are checked too.
        self.sampling_rule()
        self.shortlist_sizes()
        if not self.temperature > 0:
            raise NmtError(f"search.temperature (--temperature) {self.temperature}: must be above 0 "
                           "(1 samples from the model's distribution, below 1 sharpens it)")
        if self.stop not in ("standard", "exact"):
            raise NmtError(f"search.stop must be standard or exact, got {self.stop!r}")
        if self.min_len < 0:
            raise NmtError(f"search.min_len must be 0 or more, got {self.min_len}")
        if self.coverage_penalty < 0:
            raise NmtError(f"search.coverage_penalty must be 0 or more (a negative beta rewards "
                           f"leaving the source untranslated), got {self.coverage_penalty}")

    def shortlist_sizes(self) -> tuple[int, int] | None:
        """``shortlist`` parsed: None (the whole vocabulary) or (FIRST, BEST)."""
        if self.shortlist in ("", "none"):
            return None
        where = f"search.shortlist (--shortlist) {self.shortlist!r}"
        try:
            first, best = (int(v) for v in self.shortlist.split(","))
        except ValueError:
            raise NmtError(f"{where}: give FIRST,BEST, two whole numbers as in 100,100 (or none)") from None
        if first < 1 or best < 1:
            raise NmtError(f"{where}: FIRST and BEST must be at least 1 (the most frequent target pieces, "
                           "the translations kept per source piece)")
        return first, best

    def sampling_rule(self) -> tuple[str, float] | None:
        """``sampling`` parsed: None (search), ("topk", K) or ("topp", P)."""
        if self.sampling == "none":
            return None
        kind, _, value = self.sampling.partition(":")
        where = f"search.sampling (--sampling) {self.sampling!r}"
        if kind == "topk":
            try:
                k = int(value)
            except ValueError:
                raise NmtError(f"{where}: K must be a whole number, as in topk:10") from None
            if k < 1:
                raise NmtError(f"{where}: K must be at least 1 (topk:1 is greedy search)")
            return kind, k
        if kind == "topp":
            try:
                p = float(value)
            except ValueError:
                raise NmtError(f"{where}: P must be a number, as in topp:0.9") from None
            if not 0 < p <= 1:
                raise NmtError(f"{where}: P must be above 0 and at most 1 (topp:1 samples from all tokens)")
            return kind, p
        raise NmtError(f"{where}: choose none, topk:K (say topk:10) or topp:P (say topp:0.9)")


@dataclass
class InitFrom:
    """Where a fine-tuned run's weights came from (``nmt train --init-from``).

    ``step`` and ``sha256`` are filled in when the run starts; a later fresh start of the
    same run checks that the checkpoint is still the one recorded.
    """

    run: str = ""
    checkpoint: str = "best"  # best, last, averaged, or a checkpoint path
    keep_optimizer: bool = False  # the parent's Adam moments too (the step and the schedule start over)
    step: int | None = None
    sha256: str | None = None


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: Any = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    init_from: InitFrom | None = None  # a fine-tuned run: the run and checkpoint it started from


SECTIONS = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "train": TrainConfig,
    "search": SearchConfig,
}
# Keys whose change does not stop a run from resuming.
# A resumed run keeps the tokenizer copied into its directory, so where it first came from
# (tokenizer.reuse) does not matter any more.
RESUMABLE_CHANGES = {
    "tokenizer.reuse", "train.max_steps", "train.max_epochs", "train.max_minutes", "train.valid_every",
    "train.patience", "train.log_every", "train.keep_last", "train.average_last",
    "train.threads", "train.valid_beam", "train.valid_max_sentences", "train.dist_timeout_minutes", "name",
    "train.tensorboard", "train.tf32", "train.prefetch", "train.bucket_cap_mb", "train.overlap",
    "train.grad_compression",
    # Where a fine-tuned run started is history: a resume keeps the recorded one.
    "init_from", *(f"init_from.{f.name}" for f in dataclasses.fields(InitFrom)),
    # How a trained model is decoded does not change what was trained.
    *(f"search.{f.name}" for f in dataclasses.fields(SearchConfig)),
}


def split_paths(data: DataConfig, split: str) -> tuple[Path, Path]:
    """The (source, target) files of a split name, or of a path prefix given in its place."""
    prefix = getattr(data, split, split)
    if not isinstance(prefix, str):
        raise NmtError(f"data.{split} lists several corpora; train_corpora() gives their files")
    return prefix_paths(data, prefix)


def prefix_paths(data: DataConfig, prefix: str) -> tuple[Path, Path]:
    """``DIR/prefix.{src,tgt}``; a prefix with a ``/`` is a path of its own (``/x/bt`` -> ``/x/bt.en``)."""
    base = Path(data.dir)
    if not base.is_absolute() and not base.exists():
        base = data_root() / base
    stem = Path(prefix) if "/" in prefix else base / prefix
    return Path(f"{stem}.{data.src_lang}"), Path(f"{stem}.{data.tgt_lang}")


@dataclass(frozen=True)
class TrainCorpus:
    """One corpus of ``data.train``: how messages name it, its two files, its sampling weight."""

    name: str  # "data.train" for a plain prefix, "data.train[i]" for an entry of a list
    prefix: str
    src: Path
    tgt: Path
    weight: float

    @property
    def listed(self) -> bool:
        """An entry of a ``data.train`` list (named by its place), not a plain prefix."""
        return self.name != "data.train"


def train_corpora(data: DataConfig) -> list[TrainCorpus]:
    """The training corpora of a checked ``data`` section, in the order the recipe lists them."""
    if isinstance(data.train, str):
        return [TrainCorpus("data.train", data.train, *prefix_paths(data, data.train), 1.0)]
    return [TrainCorpus(f"data.train[{i}]", entry["path"], *prefix_paths(data, entry["path"]),
                        float(entry.get("weight", 1.0))) for i, entry in enumerate(data.train)]


# --- checking values against the dataclasses -------------------------------------------

def _check_value(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except NmtError:
                pass
        raise NmtError(f"recipe key {key}: {value!r} is not a valid {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise NmtError(f"recipe key {key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint)
                       and not (hint is int and isinstance(value, bool))):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise NmtError(f"recipe key {key}: expected {name}, got {value!r}")


def _build(cls: type, values: dict, section: str) -> Any:
    if not isinstance(values, dict):
        raise NmtError(f"recipe section {section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise NmtError(
                f"unknown recipe key {section}.{key}; valid keys of {section}: {', '.join(names)}")
        kwargs[key] = _check_value(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise NmtError("a recipe must be a YAML mapping with sections "
                       "data, tokenizer, model, train, search")
    known = {"name", "model", "init_from", *SECTIONS}
    for key in raw:
        if key not in known:
            raise NmtError(f"unknown recipe section {key!r}; valid: {', '.join(sorted(known))}")
    cfg = Config()
    if "name" in raw:
        cfg.name = _check_value("name", raw["name"], str)
    for section, cls in SECTIONS.items():
        if section in raw:
            setattr(cfg, section, _build(cls, _section(raw, section), section))
    model = dict(_section(raw, "model"))
    kind = model.get("kind", "transformer")
    if not isinstance(kind, str) or kind not in MODEL_CONFIGS:
        raise NmtError(f"recipe key model.kind: unknown model {kind!r}; "
                       f"valid: {', '.join(MODEL_CONFIGS)}")
    for key in model:
        owners = [k for k, cls in MODEL_CONFIGS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if owners and kind not in owners:
            raise NmtError(f"recipe key model.{key} belongs to model.kind {' or '.join(owners)}, "
                           f"not {kind}; remove it (valid keys for {kind}: "
                           f"{', '.join(f.name for f in dataclasses.fields(MODEL_CONFIGS[kind]))})")
    cfg.model = _build(MODEL_CONFIGS[kind], model, "model")
    if raw.get("init_from") is not None:
        cfg.init_from = _build(InitFrom, raw["init_from"], "init_from")
        if not cfg.init_from.run:
            raise NmtError("recipe key init_from.run: name the run directory to start from")
    _validate(cfg)
    return cfg


def _section(raw: dict, name: str) -> dict:
    """A section's mapping; an empty section (``train:``) means the defaults."""
    values = raw.get(name)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise NmtError(f"recipe section {name}: expected a mapping of keys, got {values!r}; "
                       f"write it as {name}: followed by indented key: value lines")
    return values


# A check: (key, its value, whether the value is valid, the valid range in words).
Check = tuple[str, Any, bool, str]


def _validate(cfg: Config) -> None:
    """Refuse values of the right type that would fail later (mid-training, or silently)."""
    for key, value, ok, valid in [*_data_checks(cfg), *_model_checks(cfg.model), *_train_checks(cfg.train),
                                  *_search_checks(cfg.search)]:
        if not ok:
            raise NmtError(f"recipe key {key} {valid}; got {value!r}")


def _data_checks(cfg: Config) -> list[Check]:
    # Training pairs are cut at max_len subwords plus EOS or BOS, which must fit the positions table.
    top = cfg.model.max_positions - 1
    return [
        ("data.max_len", cfg.data.max_len, 1 <= cfg.data.max_len <= top,
         f"must be between 1 and model.max_positions - 1 = {top}"),
        ("tokenizer.vocab_size", cfg.tokenizer.vocab_size, cfg.tokenizer.vocab_size >= 300,
         "must be at least 300 (256 byte pieces and the specials are part of it)"),
        ("tokenizer.model_type", cfg.tokenizer.model_type, cfg.tokenizer.model_type in ("unigram", "bpe"),
         "must be unigram or bpe"),
        ("data.bleu_tokenize", cfg.data.bleu_tokenize, cfg.data.bleu_tokenize in _bleu_tokenizers(),
         f"must be one of sacreBLEU's tokenizations: {', '.join(_bleu_tokenizers())} (13a for raw text, "
         "none for text already tokenized)"),
        *_corpus_checks(cfg.data),
    ]


def _bleu_tokenizers() -> tuple[str, ...]:
    from nmt.metrics import BLEU_TOKENIZERS  # sacreBLEU is imported only when a recipe is checked

    return BLEU_TOKENIZERS


CORPUS_KEYS = ("path", "weight")


def _corpus_checks(data: DataConfig) -> list[Check]:
    """A list in ``data.train``: each entry a mapping with a ``path`` and a ``weight`` > 0 (default 1)."""
    if isinstance(data.train, str):
        return []
    checks: list[Check] = [("data.train", data.train, len(data.train) > 0,
                            "must name a split, or list at least one corpus as {path: PREFIX, weight: W}")]
    first: dict[str, int] = {}
    for i, entry in enumerate(data.train):
        key = f"data.train[{i}]"
        if not isinstance(entry, dict):
            checks.append((key, entry, False, "must be a mapping such as {path: train, weight: 1.0}"))
            continue
        checks += [(f"{key}.{k}", v, False, f"is not a key of a corpus entry (valid: {', '.join(CORPUS_KEYS)})")
                   for k, v in entry.items() if k not in CORPUS_KEYS]
        path, weight = entry.get("path"), entry.get("weight", 1.0)
        checks.append((f"{key}.path", path, isinstance(path, str) and bool(path.strip()),
                       "must be given: a prefix under data.dir (train) or a path prefix (/data/bt reads "
                       "/data/bt.SRC_LANG and /data/bt.TGT_LANG)"))
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        checks.append((f"{key}.weight", weight, number and 0 < weight < math.inf,
                       "must be > 0" if number and weight <= 0 else "must be a finite number > 0"))
        if isinstance(path, str) and path in first:
            checks.append((f"{key}.path", path, False, f"repeats data.train[{first[path]}].path; give that "
                           "corpus one entry, with the weight it should have"))
        elif isinstance(path, str):
            first[path] = i
    return checks


def _model_checks(m: Any) -> list[Check]:
    checks = [("model.max_positions", m.max_positions, m.max_positions >= 2, "must be at least 2"),
              ("model.dropout", m.dropout, 0 <= m.dropout < 1, "must be in [0, 1)"),
              ("model.decoder_layers", m.decoder_layers, m.decoder_layers >= 1, "must be at least 1")]
    if m.kind == "gnmt":
        return checks + [
            # The first encoder layer is the bidirectional one; the next brings its 2*hidden
            # outputs back to hidden, the size the attention expects.
            ("model.encoder_layers", m.encoder_layers, m.encoder_layers >= 2,
             "must be at least 2 for gnmt (a bidirectional layer, then unidirectional ones)"),
            ("model.hidden", m.hidden, m.hidden >= 1, "must be at least 1"),
            ("model.embed_dim", m.embed_dim, m.embed_dim >= 1, "must be at least 1"),
        ]
    return checks + [
        ("model.encoder_layers", m.encoder_layers, m.encoder_layers >= 1, "must be at least 1"),
        ("model.heads", m.heads, m.heads >= 1, "must be at least 1"),
        ("model.d_model", m.d_model, m.d_model >= 1 and m.d_model % max(m.heads, 1) == 0,
         f"must be a positive multiple of model.heads = {m.heads}"),
        ("model.ffn", m.ffn, m.ffn >= 1, "must be at least 1"),
        ("model.attention_dropout", m.attention_dropout, 0 <= m.attention_dropout < 1, "must be in [0, 1)"),
        ("model.activation_dropout", m.activation_dropout, 0 <= m.activation_dropout < 1, "must be in [0, 1)"),
    ]


def _train_checks(t: TrainConfig) -> list[Check]:
    at_least = [("max_tokens", 1), ("update_freq", 1), ("valid_beam", 1), ("log_every", 1),
                ("warmup_steps", 0), ("max_steps", 0), ("max_epochs", 0), ("max_minutes", 0),
                ("valid_every", 0), ("patience", 0), ("keep_last", 0), ("average_last", 0), ("threads", 0),
                ("clip_norm", 0), ("weight_decay", 0), ("valid_max_sentences", 0)]
    checks = [(f"train.{k}", getattr(t, k), getattr(t, k) >= low, f"must be at least {low}") for k, low in at_least]
    return checks + [
        ("train.lr", t.lr, t.lr > 0, "must be positive"),
        ("train.label_smoothing", t.label_smoothing, 0 <= t.label_smoothing < 1, "must be in [0, 1)"),
        ("train.adam_betas", t.adam_betas, len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas),
         "must be two numbers in [0, 1)"),
        ("train.adam_eps", t.adam_eps, t.adam_eps > 0, "must be positive"),
        ("train.dist_timeout_minutes", t.dist_timeout_minutes, t.dist_timeout_minutes > 0, "must be positive"),
        ("train.precision", t.precision, t.precision in ("fp32", "bf16", "fp16"), "must be fp32, bf16 or fp16"),
        ("train.lstm_dtype", t.lstm_dtype, t.lstm_dtype in ("fp32", "bf16"), "must be fp32 or bf16"),
        ("train.bucket_cap_mb", t.bucket_cap_mb, t.bucket_cap_mb > 0, "must be positive"),
        ("train.grad_compression", t.grad_compression, t.grad_compression in ("none", "bf16"), "must be none or bf16"),
        # Averaging reads the step checkpoints kept on disk; asking for more would silently average fewer.
        ("train.average_last", t.average_last, t.average_last <= t.keep_last,
         f"must be at most train.keep_last = {t.keep_last} (the step checkpoints kept to average)"),
    ]


def _search_checks(s: SearchConfig) -> list[Check]:
    return [
        ("search.beam", s.beam, s.beam >= 1, "must be at least 1 (1 is greedy search)"),
        ("search.n_best", s.n_best, 1 <= s.n_best <= s.beam, f"must be between 1 and search.beam = {s.beam}"),
        ("search.length_penalty", s.length_penalty, s.length_penalty >= 0, "must be at least 0"),
        ("search.coverage_penalty", s.coverage_penalty, s.coverage_penalty >= 0, "must be at least 0"),
        ("search.max_len_a", s.max_len_a, s.max_len_a >= 0, "must be at least 0"),
        ("search.max_len_b", s.max_len_b, s.max_len_b >= 0, "must be at least 0"),
        ("search.max_tokens", s.max_tokens, s.max_tokens >= 1, "must be at least 1"),
        ("search.max_sentences", s.max_sentences, s.max_sentences >= 1, "must be at least 1"),
    ]


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw recipe dict."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise NmtError(f"--set {item!r}: expected section.key=value, e.g. train.lr=5e-4")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else ""
        if isinstance(value, str) and _looks_like_float(text):
            value = float(text)  # YAML 1.1 reads 5e-4 as a string
        parts = key.strip().split(".")
        if len(parts) == 1:
            raw[parts[0]] = value
        elif len(parts) == 2:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise NmtError(f"--set {item!r}: {parts[0]} is not a section")
            section[parts[1]] = value
        else:
            raise NmtError(f"--set {item!r}: expected section.key=value")
    return raw


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _yaml_load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NmtError(f"{path}: no such recipe file") from None
    except UnicodeDecodeError as e:
        raise NmtError(f"{path}: not UTF-8 text ({e.reason}); save the recipe as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise NmtError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:  # training every default for hours is never what an empty file meant
        raise NmtError(f"{path}: empty recipe; give at least the data and model sections "
                       "(see recipes/multi30k/quick.yaml)")
    return _float_strings(raw)


def _float_strings(node: Any) -> Any:
    # PyYAML follows YAML 1.1, where "5e-4" is a string; recipes mean a number.
    if isinstance(node, dict):
        return {k: _float_strings(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_float_strings(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node) and any(c in node for c in "eE."):
        return float(node)
    return node


def load_recipe(path: Path, overrides: list[str] | None = None) -> Config:
    raw = apply_overrides(_yaml_load(Path(path)), overrides or [])
    try:
        cfg = from_dict(raw)
    except NmtError as e:
        raise NmtError(f"{path}: {e}") from None
    defaulted = [s for s in ("data", "tokenizer", "model", "train", "search") if not raw.get(s)]
    if defaulted:  # say so before hours of training on values nobody wrote down
        log.info("%s: no %s section; the defaults of nmt/config.py apply", path, ", ".join(defaulted))
    return cfg


def save(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def changed_keys(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two config dicts, as (key, old, new)."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append((f"{section}.{key}", a.get(key), b.get(key)))
        elif a != b:
            out.append((section, a, b))
    return out


def with_search(cfg: Config, values: dict) -> Config:
    """``cfg`` with some ``search`` keys replaced, each checked as in a recipe."""
    raw = to_dict(cfg)
    raw["search"] = {**raw["search"], **values}
    return from_dict(raw)
