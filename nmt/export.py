"""Hand a trained Transformer to CTranslate2, and decode the exported directory.

``export_ctranslate2`` writes a CTranslate2 model directory (``model.bin``, ``config.json``,
``shared_vocabulary.json``) beside the run's ``spm.model`` and a ``search.json`` of the run's
search settings. ``ExportedModel`` loads such a directory and translates lines with the same
input and output rules as ``nmt.translate`` (N lines in, N out, empty lines stay empty).

What the conversion has to get right, since CTranslate2 has its own conventions:

- one embedding matrix is the source and target embedding and the output projection; the
  embeddings are scaled by sqrt(d_model) before the positions are added;
- nmt's sinusoids interleave sin and cos (even and odd columns) where CTranslate2's built-in
  table puts all sines first, so the table is written into the model;
- the source is its pieces followed by ``</s>`` (no ``<s>``); the decoder starts from ``<s>``;
- CTranslate2 ranks finished hypotheses by log P / (|Y| + 1) ** p (the ``+ 1`` is EOS);
  to rank them by nmt's GNMT penalty ((5 + |Y| + 1) / 6) ** alpha, all beam hypotheses are
  asked for with their scores, log P is recovered and they are ranked again. A nonzero p also
  makes it stop a sentence once ``beam`` hypotheses have finished, as nmt does (with p = 0 it
  stops as soon as the best one has);
- nmt's search rules: EOS not before ``min_len`` tokens, ``<unk>``, ``<s>`` and ``<pad>``
  never generated. CTranslate2 removes these tokens before its softmax, so its log-probs
  are renormalized over the rest: a hypothesis scores a little higher there (by the
  probability the model gives these tokens, ~1e-3 per token on the tests' tiny model), and
  a near tie between two hypotheses can go the other way;
- one ``max_decoding_length`` per call: hypotheses that reach their own sentence's limit
  (``nmt.search.max_lengths``) are cut there and scored again with EOS at the cut, which is
  what nmt's search does at the limit (see ``ExportedModel._candidates``);
- when more than ``beam`` hypotheses finish at the same step, CTranslate2 keeps ``beam`` of
  them by its own ranking, nmt by its own: the tail of an n-best list can differ;
- a vocabulary shortlist (``--shortlist``, nmt/shortlist.py) becomes CTranslate2's vocabulary
  map (``vmap.txt``, decoded with ``use_vmap``), at sizes fixed by the export. CTranslate2
  restricts a batch to the union of its sentences' lists, where nmt masks each sentence to
  its own list, so there its output can depend on the batch; the hypotheses cut at their
  limit are scored again over the whole vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from nmt.config import SearchConfig
from nmt.errors import NmtError
from nmt.models.transformer import sinusoids
from nmt.search import Hypothesis, length_penalty, max_lengths
from nmt.tokenizer import MODEL_FILE, Tokenizer
from nmt.translate import Translation, in_parallel, length_batches, source_ids

SETTINGS_FILE = "search.json"
FORMAT = "nmt-ctranslate2"
# Every file an export writes; --force replaces a directory that holds nothing else.
VMAP_FILE = "vmap.txt"  # CTranslate2's vocabulary map, written with --shortlist
EXPORT_FILES = {"model.bin", "config.json", "shared_vocabulary.json", MODEL_FILE, SETTINGS_FILE, VMAP_FILE}
# nmt.tokenizer's special ids 0-3 as SentencePiece names them.
PAD_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<s>", "</s>"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which nmt's models use
SEARCH_KEYS = ("beam", "length_penalty", "coverage_penalty", "max_len_a", "max_len_b", "min_len")


def import_ctranslate2() -> ModuleType:
    try:
        import ctranslate2
    except ImportError:
        raise NmtError("the ctranslate2 package is not installed: pip install 'nmt[ctranslate2]' "
                       "(or pip install ctranslate2)") from None
    return ctranslate2


# --- the model specification ------------------------------------------------------------

def _linear(spec, params: dict[str, torch.Tensor], name: str) -> None:
    spec.weight = params[f"{name}.weight"].numpy()
    spec.bias = params[f"{name}.bias"].numpy()


def _layer_norm(spec, params: dict[str, torch.Tensor], name: str) -> None:
    spec.gamma = params[f"{name}.weight"].numpy()
    spec.beta = params[f"{name}.bias"].numpy()


def _inputs(spec, params: dict[str, torch.Tensor], embeddings, positions) -> None:
    embeddings.weight = params["embed.weight"].numpy()  # the same matrix everywhere (tied)
    spec.scale_embeddings = True  # x * sqrt(d_model), as Transformer._embed
    spec.position_encodings.encodings = positions


def transformer_spec(ctranslate2: ModuleType, model_cfg, params: dict[str, torch.Tensor], pieces: list[str]):
    """A ``TransformerSpec`` holding nmt's Transformer parameters (names of its state dict).

    Self-attention: nmt's ``qkv`` projection is already CTranslate2's fused [q; k; v] layout;
    cross-attention: ``q`` then the fused [k; v] projection ``kv``.
    """
    spec = ctranslate2.specs.TransformerSpec.from_config(
        (model_cfg.encoder_layers, model_cfg.decoder_layers), model_cfg.heads, pre_norm=True)
    positions = sinusoids(model_cfg.max_positions + 2, model_cfg.d_model).numpy()  # (L, D)
    encoder, decoder = spec.encoder, spec.decoder
    _inputs(encoder, params, encoder.embeddings[0], positions)
    _layer_norm(encoder.layer_norm, params, "encoder_norm")
    for i, layer in enumerate(encoder.layer):
        p = f"encoder.{i}"
        _layer_norm(layer.self_attention.layer_norm, params, f"{p}.norm1")
        _linear(layer.self_attention.linear[0], params, f"{p}.attn.qkv")
        _linear(layer.self_attention.linear[1], params, f"{p}.attn.out")
        _layer_norm(layer.ffn.layer_norm, params, f"{p}.norm2")
        _linear(layer.ffn.linear_0, params, f"{p}.ffn.0")
        _linear(layer.ffn.linear_1, params, f"{p}.ffn.3")
    _inputs(decoder, params, decoder.embeddings, positions)
    decoder.projection.weight = params["embed.weight"].numpy()  # tied output projection, no bias
    _layer_norm(decoder.layer_norm, params, "decoder_norm")
    for i, layer in enumerate(decoder.layer):
        p = f"decoder.{i}"
        _layer_norm(layer.self_attention.layer_norm, params, f"{p}.norm1")
        _linear(layer.self_attention.linear[0], params, f"{p}.self_attn.qkv")
        _linear(layer.self_attention.linear[1], params, f"{p}.self_attn.out")
        _layer_norm(layer.attention.layer_norm, params, f"{p}.norm2")
        _linear(layer.attention.linear[0], params, f"{p}.cross_attn.q")
        _linear(layer.attention.linear[1], params, f"{p}.cross_attn.kv")
        _linear(layer.attention.linear[2], params, f"{p}.cross_attn.out")
        _layer_norm(layer.ffn.layer_norm, params, f"{p}.norm3")
        _linear(layer.ffn.linear_0, params, f"{p}.ffn.0")
        _linear(layer.ffn.linear_1, params, f"{p}.ffn.3")
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.config.layer_norm_epsilon = LAYER_NORM_EPS
    spec.config.decoder_start_token = BOS_PIECE
    spec.config.add_source_bos = spec.config.add_source_eos = False  # the engine adds EOS itself
    return spec


# --- export -----------------------------------------------------------------------------

def _check_out_dir(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NmtError(f"{out_dir}: exists and is not a directory; give a new directory to export into")
    present = {p.name for p in out_dir.iterdir()}
    if present and not force:
        raise NmtError(f"{out_dir}: directory exists and is not empty; pass --force to replace "
                       "an earlier export, or give a new directory")
    foreign = sorted(present - EXPORT_FILES)
    if foreign:  # --force replaces an export, never a directory that holds anything else
        raise NmtError(f"{out_dir}: holds files an export does not write ({', '.join(foreign[:3])}); "
                       "--force only replaces an earlier export: give a new directory")


# What nmt's search has and CTranslate2's lacks: an export stores the value that turns it off, so
# that the export decodes with no extra flags, and names what it left out.
NOT_IN_CTRANSLATE2 = {"coverage_penalty": 0.0}


def search_settings(search: SearchConfig) -> dict[str, Any]:
    return {key: NOT_IN_CTRANSLATE2.get(key, getattr(search, key)) for key in SEARCH_KEYS}


def left_out(search: SearchConfig) -> dict[str, Any]:
    """The run's settings an export cannot apply (and so does not store), with their values."""
    return {key: getattr(search, key) for key, off in NOT_IN_CTRANSLATE2.items() if getattr(search, key) != off}


