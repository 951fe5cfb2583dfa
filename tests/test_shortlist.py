"""Vocabulary shortlists (nmt/shortlist.py): the IBM Model 1 table, decoding over it, its file and export.

Decoding tests use tiny random models over a 40-piece vocabulary and tables written by
hand, so what each sentence may produce is known; the command-line tests use the session's
trained run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pairs
from test_cli import one_error_line, run
from test_search import SMALL, random_source, recording_steps, tokens_of

from nmt.config import SearchConfig
from nmt.corpus import PreparedCorpus
from nmt.ensemble import Ensemble, log_mean_exp
from nmt.errors import NmtError
from nmt.models import build_model
from nmt.models.base import Seq2Seq
from nmt.quantize import quantize_int8
from nmt.search import search
from nmt.shortlist import FILE, Shortlisted, Table, build_table, read_table, write_table
from nmt.tokenizer import BOS, MODEL_FILE, Tokenizer

torch.set_num_threads(1)

VOCAB = 40
SPECIALS = {0, 1, 2, 3}
SETTINGS = {"greedy": SearchConfig(beam=1), "beam": SearchConfig(beam=4, n_best=2, length_penalty=0.6),
            "sampling": SearchConfig(sampling="topk:8", n_best=2, seed=3)}


def make_table(frequent: list[int], translations: dict[int, list[int]], vocab: int = VOCAB,
               spm_sha256: str = "0" * 64) -> Table:
    """A table that lists ``frequent`` and gives source piece s the translations ``translations[s]``."""
    offsets = np.zeros(vocab + 1, dtype=np.int64)
    targets: list[int] = []
    for s in range(vocab):
        targets += translations.get(s, [])
        offsets[s + 1] = len(targets)
    best = max([len(t) for t in translations.values()] + [1])
    return Table(np.array(frequent, dtype=np.int32), offsets, np.array(targets, dtype=np.int32),
                 np.linspace(0.9, 0.1, len(targets)).astype(np.float32), spm_sha256, max(len(frequent), 1), best,
                 0.001, 0, 0)


# Each source piece s in 4..39 translates to (s * 7) % 36 + 4 and (s * 11) % 36 + 4; pieces 4-7 are frequent.
TRANSLATIONS = {s: [(s * 7) % 36 + 4, (s * 11) % 36 + 4] for s in range(4, VOCAB)}
SMALL_TABLE = make_table([4, 5, 6, 7], TRANSLATIONS)


def sentence_list(src_row: torch.Tensor, first: int, best: int) -> set[int]:
    listed = SPECIALS | set(SMALL_TABLE.frequent[:first].tolist())
    for s in src_row.tolist():
        listed |= set(TRANSLATIONS.get(s, [])[:best])
    return listed


@pytest.fixture(scope="module")
def models() -> dict[str, Seq2Seq]:
    """A tiny Transformer and GNMT, and their int8 copies."""
    torch.manual_seed(0)
    found = {kind: build_model(SMALL[kind], vocab_size=VOCAB).eval() for kind in SMALL}
    found.update({f"{kind}-int8": quantize_int8(found[kind]) for kind in SMALL})
    return found


def hypotheses(result) -> list:
    return [[(h.tokens, h.score, h.log_prob) for h in hyps] for hyps in result]


# --- decoding over a shortlist

@pytest.mark.parametrize("kind", ["transformer", "gnmt", "transformer-int8", "gnmt-int8"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_output_piece_is_in_its_sentence_s_list(models, kind: str, setting: str) -> None:
    src, lens = random_source([5, 3, 8, 2, 6], seed=1)
    model = Shortlisted(models[kind], SMALL_TABLE, 2, 1)  # 2 frequent pieces, the best translation
    result = search(model, src, lens, SETTINGS[setting])
    produced = 0
    for row, hyps in zip(src, result):
        listed = sentence_list(row, 2, 1)
        for h in hyps:
            assert set(h.tokens) <= listed - {0, 1, 2}
            produced += len(h.tokens)
    assert produced > 0


@pytest.mark.parametrize("kind", ["transformer", "gnmt", "transformer-int8", "gnmt-int8"])
def test_restricted_log_probs_are_the_full_ones_renormalized_over_the_list(models, kind: str) -> None:
    model = models[kind]
    even = list(range(4, VOCAB, 2))  # half the vocabulary, and the special ids
    short = Shortlisted(model, make_table(even, {}), len(even), 1)
    src, lens = random_source([6, 4, 7], seed=2)
    memory = short.encode(src, lens)
    columns = memory.columns
    assert columns.tolist() == [0, 1, 2, 3, *even]
    full_state, short_state = model.init_state(model.encode(src, lens)), short.init_state(memory)
    g = torch.Generator().manual_seed(4)
    tokens = torch.full((3,), BOS)
    for _ in range(4):
        full, full_state = model.step(tokens, full_state)  # (n, V)
        restricted, short_state = short.step(torch.searchsorted(columns, tokens), short_state)  # (n, U)
        expected = full[:, columns] - full[:, columns].logsumexp(-1, keepdim=True)
        assert restricted.shape == (3, len(columns))
        assert (restricted - expected).abs().max() < 1e-5
        tokens = torch.tensor(even)[torch.randint(len(even), (3,), generator=g)]


@pytest.mark.parametrize("kind", ["transformer", "gnmt", "transformer-int8", "gnmt-int8"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_whole_vocabulary_as_the_list_gives_the_output_of_no_shortlist(models, kind: str, setting: str,
                                                                        monkeypatch) -> None:
    model = models[kind]
    short = Shortlisted(model, make_table(list(range(4, VOCAB)), {}), VOCAB, 1)
    calls = recording_steps(short, monkeypatch)  # the restricted path runs: no short cut for a full list
    src, lens = random_source([5, 2, 7, 4], seed=3)
    assert short.encode(src, lens).columns.tolist() == list(range(VOCAB))
    cfg = SETTINGS[setting]
    assert hypotheses(search(short, src, lens, cfg)) == hypotheses(search(model, src, lens, cfg))
    assert calls


@pytest.mark.parametrize("kind", ["transformer", "gnmt", "transformer-int8", "gnmt-int8"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_sentence_alone_gets_what_it_gets_in_a_batch(models, kind: str, setting: str) -> None:
    """Each row is masked to its own sentence's list, so the batch's union changes nothing (int8
    quantizes activations per batch, so its scores agree less closely)."""
    short = Shortlisted(models[kind], SMALL_TABLE, 3, 2)
    src, lens = random_source([6, 3, 8, 5], seed=5)
    cfg = SETTINGS[setting]
    batched = search(short, src, lens, cfg, lines=torch.arange(4))
    tolerance = 0.05 if "int8" in kind else 1e-4
    for i in range(4):
        alone = search(short, src[i : i + 1, : lens[i]], lens[i : i + 1], cfg, lines=torch.tensor([i]))
        if "int8" not in kind:
            assert tokens_of(alone) == tokens_of(batched[i : i + 1])
        for a, b in zip(alone[0], batched[i]):
            assert set(a.tokens) <= sentence_list(src[i], 3, 2)
            if a.tokens == b.tokens:
                assert abs(a.score - b.score) < tolerance


def test_an_ensemble_averages_its_members_over_the_same_columns(models) -> None:
    members = [models["transformer"], models["gnmt"]]
    src, lens = random_source([5, 3, 6], seed=6)
    whole = make_table(list(range(4, VOCAB)), {})
    plain, over_whole = Ensemble(members), Ensemble([Shortlisted(m, whole, VOCAB, 1) for m in members])
    for cfg in SETTINGS.values():
        assert hypotheses(search(over_whole, src, lens, cfg)) == hypotheses(search(plain, src, lens, cfg))
    short = Ensemble([Shortlisted(m, SMALL_TABLE, 2, 2) for m in members])
    memory = short.encode(src, lens)
    state = short.init_state(memory)
    log_probs, _ = short.step(torch.full((3,), BOS), state)  # (n, U)
    parts = [m.step(torch.full((3,), BOS), m.init_state(part))[0] for m, part in zip(short.members, memory.parts)]
    assert torch.equal(log_probs, log_mean_exp(parts))
    for row, hyps in zip(src, search(short, src, lens, SETTINGS["beam"])):
        assert all(set(h.tokens) <= sentence_list(row, 2, 2) for h in hyps)


# --- the IBM Model 1 table

def prepared(pairs: list[tuple[list[int], list[int]]]) -> PreparedCorpus:
    """A prepared corpus held in memory, laid out as nmt.prepare writes one."""
    arrays = {}
    for side, seqs in (("src", [s for s, _ in pairs]), ("tgt", [t for _, t in pairs])):
        lens = np.array([len(s) for s in seqs], dtype=np.uint16)
        arrays[f"{side}.tokens"] = np.concatenate([np.array(s, dtype=np.uint16) for s in seqs])
        arrays[f"{side}.offsets"] = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        arrays[f"{side}.lengths"] = lens
    arrays["lines"] = np.arange(len(pairs))
    return PreparedCorpus(Path("."), {}, arrays)


def test_ibm_model1_learns_the_obvious_translations() -> None:
    """Word-for-word translation in scrambled order, one target word per source word, plus a
    target article on every line: each source word's best translation is its own, and the
    article, the most frequent target piece, heads the frequency list."""
    rng = np.random.default_rng(0)
    article, lexicon = 4, {s: 40 - s for s in range(10, 26)}  # 10 -> 30, 11 -> 29, ...
    pairs = []
    for _ in range(400):
        src = rng.choice(list(lexicon), size=rng.integers(2, 7)).tolist()
        pairs.append((src, [article] + rng.permutation([lexicon[s] for s in src]).tolist()))
    corpora = [prepared(pairs[:150]), prepared(pairs[150:])]  # a data.train list of two corpora
    table = build_table(corpora, 48, "a" * 64, first=3, best=4, prune=0.01, iterations=5, max_pairs=300)
    assert table.pairs == 300 and table.frequent[0] == article and len(table.frequent) == 3
    for s, t in lexicon.items():
        found = table.targets[table.offsets[s] : table.offsets[s + 1]]
        assert found[0] == t and 1 <= len(found) <= 4
        assert table.probs[table.offsets[s]] > 0.5
    assert table.offsets[3] == table.offsets[4] == 0  # a piece that never occurs has no translations


def test_table_file_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / FILE
    write_table(SMALL_TABLE, path)
    back = read_table(path, "0" * 64)
    assert np.array_equal(back.targets, SMALL_TABLE.targets) and np.array_equal(back.frequent, SMALL_TABLE.frequent)
    assert (back.first, back.best) == (SMALL_TABLE.first, SMALL_TABLE.best)
    with pytest.raises(NmtError, match="another SentencePiece model"):
        read_table(path, "1" * 64)
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"not a shortlist at all", data[:100] + bytes(200) + data[300:]):
        path.write_bytes(damaged)
        with pytest.raises(NmtError, match="nmt shortlist RUN"):
            read_table(path)
    write_table(dataclasses.replace(SMALL_TABLE, targets=SMALL_TABLE.targets + 100), path)  # ids beyond V
    with pytest.raises(NmtError, match="damaged"):
        read_table(path)


# --- the command line

@pytest.fixture(scope="module")
def listed_run(trained_run: Path, tmp_path_factory) -> Path:
    """A copy of the trained run with a shortlist built by the command line."""
    run_dir = tmp_path_factory.mktemp("shortlist") / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "last.pt", "eval"))
    result = run("shortlist", str(run_dir), "--first", "50", "--best", "20")
    assert result.exit_code == 0, result.output
    return run_dir


def test_shortlist_command_writes_the_table_and_says_what_it_wrote(listed_run: Path) -> None:
    from nmt.files import sha256

    path = listed_run / FILE
    table = read_table(path, sha256(listed_run / MODEL_FILE))
    assert (table.first, table.best) == (50, 20)
    assert 0 < len(table.frequent) <= 50  # the pieces that occur on the target side, most frequent first
    tokenizer = Tokenizer(listed_run / MODEL_FILE)
    one = table.targets[table.offsets[tokenizer.sp.PieceToId("▁one")]]  # a word that is one piece
    assert tokenizer.sp.IdToPiece(int(one)) == "▁eins"
    result = run("shortlist", str(listed_run), "--first", "50", "--best", "20")
    line = result.stdout.strip()
    assert len(line.splitlines()) == 1 and str(path) in line and " MB" in line and "built in" in line
    assert sha256(path) in line


def test_translate_and_eval_with_a_shortlist(listed_run: Path, corpus: Path) -> None:
    sources = [src for src, _ in make_pairs(12, seed=30)]
    text = "".join(f"{s}\n" for s in sources[:6]) + "\n" + "".join(f"{s}\n" for s in sources[6:])
    full = run("translate", "-m", str(listed_run), input=text)
    short = run("translate", "-m", str(listed_run), "--shortlist", "50,20", input=text)
    assert short.exit_code == 0, short.output
    lines, full_lines = short.stdout.split("\n"), full.stdout.split("\n")
    assert len(lines) == len(full_lines) == 14 and lines[6] == ""  # a line each, the empty one kept
    # A list this wide holds what the model says, for nearly every sentence: scores from the output
    # layer over fewer columns, normalized over the list, differ slightly from the full ones, which
    # can turn a near tie of this tiny model (on one kind of CPU, one sentence of twelve, even with
    # a list of every target piece).
    same = [a == b for i, (a, b) in enumerate(zip(lines[:13], full_lines)) if i != 6]
    assert len(same) == 12 and sum(same) >= 10
    result = run("eval", "--model", str(listed_run), "--src", str(corpus / "test.en"), "--ref",
                 str(corpus / "test.de"), "--shortlist", "20,5", "--beam", "2")
    assert result.exit_code == 0, result.output
    saved = json.loads((listed_run / "eval" / "test.en.best.beam2.shortlist20-5.json").read_text())
    assert saved["search"]["shortlist"] == "20,5"


def test_bad_shortlists_are_one_error_line(listed_run: Path, trained_run: Path, tmp_path: Path) -> None:
    for option, value in (("--first", "0"), ("--best", "0"), ("--prune", "1.5")):
        line = one_error_line(run("shortlist", str(listed_run), option, value))
        assert f"{option} {value}" in line
    for value in ("0,5", "20", "a,b"):
        assert "--shortlist" in one_error_line(run("translate", "-m", str(listed_run), "--shortlist", value,
                                                   input="dog\n"))
    line = one_error_line(run("translate", "-m", str(listed_run), "--shortlist", "100,5", input="dog\n"))
    assert "holds at most 50" in line and "nmt shortlist RUN --first 100" in line
    line = one_error_line(run("translate", "-m", str(trained_run), "--shortlist", "20,5", input="dog\n"))
    assert "nmt shortlist" in line and "has no shortlist" in line
    other = tmp_path / "run"
    shutil.copytree(listed_run, other, ignore=shutil.ignore_patterns("eval"))
    table = read_table(other / FILE)
    write_table(dataclasses.replace(table, spm_sha256="f" * 64), other / FILE)  # another tokenizer's table
    line = one_error_line(run("eval", "--model", str(other), "--src", str(other / "x"), "--ref", str(other / "x"),
                              "--shortlist", "20,5"))
    assert "another SentencePiece model" in line and str(other / FILE) in line
    (other / FILE).write_bytes((listed_run / FILE).read_bytes()[:300])  # truncated
    line = one_error_line(run("translate", "-m", str(other), "--shortlist", "20,5", input="dog\n"))
    assert str(other / FILE) in line and "nmt shortlist RUN" in line


# --- CTranslate2's vocabulary map

def test_ctranslate2_export_with_a_vocabulary_map(listed_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    from nmt.export import ExportedModel

    out = tmp_path / "ct2"
    result = run("export", str(listed_run), "--to", "ctranslate2", str(out), "--shortlist")
    assert result.exit_code == 0, result.output
    table, tokenizer = read_table(listed_run / FILE), Tokenizer(listed_run / MODEL_FILE)
    pieces = [tokenizer.sp.IdToPiece(i) for i in range(len(tokenizer))]
    lines = (out / "vmap.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "\t" + " ".join(pieces[i] for i in table.frequent)  # always candidates
    rules = dict(line.split("\t") for line in lines[1:])
    one = tokenizer.sp.PieceToId("▁one")
    assert rules["▁one"].split() == [pieces[t] for t in table.targets[table.offsets[one] : table.offsets[one + 1]]]
    assert json.loads((out / "search.json").read_text())["search"]["shortlist"] == "50,20"

    # A tight map, from the run's search.shortlist: decoded one sentence at a time (a batch is
    # restricted to the union of its lists), each output lies in its sentence's list.
    tight_run, tight = tmp_path / "run", tmp_path / "tight"
    shutil.copytree(listed_run, tight_run, ignore=shutil.ignore_patterns("eval"))
    (tight_run / "search.yaml").write_text('shortlist: "2,1"\n')
    assert run("export", str(tight_run), "--to", "ctranslate2", str(tight), "--shortlist").exit_code == 0
    engine = ExportedModel(tight, threads=1)
    cfg = dataclasses.replace(engine.search, beam=2, n_best=1)
    assert cfg.shortlist == "2,1"  # the export decodes with its map by default
    changed = 0
    for text in ["one red dog", "big cat sleeps", "two green tree"]:
        (translation,) = engine.translate([text], cfg)
        listed = SPECIALS | set(table.frequent[:2].tolist())
        for s in tokenizer.encode([text])[0]:
            listed |= set(table.targets[table.offsets[s] : table.offsets[s + 1]][:1].tolist())
        assert set(translation.hypotheses[0].tokens) <= listed
        (whole,) = engine.translate([text], dataclasses.replace(cfg, shortlist="none"))
        changed += whole.texts != translation.texts
    assert changed  # the map was applied

    # An export made without a map refuses --shortlist; another size than the map's is refused.
    plain = tmp_path / "plain"
    assert run("export", str(listed_run), "--to", "ctranslate2", str(plain)).exit_code == 0
    line = one_error_line(run("translate", "--engine", "ctranslate2", "-m", str(plain), "--shortlist", "20,5",
                              input="dog\n"))
    assert "exported without a shortlist" in line and "--shortlist" in line
    line = one_error_line(run("translate", "--engine", "ctranslate2", "-m", str(out), "--shortlist", "10,5",
                              input="dog\n"))
    assert "50,20" in line
    result = run("translate", "--engine", "ctranslate2", "-m", str(out), "--shortlist", "50,20", input="one dog\n")
    assert result.exit_code == 0 and "Hund" in result.stdout


def test_a_served_run_decodes_over_its_recipe_s_shortlist(listed_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from nmt.serve.models import _nmt_model

    served_run = tmp_path / "run"
    shutil.copytree(listed_run, served_run)
    (served_run / "search.yaml").write_text("shortlist: '20,5'\n", encoding="utf-8")
    served = _nmt_model(0, served_run, "best", None)
    assert "shortlist 20,5" in served.describe()
    sources = [src for src, _ in make_pairs(6, seed=31)]
    expected = run("translate", "-m", str(listed_run), "--shortlist", "20,5", input="".join(f"{s}\n" for s in sources))
    texts = [t.texts[0] for t in served.decode(sources, served.search)]
    assert texts == expected.stdout.splitlines()
