"""Both models honour the Seq2Seq contract the same way."""

from __future__ import annotations

import pytest
import torch

from nmt import config
from nmt.errors import NmtError
from nmt.models import build_model
from nmt.tokenizer import PAD

VOCAB = 60
SMALL = {
    "transformer": config.TransformerConfig(d_model=32, heads=4, ffn=64, encoder_layers=2, decoder_layers=3,
                                            max_positions=64),
    "gnmt": config.GNMTConfig(embed_dim=24, hidden=32, encoder_layers=3, decoder_layers=3, max_positions=64),
}


@pytest.fixture(params=list(SMALL))
def model(request):
    torch.manual_seed(0)
    return build_model(SMALL[request.param], VOCAB).eval()


def batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, VOCAB, (n,), generator=g)
    return src, torch.tensor(lengths)


def test_step_by_step_equals_forward(model) -> None:
    src, lens = batch([7, 4, 6])
    tgt = torch.randint(4, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(src, lens, tgt).log_softmax(-1)  # (B, T, V)
        state = model.init_state(model.encode(src, lens))
        for t in range(tgt.size(1)):
            log_probs, state = model.step(tgt[:, t], state)
            torch.testing.assert_close(log_probs, full[:, t], atol=1e-5, rtol=1e-5)


def test_padded_batch_equals_each_sentence_alone(model) -> None:
    src, lens = batch([8, 3, 5])
    tgt = torch.randint(4, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        together = model(src, lens, tgt)
        for i, n in enumerate(lens.tolist()):
            alone = model(src[i : i + 1, :n], lens[i : i + 1], tgt[i : i + 1])
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)


def test_state_exposes_attention_over_real_source_tokens_when_asked(model) -> None:
    src, lens = batch([5, 2])
    with torch.no_grad():
        state = model.init_state(model.encode(src, lens), beam=2)
        _, plain = model.step(torch.tensor([2, 2, 2, 2]), state)
        log_probs, asked = model.step(torch.tensor([2, 2, 2, 2]), state, need_attention=True)
    assert plain.attention is None  # not asked for: not computed
    assert asked.attention.shape == (4, 5)  # rows: two beams of each sentence
    torch.testing.assert_close(asked.attention.sum(-1), torch.ones(4))
    assert (asked.attention[2:, 2:] == 0).all()  # padding gets no attention
    # Asking for the weights changes nothing else.
    torch.testing.assert_close(log_probs, model.step(torch.tensor([2, 2, 2, 2]), state)[0], atol=1e-5, rtol=1e-5)


def test_select_reorders_rows_and_drops_sentences(model) -> None:
    src, lens = batch([4, 6, 5])
    with torch.no_grad():
        state = model.init_state(model.encode(src, lens), beam=2)  # rows: 0 0 1 1 2 2 (sentences)
        _, state = model.step(torch.tensor([5, 6, 7, 8, 9, 10]), state)
        # A beam reorder within each sentence, then a step: the same as stepping first.
        reordered = state.select(torch.tensor([1, 1, 3, 2, 4, 5]))
        a, _ = model.step(torch.tensor([9, 9, 9, 9, 9, 9]), reordered)
        b, after = model.step(torch.tensor([9, 9, 9, 9, 9, 9]), state)
        torch.testing.assert_close(a, b[[1, 1, 3, 2, 4, 5]], atol=1e-5, rtol=1e-5)
        # Sentence 1 leaves; sentences 2 and 0 stay, in that order.
        kept = after.select(torch.tensor([5, 4, 0, 1]), sentences=torch.tensor([2, 0]))
        c, _ = model.step(torch.tensor([11, 12, 13, 14]), kept)
        d, _ = model.step(torch.tensor([13, 14, 0, 0, 12, 11]), after)
    torch.testing.assert_close(c, d[[5, 4, 0, 1]], atol=1e-5, rtol=1e-5)


def test_select_widens_a_one_row_state_to_beam_rows(model) -> None:
    """Beam search decodes the first token once per sentence and then widens to k rows:
    the widened state decodes as a state made with k rows from the start, sentences
    leaving it included."""
    src, lens = batch([4, 6, 5])
    with torch.no_grad():
        memory = model.encode(src, lens)
        _, narrow = model.step(torch.tensor([2, 2, 2]), model.init_state(memory))
        wide = narrow.select(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))  # 3 rows per sentence
        _, made = model.step(torch.tensor([2] * 9), model.init_state(memory, beam=3))
        tokens = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13])
        a, wide = model.step(tokens, wide, need_attention=True)
        b, made = model.step(tokens, made, need_attention=True)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wide.attention, made.attention, atol=1e-5, rtol=1e-5)
        rows, sentences = torch.tensor([7, 8, 6, 1, 1, 0]), torch.tensor([2, 0])
        c, _ = model.step(tokens[:6], wide.select(rows, sentences))
        d, _ = model.step(tokens[:6], made.select(rows, sentences))
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)