def export_ctranslate2(run_dir: Path, out_dir: Path, which: str = "best", quantization: str | None = None,
                       force: bool = False, shortlist: bool | str = False) -> dict[str, Any]:
    """Write a CTranslate2 model of a run's Transformer into ``out_dir``; returns search.json's content.

    ``shortlist``: add the run's shortlist table (``nmt shortlist RUN``) as the vocabulary map, at
    the run's ``search.shortlist`` sizes (or those of a "FIRST,BEST" string) or else all the table holds; search.json's
    ``search.shortlist`` records the sizes, and the export decodes with the map by default.
    """
    from nmt.rundir import checkpoint_path, load_run

    ctranslate2 = import_ctranslate2()
    accepted = ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES
    if quantization is not None and quantization not in accepted:
        raise NmtError(f"--quantization {quantization}: not one of {', '.join(accepted)}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    cfg, tokenizer, model = load_run(run_dir, which, "cpu", int8=False)
    if cfg.model.kind != "transformer":
        raise NmtError(f"{run_dir}: a {cfg.model.kind} model; CTranslate2 runs Transformers only, "
                       "so only a Transformer run can be exported")
    params = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    pieces = [tokenizer.sp.IdToPiece(i) for i in range(len(tokenizer))]
    spec = transformer_spec(ctranslate2, cfg.model, params, pieces)
    table = sizes = None
    if shortlist:
        from nmt.shortlist import load_table

        asked = (replace(cfg.search, shortlist=shortlist) if isinstance(shortlist, str)
                 else cfg.search).shortlist_sizes()
        table = load_table(run_dir, asked)
        sizes = asked or (table.first, table.best)
    settings = {"format": FORMAT, "version": 1, "run": str(Path(run_dir).resolve()),
                "checkpoint": str(checkpoint_path(run_dir, which)), "quantization": quantization or "float32",
                "max_positions": cfg.model.max_positions, "search": search_settings(cfg.search),
                "left_out": left_out(cfg.search),
                "src_lang": cfg.data.src_lang, "tgt_lang": cfg.data.tgt_lang}
    settings["search"]["shortlist"] = "" if sizes is None else f"{sizes[0]},{sizes[1]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        spec.validate()
        spec.optimize(quantization=quantization)
        spec.save(str(tmp))
        shutil.copyfile(tokenizer.path, tmp / MODEL_FILE)
        if table is not None:
            from nmt.shortlist import write_vmap

            write_vmap(table, pieces, *sizes, tmp / VMAP_FILE)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # checked above: empty, or only an earlier export's files
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return settings


# --- decoding an export -----------------------------------------------------------------

@dataclass
class Candidate:
    tokens: list[int]
    log_prob: float
    cut: bool = False  # cut at its sentence's length limit: log_prob is not known yet


class ExportedModel:
    """A directory written by ``export_ctranslate2``, ready to translate."""

    def __init__(self, model_dir: Path, device: str | None = None, compute_type: str = "default",
                 threads: int | None = None, workers: int = 1):
        """``threads``: the CPU threads in all (default: torch's); ``workers``: batches decoded
        at once, CTranslate2's ``inter_threads``, each on ``threads // workers`` of them, as
        ``nmt translate --workers`` means for nmt's engine."""
        ctranslate2 = import_ctranslate2()
        self.dir = Path(model_dir)
        settings_path = self.dir / SETTINGS_FILE
        if not settings_path.is_file():
            raise NmtError(f"{self.dir}: not a CTranslate2 export of nmt (no {SETTINGS_FILE}); make one "
                           f"with nmt export RUN --to ctranslate2 {self.dir}")
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
            self.max_positions = int(settings["max_positions"])
            stored = settings["search"]
            # (source, target) language codes; None for an export made before they were recorded.
            self.languages = ((str(settings["src_lang"]), str(settings["tgt_lang"]))
                              if "src_lang" in settings else None)
        except (ValueError, KeyError, TypeError) as e:
            raise NmtError(f"{settings_path}: unreadable ({type(e).__name__}: {e}); export again") from None
        # Defaults for what the export does not store (batching), the export's settings over them.
        known = {f.name for f in fields(SearchConfig)}
        self.search = replace(SearchConfig(), **{k: v for k, v in stored.items() if k in known})
        # The (FIRST, BEST) sizes its vocabulary map was written for; None: exported without one.
        self.vmap = self.search.shortlist_sizes() if (self.dir / VMAP_FILE).is_file() else None
        self.tokenizer = Tokenizer(self.dir / MODEL_FILE)
        if device is None:
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.workers = workers
        try:
            self.translator = ctranslate2.Translator(
                str(self.dir), device=device, compute_type=compute_type, inter_threads=workers,
                intra_threads=max(1, (threads or torch.get_num_threads()) // workers))
        except (RuntimeError, ValueError) as e:
            raise NmtError(f"{self.dir}: CTranslate2 cannot load this model ({e}); export again") from None

    def _pieces(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.sp.IdToPiece(i) for i in ids]

    def _candidates(self, src: list[list[str]], limits: list[int], cfg: SearchConfig) -> list[list[Candidate]]:
        """Each sentence's finished hypotheses, as nmt's search would finish them at its limit.

        CTranslate2 decodes the batch to the longest limit less one token; a hypothesis that
        reaches its own sentence's last token (``limit - 1`` tokens) is cut there and will
        get EOS, as nmt forces it at the limit. A beam search that got to its last token
        registers every beam there and keeps only ``beam`` of all its finished hypotheses by
        CTranslate2's ranking, so those sentences (they are the ones holding a hypothesis of
        ``limit - 2`` tokens or more) are decoded again to their own limit, asking for
        2 * beam hypotheses: patience 2 only lets a sentence stop at 2 * beam finished
        ones, and one that had fewer than beam before its last token never gets there.
        """
        greedy = cfg.beam == 1
        # Any p != 0 makes the search wait for `beam` finished hypotheses, as nmt's does. p
        # also decides which `beam` it keeps when more finish at once: (|Y| + 1) ** p and
        # nmt's ((5 + |Y| + 1) / 6) ** alpha grow alike with |Y| near |Y| + 1 = n for this p,
        # n the batch's mean source length (a translation's length is close to its source's).
        n = sum(len(s) for s in src) / len(src)
        p = 0.0 if greedy else (cfg.length_penalty * n / (n + 5) or 1e-6)
        options = {"beam_size": cfg.beam, "length_penalty": p, "return_scores": True, "max_input_length": 0,
                   "min_decoding_length": cfg.min_len, "disable_unk": True,
                   "suppress_sequences": [[BOS_PIECE], [PAD_PIECE]], "use_vmap": cfg.shortlist_sizes() is not None}
        results = self.translator.translate_batch(src, num_hypotheses=cfg.beam,
                                                  max_decoding_length=max(max(limits) - 1, 1), **options)
        out = [self._read(r, limit, p) for r, limit in zip(results, limits)]
        again = [] if greedy else [i for i, r in enumerate(results)
                                   if any(len(h) >= limits[i] - 2 for h in r.hypotheses)]
        for limit in sorted({limits[i] for i in again}):
            group = [i for i in again if limits[i] == limit]
            redone = self.translator.translate_batch([src[i] for i in group], num_hypotheses=2 * cfg.beam,
                                                     patience=2, max_decoding_length=max(limit - 1, 1), **options)
            for i, r in zip(group, redone):
                out[i] = self._read(r, limit, p)
        return out

    def _read(self, result, limit: int, p: float) -> list[Candidate]:
        """Token ids and log P of a TranslationResult (scored log P / (|Y| + 1) ** p)."""
        cands = []
        for pieces, score in zip(result.hypotheses, result.scores):
            ids = [self.tokenizer.sp.PieceToId(x) for x in pieces]
            cut = len(ids) >= limit - 1  # nmt's search forces EOS after this many
            cands.append(Candidate(ids[: limit - 1], score * (len(ids) + 1) ** p, cut))
        return cands

    def token_log_probs(self, src_ids: list[list[int]], tgt_ids: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each target token and of the EOS after them."""
        results = self.translator.score_batch([self._pieces(s) + [EOS_PIECE] for s in src_ids],
                                              [self._pieces(t) for t in tgt_ids], max_input_length=0)
        return [list(r.log_probs) for r in results]

    def _score_cut(self, ids: list[list[int]], cands: list[list[Candidate]]) -> None:
        """log P of each cut hypothesis followed by EOS."""
        todo = [(i, c) for i, sent in enumerate(cands) for c in sent if c.cut]
        if todo:
            scored = self.token_log_probs([ids[i] for i, _ in todo], [c.tokens for _, c in todo])
            for (_, c), log_probs in zip(todo, scored):
                c.log_prob = sum(log_probs)

    def search_batch(self, ids: list[list[int]], cfg: SearchConfig) -> list[list[Hypothesis]]:
        """The ``cfg.n_best`` best hypotheses of each non-empty token sequence, best first."""
        src = [self._pieces(s) + [EOS_PIECE] for s in ids]
        lens = torch.tensor([len(s) + 1 for s in ids])
        limits = max_lengths(lens, cfg, self.max_positions).tolist()
        cands = self._candidates(src, limits, cfg)
        self._score_cut(ids, cands)
        out = []
        for sent in cands:
            hyps, seen = [], set()
            for c in sent:
                if tuple(c.tokens) not in seen:  # two hypotheses can agree up to a cut
                    seen.add(tuple(c.tokens))
                    score = c.log_prob / length_penalty(len(c.tokens) + 1, cfg.length_penalty)
                    hyps.append(Hypothesis(c.tokens, score, c.log_prob))
            hyps.sort(key=lambda h: -h.score)
            out.append(hyps[: cfg.n_best])
        return out

    def _check_shortlist(self, cfg: SearchConfig) -> None:
        """Refuse a shortlist the export's vocabulary map cannot give (its sizes are fixed at export)."""
        sizes = cfg.shortlist_sizes()
        if sizes is None or sizes == self.vmap:
            return
        if self.vmap is None:
            raise NmtError(f"--shortlist {cfg.shortlist}: {self.dir} was exported without a shortlist (no "
                           f"{VMAP_FILE}); export again with nmt export RUN --to ctranslate2 {self.dir} --shortlist "
                           "--force, or translate with --shortlist none")
        first, best = self.vmap
        raise NmtError(f"--shortlist {cfg.shortlist}: {self.dir / VMAP_FILE} was written for {first},{best} at "
                       f"export; pass --shortlist {first},{best} (or none), or export again with the run's "
                       "search.shortlist set to the sizes wanted")

    def translate(self, lines: list[str], cfg: SearchConfig, on_batch: Callable[[int], None] | None = None,
                  source_name: str = "<stdin>", first_line: int = 0) -> list[Translation]:
        """As ``nmt.translate.translate``: one Translation per line, in input order.

        ``first_line``: the lines of the input before these (read in chunks); lines count from there.
        """
        if cfg.coverage_penalty:
            raise NmtError(f"the ctranslate2 engine applies no coverage penalty (asked for "
                           f"{cfg.coverage_penalty}); pass --coverage-penalty 0, or use --engine nmt")
        if cfg.stop != "standard":
            raise NmtError(f"the ctranslate2 engine has only the standard stopping rule, not "
                           f"{cfg.stop!r}; use --engine nmt for it")
        self._check_shortlist(cfg)
        ids = source_ids(self.tokenizer, lines, self.max_positions - 1, source_name, first_line)  # room for EOS
        results = [Translation(first_line + i, [""] * cfg.n_best, []) for i in range(len(lines))]
        order = sorted((i for i, seq in enumerate(ids) if seq), key=lambda i: (len(ids[i]), i))
        batches = list(length_batches([len(s) + 1 for s in ids], order, cfg.max_tokens, cfg.max_sentences))
        # Batches handed over from several threads at once run on CTranslate2's inter_threads.
        for batch, found in in_parallel(lambda b: self.search_batch([ids[i] for i in b], cfg), batches,
                                        self.workers):
            for i, nbest in zip(batch, found):
                texts = self.tokenizer.decode([h.tokens for h in nbest])
                texts += [""] * (cfg.n_best - len(texts))
                results[i] = Translation(first_line + i, [t.replace("\n", " ") for t in texts], nbest)
            if on_batch:
                on_batch(len(batch))
        return results

