"""int8 decoding: every matrix product of the decoder quantized, answers close to float32."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_pairs
from test_models import batch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdynamic
from typer.testing import CliRunner

from cli.main import app
from nmt import checkpoint, config, rundir
from nmt.errors import NmtError
from nmt.models import build_model
from nmt.quantize import quantize_int8
from nmt.tokenizer import BOS, MODEL_FILE, Tokenizer
from nmt.translate import translate as translate_lines

VOCAB = 80
SMALL = {
    "transformer": config.TransformerConfig(d_model=32, heads=4, ffn=64, encoder_layers=2, decoder_layers=2,
                                            dropout=0.0, max_positions=64),
    "gnmt": config.GNMTConfig(embed_dim=24, hidden=32, encoder_layers=3, decoder_layers=3, dropout=0.0,
                              max_positions=64),
}
runner = CliRunner()


@pytest.fixture(params=list(SMALL))
def model(request):
    torch.manual_seed(0)
    return build_model(SMALL[request.param], VOCAB).eval()


def teacher_forced_steps(model, src, src_lens, tgt) -> torch.Tensor:
    """(B, T, V) log-probs of ``step`` fed the tokens of ``tgt`` (B, T) one by one."""
    with torch.no_grad():
        state = model.init_state(model.encode(src, src_lens))
        out = []
        for t in range(tgt.size(1)):
            log_probs, state = model.step(tgt[:, t], state)
            out.append(log_probs)
    return torch.stack(out, 1)


def modules_of(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is kind]


# --- the int8 copy

def test_every_linear_and_lstm_is_int8_and_so_is_the_output_projection(model) -> None:
    linears, lstms = len(modules_of(model, nn.Linear)), len(modules_of(model, nn.LSTM))
    q = quantize_int8(model)
    assert not modules_of(q, nn.Linear) and not modules_of(q, nn.LSTM)
    assert len(modules_of(q, qdynamic.Linear)) == linears + 1  # + the output projection
    assert len(modules_of(q, qdynamic.LSTM)) == lstms
    assert type(q.output_projection) is qdynamic.Linear
    # The projection holds the embedding matrix: each row within half a step of its int8 grid.
    weight = q.output_projection.weight()  # (V, D), one scale per vocabulary entry
    step = weight.q_per_channel_scales().float()[:, None]
    assert ((weight.dequantize() - model.embed.weight).abs() <= step / 2 + 1e-6).all()
    # The lookup stays float32, and the model handed in is left as it was.
    assert type(q.embed) is nn.Embedding and torch.equal(q.embed.weight, model.embed.weight)
    assert model.output_projection is None and len(modules_of(model, nn.Linear)) == linears


def test_int8_step_log_probs_stay_close_to_float32(model) -> None:
    """Tolerance: int8 weights (per row) and 7-bit activations (per call) put an error of a
    few percent of the log-probs' spread over the vocabulary on each step; a projection
    with wrong weights (another matrix, rows shifted) moves them by several spreads."""
    src, lens = batch([9, 5, 7, 3, 8, 6])
    tgt = torch.randint(4, VOCAB, (6, 8), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = BOS
    ref = teacher_forced_steps(model, src, lens, tgt)  # (B, T, V)
    got = teacher_forced_steps(quantize_int8(model), src, lens, tgt)
    spread = ref.std(-1).mean()
    assert (got - ref).abs().max() < 0.25 * spread
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("kind", list(SMALL))
def test_int8_model_serves_the_search(kind: str, trained_run: Path) -> None:
    tokenizer = Tokenizer(trained_run / MODEL_FILE)
    torch.manual_seed(0)
    q = quantize_int8(build_model(SMALL[kind], len(tokenizer)).eval())
    lines = ["one red dog", "", "big house sleeps", "cat"]
    for beam, n_best in ((1, 1), (3, 2)):
        cfg = config.SearchConfig(beam=beam, n_best=n_best, max_len_a=1.0, max_len_b=3)
        results = translate_lines(q, tokenizer, lines, cfg)
        assert [r.line for r in results] == [0, 1, 2, 3]
        assert all(len(r.texts) == n_best for r in results) and results[1].texts[0] == ""


def test_int8_refused_off_the_cpu(model) -> None:
    with pytest.raises(NmtError, match="CPU only"):
        quantize_int8(model, "cuda")


# --- through the command line and the run directory

def translate(run: Path, text: str, *flags: str):
    result = runner.invoke(app, ["translate", "--model", str(run), *flags], input=text)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_translate_int8_n_lines_in_n_lines_out_deterministic(trained_run: Path) -> None:
    lines = [src for src, _ in make_pairs(40, seed=21)]
    lines[3] = lines[17] = ""
    text = "".join(f"{line}\n" for line in lines)
    first = translate(trained_run, text, "--int8")
    assert first == translate(trained_run, text, "--int8")
    out = first.split("\n")[:-1]
    assert len(out) == 40 and out[3] == out[17] == ""
    # int8 changes a few of the tiny model's translations (one in ten on the machines this
    # was written on); a broken int8 model would change nearly all.
    fp32 = translate(trained_run, text).split("\n")[:-1]
    assert sum(a == b for a, b in zip(out, fp32)) >= 0.75 * 40


def test_recipe_search_int8_applies_and_no_int8_overrides(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "last.pt", "eval"))
    state = torch.load(run / "best.pt", weights_only=True)
    state["config"]["search"]["int8"] = True
    checkpoint.save({k: v for k, v in state.items() if k not in ("format", "version")}, run / "best.pt")
    cfg, _, net = rundir.load_run(run)
    assert cfg.search.int8 and type(net.output_projection) is qdynamic.Linear
    cfg, _, net = rundir.load_run(run, int8=False)
    assert not cfg.search.int8 and net.output_projection is None
    assert translate(run, "red dog\n") == translate(trained_run, "red dog\n", "--int8")


def test_int8_with_cuda_is_one_error_line(trained_run: Path, corpus: Path, monkeypatch) -> None:
    monkeypatch.setattr("nmt.hardware.pick_device", lambda: torch.device("cuda"))
    for args in (["translate", "--model", str(trained_run), "--int8"],
                 ["eval", "--model", str(trained_run), "--src", str(corpus / "test.en"),
                  "--ref", str(corpus / "test.de"), "--int8"]):
        result = runner.invoke(app, args, input="red dog\n")
        assert result.exit_code == 1 and "Traceback" not in result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("nmt: error:")]
        assert len(errors) == 1 and "CPU only" in errors[0], result.stderr