def test_state_is_a_value(model) -> None:
    """Two steps from one state give the same answers as from two copies of it: a step
    never overwrites what an earlier state reads (the Transformer shares its cache)."""
    src, lens = batch([4, 6])
    with torch.no_grad():
        state = model.init_state(model.encode(src, lens))
        _, state = model.step(torch.tensor([5, 6]), state)
        _, first = model.step(torch.tensor([7, 8]), state)
        _, second = model.step(torch.tensor([9, 10]), state)  # a branch from the same state
        branches = [model.step(torch.tensor([11, 11]), s)[0] for s in (first, second)]
        for tokens, got in zip(([7, 8], [9, 10]), branches, strict=True):
            state = model.init_state(model.encode(src, lens))
            _, state = model.step(torch.tensor([5, 6]), state)
            _, state = model.step(torch.tensor(tokens), state)
            torch.testing.assert_close(got, model.step(torch.tensor([11, 11]), state)[0], atol=1e-6, rtol=1e-6)


def test_long_decoding_grows_the_state(model) -> None:
    """Steps past any preallocated length still equal the full forward."""
    src, lens = batch([3, 5])
    tgt = torch.randint(4, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(src, lens, tgt).log_softmax(-1)
        state = model.init_state(model.encode(src, lens))
        for t in range(tgt.size(1)):
            log_probs, state = model.step(tgt[:, t], state)
    torch.testing.assert_close(log_probs, full[:, -1], atol=1e-4, rtol=1e-4)


def test_one_embedding_matrix_serves_source_target_and_output(model) -> None:
    vocab_sized = [name for name, p in model.named_parameters() if p.dim() and p.size(0) == VOCAB]
    assert vocab_sized == ["embed.weight"]
    src, lens = batch([3])
    with torch.no_grad():
        logits = model(src, lens, torch.tensor([[4, 5]]))
        # Token 11 is in neither input, so only its output logit may move.
        model.embed.weight[11] += torch.randn(model.embed.weight.size(1), generator=torch.Generator().manual_seed(4))
        moved = model(src, lens, torch.tensor([[4, 5]]))
    assert 11 not in src.tolist()[0]
    changed = (moved - logits).abs().amax(dim=(0, 1)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [11]


def test_key_of_the_other_model_is_refused() -> None:
    with pytest.raises(NmtError, match="model.heads belongs to model.kind transformer, not gnmt"):
        config.from_dict({"model": {"kind": "gnmt", "heads": 4}})
    with pytest.raises(NmtError, match="model.hidden belongs to model.kind gnmt"):
        config.from_dict({"model": {"kind": "transformer", "hidden": 4}})


def test_dropout_keeps_a_one_byte_mask_and_scales_what_it_keeps(model) -> None:
    from torch import nn

    from nmt.models.base import Dropout

    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(isinstance(m, Dropout) for m in drops)  # every dropout of the model
    drop = Dropout(0.25).train()
    x = (torch.rand(64, 32) + 1).requires_grad_()
    y = drop(x)
    assert y.grad_fn._saved_result1.dtype == torch.bool  # 1 byte per element kept for backward
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.9
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert drop.eval()(x) is x
