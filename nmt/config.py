"""Recipes: typed dataclasses, stored as YAML.

A recipe is a YAML file with the sections ``data``, ``tokenizer``, ``model``, ``train``
and ``search``. Every key is checked against the dataclasses below: an unknown key or a
value of the wrong type is an error naming the key and what is valid. The ``model``
section is chosen by ``model.kind``; each kind has its own dataclass, so a key that
belongs to another kind is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nmt.download import data_root
from nmt.errors import NmtError


@dataclass
class DataConfig:
    src_lang: str = "en"
    tgt_lang: str = "de"
    # A directory holding {train,valid,test}.{lang}; relative paths are read under $NMT_DATA.
    dir: str = "multi30k"
    train: str = "train"
    valid: str = "valid"
    test: str = "test2016"
    # Training pairs longer than this (in subword tokens, either side) are dropped and counted.
    max_len: int = 100


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000
    model_type: str = "unigram"
    # Reuse the SentencePiece model of another run (a run directory or a .model file), so
    # that two models compared with each other see exactly the same subwords.
    reuse: str | None = None


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
    patience: int = 0  # validations without a better valid BLEU before stopping; 0: never
    log_every: int = 50
    keep_last: int = 5  # step checkpoints kept for averaging
    average_last: int = 0  # average this many last step checkpoints into averaged.pt at the end
    threads: int = 0  # torch intra-op threads; 0: all cores
    precision: str = "fp32"
    # How long a collective may wait for a peer before the job fails (torch's default is 30 min).
    dist_timeout_minutes: float = 10.0


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


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: Any = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


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
    "train.threads", "train.valid_beam", "train.dist_timeout_minutes", "name",
}


def split_paths(data: DataConfig, split: str) -> tuple[Path, Path]:
    """The (source, target) files of a split name, or of a path prefix given in its place."""
    base = Path(data.dir)
    if not base.is_absolute() and not base.exists():
        base = data_root() / base
    prefix = getattr(data, split, split)
    stem = Path(prefix) if "/" in prefix else base / prefix
    return Path(f"{stem}.{data.src_lang}"), Path(f"{stem}.{data.tgt_lang}")


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
    known = {"name", "model", *SECTIONS}
    for key in raw:
        if key not in known:
            raise NmtError(f"unknown recipe section {key!r}; valid: {', '.join(sorted(known))}")
    cfg = Config()
    if "name" in raw:
        cfg.name = _check_value("name", raw["name"], str)
    for section, cls in SECTIONS.items():
        if section in raw:
            setattr(cfg, section, _build(cls, raw[section] or {}, section))
    model = dict(raw.get("model") or {})
    kind = model.get("kind", "transformer")
    if kind not in MODEL_CONFIGS:
        raise NmtError(f"recipe key model.kind: unknown model {kind!r}; "
                       f"valid: {', '.join(MODEL_CONFIGS)}")
    for key in model:
        owners = [k for k, cls in MODEL_CONFIGS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if owners and kind not in owners:
            raise NmtError(f"recipe key model.{key} belongs to model.kind {' or '.join(owners)}, "
                           f"not {kind}; remove it (valid keys for {kind}: "
                           f"{', '.join(f.name for f in dataclasses.fields(MODEL_CONFIGS[kind]))})")
    cfg.model = _build(MODEL_CONFIGS[kind], model, "model")
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    checks = [
        (cfg.tokenizer.vocab_size >= 300, "tokenizer.vocab_size must be at least 300 "
         "(256 byte pieces and the specials are part of it)"),
        (cfg.tokenizer.model_type in ("unigram", "bpe"), "tokenizer.model_type must be unigram or bpe"),
        (cfg.train.max_tokens > 0, "train.max_tokens must be positive"),
        (cfg.train.update_freq >= 1, "train.update_freq must be at least 1"),
        (cfg.train.precision in ("fp32", "bf16", "fp16"), "train.precision must be fp32, bf16 or fp16"),
        (cfg.search.beam >= 1, "search.beam must be at least 1"),
        (1 <= cfg.search.n_best <= cfg.search.beam, "search.n_best must be between 1 and search.beam"),
    ]
    for ok, message in checks:
        if not ok:
            raise NmtError(message)


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
    return _float_strings(raw or {})


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
        return from_dict(raw)
    except NmtError as e:
        raise NmtError(f"{path}: {e}") from None


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
