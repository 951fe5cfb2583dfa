"""Word alignments (nmt translate --alignment) from the attention the search keeps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_pairs
from test_cli import run
from test_search import SMALL, TableModel, source

from nmt.config import SearchConfig
from nmt.models import build_model
from nmt.search import beam_search
from nmt.tokenizer import EOS, Tokenizer
from nmt.translate import translate, word_alignment

A, B, C = 4, 5, 6  # target pieces: "▁die" "▁Häus" "er"
X, Y, Z = 10, 11, 9  # source pieces: "▁the" "▁house" "s"

# The target is A B C, then EOS; each step's attention over the source X Y Z EOS is forced.
TABLE = {(X,): {A: 1.0}, (X, A): {B: 1.0}, (X, A, B): {C: 1.0}}
ATTENTION = {
    (X,): [0.7, 0.1, 0.1, 0.1],  # die -> the
    (X, A): [0.1, 0.2, 0.6, 0.1],  # Häus -> s (of houses)
    (X, A, B): [0.3, 0.1, 0.1, 0.5],  # er -> source EOS, left out: the next best, the
    (X, A, B, C): [0.0, 0.0, 0.0, 1.0],  # EOS: no target word
}


def test_forced_attention_gives_word_pairs_after_merging_pieces() -> None:
    src, lens = source([X, Y, Z, EOS])
    (hyp,) = beam_search(TableModel(TABLE, ATTENTION), src, lens, SearchConfig(beam=2), keep_attention=True)[0]
    assert hyp.tokens == [A, B, C] and hyp.attention.shape == (4, 4)
    pairs = word_alignment(["▁the", "▁house", "s"], ["▁die", "▁Häus", "er"], hyp.attention)
    # Pieces: die->the (0-0), Häus->s (1-1), er->the (0-1); words: the houses / die Häuser.
    assert pairs == [(0, 0), (0, 1), (1, 1)]


def test_bare_space_and_byte_pieces_join_the_right_words() -> None:
    # "a , b€": "▁a" "▁" "," "▁b" "<0xE2>" "<0x82>" "<0xAC>" are the words a, ",", b€.
    src = ["▁a", "▁", ",", "▁b", "<0xE2>", "<0x82>", "<0xAC>"]
    attention = torch.eye(7)  # target piece j attends to source piece j
    pairs = word_alignment(src, src[:6], attention)
    assert pairs == [(0, 0), (1, 1), (2, 2)]


def alignment_rows(stdout: str, n_best: int) -> list[tuple[str, str]]:
    rows = []
    for line in stdout.split("\n")[:-1]:
        text, alignment = line.split("\t")  # exactly one tab
        rows.append((text if n_best == 1 else text.split(" ||| ")[1], alignment))
    return rows


def check_pairs(src: str, text: str, alignment: str) -> None:
    assert re.fullmatch(r"(\d+-\d+( \d+-\d+)*)?", alignment), alignment
    pairs = [tuple(map(int, p.split("-"))) for p in alignment.split()]
    assert pairs == sorted(set(pairs), key=lambda p: (p[1], p[0]))  # unique, by target then source word
    assert all(i < len(src.split()) and j < len(text.split()) for i, j in pairs)
    assert {j for _, j in pairs} == set(range(len(text.split())))  # every target word is aligned


@pytest.mark.parametrize("args, n_best", [([], 1), (["--beam", "3", "--n-best", "2"], 2),
                                          (["--sampling", "topk:3", "--n-best", "2"], 2)])
def test_alignment_on_every_hypothesis_line(trained_run: Path, args: list[str], n_best: int) -> None:
    sources = [s for s, _ in make_pairs(12, seed=31)] + [""]
    result = run("translate", "--model", str(trained_run), "--alignment", *args,
                 input="".join(f"{s}\n" for s in sources))
    assert result.exit_code == 0, result.output
    rows = alignment_rows(result.stdout, n_best)
    assert len(rows) == len(sources) * n_best
    for k, (text, alignment) in enumerate(rows):
        check_pairs(sources[k // n_best], text, alignment)
    assert rows[-1] == ("", "")  # an empty line: no translation, no pairs


@pytest.mark.parametrize("kind", list(SMALL))
def test_both_models_give_alignments(trained_run: Path, kind: str) -> None:
    tokenizer = Tokenizer(trained_run / "spm.model")
    torch.manual_seed(0)
    net = build_model(SMALL[kind], vocab_size=len(tokenizer)).eval()
    sources = ["red dog runs", "small green tree sleeps"]
    results = translate(net, tokenizer, sources, SearchConfig(beam=2, n_best=2, max_len_a=1.0, max_len_b=3),
                        keep_attention=True)
    for src, r in zip(sources, results):
        assert len(r.alignments) == len(r.texts) == 2
        for text, alignment in zip(r.texts, r.alignments):
            check_pairs(src, text, alignment)
