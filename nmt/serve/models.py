"""The models a server holds: each loaded once, each serving its run's language pair.

A ``ServedModel`` is a run directory decoded by nmt (a Transformer, a GNMT, an ensemble is
not served) or a directory written by ``nmt export`` decoded by CTranslate2. Its search
settings are the run's (``search.yaml`` included) with no sampling: a drawn translation
depends on the line's place in the input, and so on what else was in the batch. An export
stores no coverage penalty (CTranslate2 has none; ``nmt.export``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nmt.config import SearchConfig
from nmt.errors import NmtError
from nmt.tokenizer import Tokenizer
from nmt.translate import Translation

log = logging.getLogger("nmt")

ENGINES = ("nmt", "ctranslate2")


@dataclass
class ServedModel:
    id: int  # its place among the -m options: OpenNMT-py's model id
    path: Path
    source: str
    target: str
    kind: str  # transformer, gnmt, or ctranslate2
    search: SearchConfig
    tokenizer: Tokenizer
    decode: Callable[..., list[Translation]]  # as nmt.translate.translate(lines, cfg, source_name=...)
    int8: bool = False

    @property
    def pair(self) -> tuple[str, str]:
        return self.source, self.target

    def tokens(self, segments: Sequence[str]) -> int:
        """Source tokens of the segments, EOS included: what a batch of them costs."""
        return sum(len(ids) + 1 for ids in self.tokenizer.encode([s.strip() for s in segments]))

    def describe(self) -> str:
        engine = "CTranslate2" if self.kind == "ctranslate2" else f"nmt {self.kind}{' int8' if self.int8 else ''}"
        return (f"{self.source}->{self.target} from {self.path} ({engine}, beam {self.search.beam}, "
                f"length penalty {self.search.length_penalty}, coverage penalty {self.search.coverage_penalty}"
                f"{f', shortlist {self.search.shortlist}' if self.search.shortlist else ''})")


def _nmt_model(i: int, run: Path, checkpoint: str, int8: bool | None) -> ServedModel:
    from nmt.ensemble import load_ensemble
    from nmt.hardware import pick_device
    from nmt.translate import translate

    # One run, as load_run gives it, with the recipe's search.shortlist applied where it sets one.
    cfg, tokenizer, model = load_ensemble([run], checkpoint, pick_device(), int8)
    search = dataclasses.replace(cfg.search, sampling="none")
    if cfg.search.sampling != "none":
        log.warning("%s: search.sampling %s is not served; the server searches (beam %d)",
                    run, cfg.search.sampling, search.beam)
    return ServedModel(i, run, cfg.data.src_lang, cfg.data.tgt_lang, cfg.model.kind, search, tokenizer,
                       functools.partial(translate, model, tokenizer), int8=search.int8)


def _exported_model(i: int, path: Path, threads: int | None) -> ServedModel:
    from nmt.export import ExportedModel

    exported = ExportedModel(path, threads=threads)
    if exported.languages is None:
        raise NmtError(f"{path}: this export does not name its languages (made before nmt recorded them); "
                       f"export the run again with nmt export RUN --to ctranslate2 {path}")
    search = dataclasses.replace(exported.search, sampling="none", stop="standard")
    source, target = exported.languages
    return ServedModel(i, path, source, target, "ctranslate2", search, exported.tokenizer, exported.translate)


def load_models(paths: Sequence[Path], engine: str = "nmt", checkpoint: str = "best", int8: bool | None = None,
                threads: int | None = None) -> list[ServedModel]:
    """One served model per path; two for the same language pair are refused."""
    if engine not in ENGINES:
        raise NmtError(f"--engine {engine}: choose nmt or ctranslate2")
    if not paths:
        raise NmtError("give at least one model to serve: nmt serve -m RUN")
    models: list[ServedModel] = []
    for i, path in enumerate(paths):
        model = (_exported_model(i, Path(path), threads) if engine == "ctranslate2"
                 else _nmt_model(i, Path(path), checkpoint, int8))
        for other in models:
            if other.pair == model.pair:
                raise NmtError(f"{other.path} and {path} both translate {model.source}->{model.target}: a "
                               "server serves one model per language pair; give one of them")
        models.append(model)
    return models
