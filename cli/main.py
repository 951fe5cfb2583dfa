"""The ``nmt`` command: thin typer commands that each call one library function.

Every problem a user can fix reaches them as one line, ``nmt: error: ...``, with exit
status 1; progress and log messages go to stderr, translations to stdout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, BinaryIO, Optional

import typer
from tqdm import tqdm

from nmt.errors import NmtError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Neural machine translation: train, translate, evaluate.")
data_app = typer.Typer(no_args_is_help=True, help="Download training and test corpora into $NMT_DATA.")
app.add_typer(data_app, name="data")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear through a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("nmt")
    logger.handlers = [_TqdmHandler()]
    logger.handlers[0].setFormatter(logging.Formatter("nmt: %(message)s"))
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def user_errors(fn):
    """Turn NmtError (and a bare Ctrl-C) into one line on stderr and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NmtError as e:
            typer.echo(f"nmt: error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("nmt: interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            raise typer.Exit(0) from None
    return wrapper


@app.callback()
def _root(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False):
    _setup_logging(quiet)


# --- train ----------------------------------------------------------------------------------

@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file, or a run directory to resume.")],
    run: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/<recipe name>).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a recipe key: --set train.lr=5e-4 (repeatable).")] = None,
    test: Annotated[bool, typer.Option(
        help="After training, translate the test split with best.pt and print BLEU.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    nproc: Annotated[int, typer.Option(
        help="Processes (one per GPU, or CPU ranks with gloo): the same as torchrun --nproc-per-node.")] = 1,
    init_from: Annotated[Optional[Path], typer.Option(
        help="Fine-tune: start from this run's weights and spm.model (same model shape and tokenizer "
             "settings; dropouts may differ). Step, schedule, best score and patience start fresh.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(
        help="With --init-from: the parent's checkpoint, best (default), last, averaged or a path.")] = None,
    keep_optimizer: Annotated[bool, typer.Option(
        help="With --init-from: also load the parent's Adam moments (needs --checkpoint last); the "
             "step count and the learning rate schedule (warmup included) still start at 0.")] = False,
):
    """Train a model from a recipe; on a run directory with last.pt, resume exactly.

    The corpus is read from the arrays `nmt prepare` writes, prepared first if missing or stale.
    Data-parallel training: `nmt train RECIPE --nproc N`, or `torchrun --nproc-per-node N -m nmt
    train RECIPE` (add --nnodes and --rdzv-endpoint for several machines).
    Fine-tuning: `nmt train RECIPE --init-from RUN --run NEW`; config.yaml records where NEW
    started (init_from), and `nmt train NEW` resumes it like any run. RUN is only read.
    """
    from nmt import config, distributed
    from nmt.metrics import bleu_metric
    from nmt.rundir import fine_tune
    from nmt.train import train as run_training

    if init_from is None and (checkpoint is not None or keep_optimizer):
        raise NmtError("--checkpoint and --keep-optimizer choose what --init-from loads; add --init-from RUN")
    if nproc < 1:
        raise NmtError(f"--nproc {nproc}: give at least 1 process (one per GPU, or CPU ranks)")
    distributed.check_gpus(nproc, f"--nproc {nproc}")
    if nproc > 1 and not distributed.launched():
        distributed.run_torchrun(nproc, rank_main, [_argv_without("--nproc")], preload=["nmt.train", "cli.main"])
        return
    recipe, run = _recipe_of(recipe, run)
    cfg = config.load_recipe(recipe, set_ or [])
    bleu_metric(cfg.data.bleu_tokenize)  # a BLEU tokenization that cannot load here fails now, not at validation
    if init_from is not None:
        cfg = fine_tune(cfg, init_from, checkpoint or "best", keep_optimizer)
    run_dir = run or Path("runs") / cfg.name
    run_training(cfg, run_dir, progress_bar=progress and sys.stderr.isatty())
    if test and cfg.data.test and int(os.environ.get("RANK", "0")) == 0:
        src, ref = config.split_paths(cfg.data, "test")
        if src.exists() and ref.exists():
            result = _evaluate_model(run_dir, src, ref, "best", None)
            typer.echo(f"test {src.name} -> {ref.name}: {result['BLEU']['line']}")
            typer.echo(f"test {src.name} -> {ref.name}: {result['chrF2']['line']}")


def _recipe_of(recipe: Path, run: Path | None) -> tuple[Path, Path | None]:
    """(recipe file, run directory) of a command given a recipe, or a run directory to go on with."""
    from nmt.rundir import CONFIG_FILE

    if recipe.is_dir():
        return recipe / CONFIG_FILE, run or recipe
    return recipe, run


def rank_main(argv: list[str]) -> None:
    """One rank of ``nmt train --nproc N``: runs ARGV as ``python -m nmt ARGV`` would.

    The rank leaves the terminal's process group, so a Ctrl-C reaches the launcher alone,
    which hands it on to every rank once: each rank sees one signal, stops after its update
    in progress, and rank 0 saves (two signals would stop it mid-update, unsaved).
    """
    os.setpgid(0, 0)
    app(args=argv, prog_name="nmt")


def _argv_without(option: str) -> list[str]:
    """This command line minus ``option`` and its value (for handing on to torchrun)."""
    args, out, skip = sys.argv[1:], [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            out.append(arg)
    return out


@app.command()
@user_errors
def prepare(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file, or a run directory that has config.yaml.")],
    run: Annotated[Optional[Path], typer.Option(
        help="Run directory whose spm.model is used, or gets the one trained (default: runs/<recipe name>).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a recipe key: --set data.dir=big (repeatable).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
):
    """Encode the train and valid splits once into memory-mapped arrays, shared by later runs.

    The tokenizer is the run's spm.model, or tokenizer.reuse's, or one trained now on a sample
    of the training data (tokenizer.sample_sentences lines per side) and written to RUN/spm.model.
    The arrays go to $NMT_CACHE/prepared (default ~/.cache/nmt/prepared). Prints each stage's time.
    A data.train list of corpora ([{path: train}, {path: /data/bt, weight: 0.5}]) is prepared corpus
    by corpus, with the pairs each gives an epoch (round(weight * pairs)).
    """
    from nmt import config
    from nmt.prepare import describe, prepare_recipe

    recipe, run = _recipe_of(recipe, run)
    cfg = config.load_recipe(recipe, set_ or [])
    tokenizer, timings, reports = prepare_recipe(cfg, run or Path("runs") / cfg.name,
                                                 progress=progress and sys.stderr.isatty())
    typer.echo(describe(tokenizer, timings, reports))


# --- bench ----------------------------------------------------------------------------------

@app.command()
@user_errors
def bench(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file, or a run directory (its recipe, spm.model and "
                                                "lengths.json).")],
    steps: Annotated[int, typer.Option(help="Updates timed, after the warm-up.")] = 20,
    warmup: Annotated[int, typer.Option(help="Updates made before the clock starts.")] = 3,
    nproc: Annotated[int, typer.Option(
        help="Processes (one per GPU, or CPU ranks with gloo), as nmt train --nproc.")] = 1,
    out: Annotated[Optional[Path], typer.Option(help="Probe file to write (default: probe-<name>.json).")] = None,
    synthetic: Annotated[bool, typer.Option(
        help="Batches of random ids in pairs whose lengths are drawn from the run's lengths.json, for a "
             "machine without the corpus.")] = False,
    run: Annotated[Optional[Path], typer.Option(
        help="With a recipe file: the run whose spm.model and lengths.json are used (default: runs/<recipe "
             "name>).")] = None,
    force: Annotated[bool, typer.Option(
        help="Probe even while other processes load the machine (the load is recorded in the file).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a recipe key: --set train.precision=bf16 (repeatable).")] = None,
    load_before: Annotated[Optional[float], typer.Option(hidden=True)] = None,  # measured by the launcher of --nproc
):
    """Time real training updates of a recipe's model and batches on this hardware (a minute or two).

    Writes seconds per update, target tokens/s, peak memory, the device and CPU kind, precision and
    ranks to a JSON file, from which `nmt report RUN... --time-from FILE` projects runs' training time
    onto this hardware. Other processes' load is measured before and during the probe; above 10% of
    the cores' time the probe is refused unless --force.
    """
    from nmt import distributed, probe

    if nproc < 1:
        raise NmtError(f"--nproc {nproc}: give at least 1 process (one per GPU, or CPU ranks)")
    distributed.check_gpus(nproc, f"--nproc {nproc}")
    cfg, run_dir = probe.resolve(recipe, set_ or [], run)
    lengths = probe.synthetic_lengths(cfg, run_dir) if synthetic else None
    path = out or probe.default_out(cfg)
    if not distributed.launched():
        load_before = probe.check_load(force)
        if nproc > 1:  # the ranks run this command again, told the load measured here; rank 0 prints
            argv = [*_argv_without("--nproc"), *(["--out", str(path)] if out is None else []),
                    *(["--load-before", f"{load_before}"] if load_before is not None else [])]
            distributed.run_torchrun(nproc, rank_main, [argv], preload=["nmt.probe", "cli.main"],
                                     after_failure=f"{path} is not written (the failing rank said why above)")
            return
    record = probe.run_probe(cfg, path, steps, warmup, lengths, load_before, force, source=str(recipe))
    if record is not None:
        typer.echo(probe.describe(record, path))


# --- translate ------------------------------------------------------------------------------

def _open_input(path: Optional[Path]) -> tuple[BinaryIO, str]:
    """The byte stream to translate (stdin, or the --input file, unbuffered) and its name in messages."""
    if path is None or str(path) == "-":
        return sys.stdin.buffer, "<stdin>"
    try:
        return open(path, "rb", buffering=0), str(path)
    except FileNotFoundError:
        raise NmtError(f"{path}: no such file; check the --input path") from None
    except IsADirectoryError:
        raise NmtError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise NmtError(f"{path}: cannot be read ({e.strerror or e})") from None


def _output_lines(results: list, n_best: int, alignment: bool = False) -> str:
    """One line per translation, or n_best lines 'line ||| text ||| score' each; with
    ``alignment`` each line ends with a tab and the hypothesis' word alignment."""
    out_lines = []
    for r in results:
        if n_best == 1:
            lines = [r.texts[0]]
        else:
            scores = [h.score for h in r.hypotheses] + [float("-inf")] * n_best
            lines = [f"{r.line} ||| {t} ||| {s:.4f}" for t, s in zip(r.texts, scores)]
        if alignment:
            lines = [f"{line}\t{a}" for line, a in zip(lines, r.alignments + [""] * n_best)]
        out_lines += lines
    return "".join(f"{line}\n" for line in out_lines)


def _check_counts(**options: Optional[int]) -> None:
    """Refuse a count option below 1 before loading a model: ``--beam 0`` and the like."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise NmtError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def _search_config(cfg, beam, n_best, length_penalty, coverage_penalty, max_sentences, **more):
    """The run's search settings with the options given on the command line (None: not given)."""
    given = dict(beam=beam, n_best=n_best, length_penalty=length_penalty, coverage_penalty=coverage_penalty,
                 max_sentences=max_sentences, **more)
    search = dataclasses.replace(cfg.search, **{k: v for k, v in given.items() if v is not None})
    if search.beam < 1:
        raise NmtError(f"--beam {search.beam}: the beam size must be at least 1 (1 is greedy search)")
    if search.sampling != "none":  # no beam: --n-best is the number of samples
        if beam is not None and beam > 1:
            raise NmtError(f"--beam {beam} with --sampling {search.sampling}: sampling draws each token, it "
                           "keeps no beam; drop --beam (--n-best N draws N samples) or give --sampling none")
        return search
    if not 1 <= search.n_best <= search.beam:
        whose = "--beam" if beam is not None else "the recipe's search.beam"
        raise NmtError(f"--n-best {search.n_best} is more than the beam ({whose} {search.beam}): beam search "
                       f"keeps at most beam hypotheses; raise --beam or lower --n-best")
    return search


WORKERS_HELP = ("Batches decoded at once, each on cores/N intra-op threads; the output is the same for "
                "any N (default: 2 on a CPU with 2 cores or more, 1 on a GPU; see nmt.translate.default_workers, "
                "and bench/decode_workers.py to measure).")


def _progress(total: Optional[int], enabled: bool):
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="sent", dynamic_ncols=True)


@app.command()
@user_errors
def translate(
    model: Annotated[list[Path], typer.Option("--model", "-m", help=(
        "Run directory written by nmt train. Repeat for an ensemble: at each step the members' "
        "log-probs are averaged as the log of their mean probability, logsumexp(logp) - log M; the members "
        "must share spm.model, the search settings are the first run's."))],
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Source text (default: stdin).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Translations (default: stdout).")] = None,
    checkpoint: Annotated[str, typer.Option(help="best, last, averaged, or a checkpoint path.")] = "best",
    beam: Annotated[Optional[int], typer.Option(help="Beam size; 1 is greedy (default: the recipe's).")] = None,
    n_best: Annotated[Optional[int], typer.Option(
        help="Print the K best per line as 'line ||| text ||| score' (with --sampling: K samples, "
             "in draw order).")] = None,
    length_penalty: Annotated[Optional[float], typer.Option(help="GNMT length penalty alpha.")] = None,
    coverage_penalty: Annotated[Optional[float], typer.Option(help="GNMT coverage penalty beta.")] = None,
    stop: Annotated[Optional[str], typer.Option(
        help="Beam search stopping rule: standard (once beam hypotheses are finished) or exact (once "
             "nothing alive can beat the n-best; slower).")] = None,
    sampling: Annotated[Optional[str], typer.Option(
        help="Draw translations instead of searching (back-translation): topk:K or topp:P, none to "
             "search (default: the recipe's search.sampling). The same for any batch size, given --seed.")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help="With --sampling: log-probs divided by T before drawing (default 1).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="With --sampling: with each line's number, fixes the draws (default: search.seed, 0).")] = None,
    alignment: Annotated[bool, typer.Option(
        "--alignment", help="Append a tab and each hypothesis' word alignment from the attention, "
        "'i-j' pairs (source word i, target word j, from 0).")] = False,
    min_len: Annotated[Optional[int], typer.Option(help="Fewest output tokens (default 1: never empty).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Most sentences per batch.")] = None,
    int8: Annotated[Optional[bool], typer.Option(
        "--int8/--no-int8", help="Decode with an int8 copy of the model, CPU only (default: the recipe's).")] = None,
    shortlist: Annotated[Optional[str], typer.Option(
        help="FIRST,BEST: the output layer over a vocabulary shortlist (RUN/shortlist.npz, from nmt shortlist "
             "RUN): each sentence may produce its FIRST most frequent target pieces and the BEST translations of "
             "each of its source pieces; none: the whole vocabulary (default: the recipe's search.shortlist). "
             "With --engine ctranslate2: the export's vocabulary map (nmt export --shortlist), which restricts "
             "a batch to the union of its sentences' lists, so the output can depend on the batch.")] = None,
    on_bad_line: Annotated[str, typer.Option(
        help="A line that is not UTF-8: error (stop), replace (bad bytes by U+FFFD) or skip-empty "
             "(an empty line out); the last two warn with the line number.")] = "error",
    engine: Annotated[str, typer.Option(
        help="nmt, or ctranslate2: --model is then a directory written by nmt export, decoded by "
             "CTranslate2 in the precision it was exported in (--checkpoint, --int8 do not apply).")] = "nmt",
    chunk_lines: Annotated[int, typer.Option(
        help="Most lines read and translated at a time (the first chunk at most 16, doubling up to this); "
             "memory grows with it, not with the input.")] = 2000,
    workers: Annotated[Optional[int], typer.Option(
        help=WORKERS_HELP + " With --engine ctranslate2: CTranslate2's inter_threads.")] = None,
):
    """Translate lines from stdin (or --input) to stdout: N lines in, N lines out, in order.

    The input streams through in chunks, each written out before the next is read, so a line
    typed into a pipe is translated without waiting for the end of the input.
    """
    from nmt.data import ON_BAD_LINE, InvalidUtf8
    from nmt.ensemble import load_ensemble
    from nmt.hardware import pick_device
    from nmt.translate import default_workers, read_chunks, translate_stream
    from nmt.translate import translate as run_translate

    _check_counts(beam=beam, n_best=n_best, batch_size=batch_size, chunk_lines=chunk_lines, workers=workers)
    workers = default_workers(pick_device()) if workers is None else workers
    if on_bad_line not in ON_BAD_LINE:
        raise NmtError(f"--on-bad-line {on_bad_line}: choose one of {', '.join(ON_BAD_LINE)}")
    if engine not in ("nmt", "ctranslate2"):
        raise NmtError(f"--engine {engine}: choose nmt or ctranslate2")
    if engine == "ctranslate2":
        from nmt.export import ExportedModel

        if len(model) > 1:
            raise NmtError("--engine ctranslate2 decodes one exported model; give one --model")
        if sampling not in (None, "none") or alignment:
            raise NmtError("--sampling and --alignment need --engine nmt (the default)")
        exported = ExportedModel(model[0], workers=workers)
        search = _search_config(exported, beam, n_best, length_penalty, coverage_penalty, batch_size,
                                stop=stop, min_len=min_len, shortlist=shortlist)
        decode = exported.translate
    else:
        cfg, tokenizer, net = load_ensemble(model, checkpoint, pick_device(), int8, shortlist)
        search = _search_config(cfg, beam, n_best, length_penalty, coverage_penalty, batch_size,
                                stop=stop, min_len=min_len, sampling=sampling, temperature=temperature, seed=seed)
        decode = functools.partial(run_translate, net, tokenizer, keep_attention=alignment, workers=workers)
    stream, name = _open_input(input)
    try:
        out = sys.stdout if output is None else open(output, "w", encoding="utf-8")
    except OSError as e:
        raise NmtError(f"{output}: cannot be written ({e.strerror or e})") from None
    try:
        chunks = read_chunks(stream, chunk_lines, on_bad_line=on_bad_line, name=name)
        with _progress(None, sys.stderr.isatty()) as bar:
            for results in translate_stream(decode, chunks, search, on_batch=bar.update, source_name=name):
                out.write(_output_lines(results, search.n_best, alignment))
                out.flush()  # this chunk's translations are out before the next chunk is read
    except InvalidUtf8 as e:
        raise NmtError(f"{e}; or translate the other lines with --on-bad-line replace|skip-empty") from None
    finally:
        if out is not sys.stdout:
            out.close()
        if stream is not sys.stdin.buffer:
            stream.close()


# --- score ----------------------------------------------------------------------------------

@app.command()
@user_errors
def score(
    model: Annotated[Path, typer.Option("--model", "-m", help="Run directory written by nmt train.")],
    src: Annotated[Path, typer.Option(help="Source sentences, one per line.")],
    tgt: Annotated[Path, typer.Option(help="Their translations to score, line-aligned with --src.")],
    checkpoint: Annotated[str, typer.Option(help="best, last, averaged, or a checkpoint path.")] = "best",
    batch_size: Annotated[Optional[int], typer.Option(help="Most pairs per batch.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
):
    """Score given translations by forced decoding: per pair, the log-probability of the target
    (EOS included), its token count and the mean per token, tab-separated, in input order."""
    import json

    from nmt.hardware import pick_device
    from nmt.rundir import load_run
    from nmt.score import score_files

    _check_counts(batch_size=batch_size)
    cfg, tokenizer, net = load_run(model, checkpoint, pick_device(), int8=False)  # the model's own scores
    scores = score_files(net, tokenizer, src, tgt, cfg.search.max_tokens, batch_size or cfg.search.max_sentences)
    for s in scores:
        if as_json:
            typer.echo(json.dumps({"log_prob": s.log_prob, "tokens": s.tokens, "mean_log_prob": s.mean}))
        else:
            typer.echo(f"{s.log_prob:.4f}\t{s.tokens}\t{s.mean:.4f}")


# --- eval -----------------------------------------------------------------------------------

def _evaluate_model(run_dir: list[Path], src: Path, ref: Path, checkpoint: str, beam: Optional[int],
                    int8: Optional[bool] = None, stop: Optional[str] = None, shortlist: Optional[str] = None,
                    workers: int = 1) -> dict:
    from nmt.evaluate import evaluate_run
    from nmt.hardware import pick_device

    return evaluate_run(run_dir, src, ref, checkpoint, beam, pick_device(), int8, stop, shortlist, workers=workers)


def _sweep(run_dir: Path, items: list[str], src: Optional[Path], ref: Optional[Path], checkpoint: str,
           int8: Optional[bool], save: bool, workers: int = 1, **fixed) -> None:
    from nmt.evaluate import parse_sweep, sweep_run, sweep_table
    from nmt.hardware import pick_device
    from nmt.rundir import SEARCH_FILE

    _check_counts(beam=fixed.get("beam"))
    fixed = {k: v for k, v in fixed.items() if v is not None}
    rows = sweep_run(run_dir, parse_sweep(items), src, ref, checkpoint, pick_device(), fixed, save, int8,
                     workers=workers)
    typer.echo(sweep_table(rows))
    best = max(rows, key=lambda r: r.bleu)
    setting = " ".join(f"{k}={v}" for k, v in best.setting.items())
    saved = f"; saved in {run_dir / SEARCH_FILE}" if save else ""
    typer.echo(f"best: {setting} (BLEU {best.bleu:.2f}, BP {best.bp:.3f}){saved}")


@app.command("eval")
@user_errors
def eval_(
    hyp: Annotated[Optional[Path], typer.Option(help="Translations to score.")] = None,
    ref: Annotated[Optional[Path], typer.Option(help="Reference translations, line-aligned.")] = None,
    bleu_: Annotated[bool, typer.Option("--bleu", help="Score BLEU (sacreBLEU's, cased; see --tokenize).")] = False,
    tokenize: Annotated[Optional[str], typer.Option(
        help="BLEU's tokenization, one of sacreBLEU's: 13a (its default, for raw text), none (text already "
             "tokenized), intl, zh, char, ja-mecab, ... Not with --model: a run scores as its "
             "data.bleu_tokenize says.")] = None,
    chrf_: Annotated[bool, typer.Option("--chrf", help="Score chrF.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print sacreBLEU's JSON.")] = False,
    width: Annotated[int, typer.Option(help="Decimals, as sacrebleu -w.")] = 1,
    model: Annotated[Optional[list[Path]], typer.Option(
        "--model", "-m", help="Run directory: translate --src, then score. Repeat for an ensemble (as in "
        "nmt translate: mean probability of the members, the first run's search settings).")] = None,
    src: Annotated[Optional[Path], typer.Option(help="Source text to translate with --model.")] = None,
    checkpoint: Annotated[str, typer.Option(help="With --model: best, last, averaged or a path.")] = "best",
    beam: Annotated[Optional[int], typer.Option(help="With --model: beam size.")] = None,
    int8: Annotated[Optional[bool], typer.Option(
        "--int8/--no-int8", help="With --model: decode with an int8 copy, CPU only (default: the recipe's).")] = None,
    stop: Annotated[Optional[str], typer.Option(
        help="With --model: beam search stopping rule, standard or exact.")] = None,
    shortlist: Annotated[Optional[str], typer.Option(
        help="With --model: FIRST,BEST decodes over the run's vocabulary shortlist (see nmt translate "
             "--shortlist), none over the whole vocabulary (default: the recipe's search.shortlist).")] = None,
    sweep: Annotated[Optional[list[str]], typer.Option(
        help="With --model: translate once per setting and print BLEU and BP of each, e.g. --sweep "
             "length_penalty=0.6,1.0,1.4 (repeat for a grid); --src/--ref default to the valid split.")] = None,
    save: Annotated[bool, typer.Option(help="With --sweep: write the best setting to RUN/search.yaml.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="With --model: " + WORKERS_HELP)] = None,
):
    """Score translations with sacreBLEU, or translate and score in one go with --model."""
    from nmt.data import read_lines
    from nmt.metrics import DEFAULT_TOKENIZE, bleu, check_tokenize, chrf, format_scores
    from nmt.rundir import EVAL_DIR

    if tokenize is not None and model is not None:
        raise NmtError(f"--tokenize {tokenize} scores --hyp against --ref; with --model the run's data.bleu_tokenize "
                       "applies (score its eval/*.hyp with --hyp, --ref and --tokenize for another)")
    if tokenize is not None:
        check_tokenize(tokenize, "--tokenize")
    _check_counts(workers=workers)
    if workers is None:
        from nmt.hardware import pick_device
        from nmt.translate import default_workers

        workers = default_workers(pick_device())
    if sweep or save:
        if model is None or not sweep:
            raise NmtError("--sweep needs --model (the run to tune) and --save needs --sweep")
        if len(model) > 1:
            raise NmtError("--sweep tunes one run; give one --model")
        _sweep(model[0], sweep, src, ref, checkpoint, int8, save, workers, beam=beam, stop=stop, shortlist=shortlist)
        return
    if ref is None:
        raise NmtError("--ref is required: the reference translations")
    if model is not None:
        if src is None:
            raise NmtError("--model needs --src, the source text to translate")
        result = _evaluate_model(model, src, ref, checkpoint, beam, int8, stop, shortlist, workers)
        typer.echo(result["BLEU"]["line"])
        typer.echo(result["chrF2"]["line"])
        typer.echo(f"decoded {result['sentences']} sentences in {result['decode_seconds']:.1f} s "
                   f"({result['sentences_per_s']:.1f} sentences/s); saved in {model[0] / EVAL_DIR}", err=True)
        return
    if hyp is None:
        raise NmtError("give --hyp and --ref to score, or --model, --src and --ref")
    hyps, refs = read_lines(hyp), read_lines(ref)
    metrics = []
    if bleu_ or not chrf_:
        metrics.append(bleu(hyps, refs, str(hyp), str(ref), tokenize or DEFAULT_TOKENIZE))
    if chrf_:
        metrics.append(chrf(hyps, refs, str(hyp), str(ref)))
    typer.echo(format_scores(metrics, as_json, width))


# --- report and attention -------------------------------------------------------------------

@app.command()
@user_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    fmt: Annotated[str, typer.Option("--format", help="md, csv or json.")] = "md",
    plot: Annotated[Optional[Path], typer.Option(help="Write valid BLEU against training time to this PNG.")] = None,
    target: Annotated[Optional[float], typer.Option(help="Valid BLEU whose first reaching is timed.")] = None,
    speed: Annotated[bool, typer.Option(help="Add tokens/s over time to the plot.")] = False,
    at: Annotated[Optional[str], typer.Option(
        help="Training minutes, comma-separated (e.g. 10,20,40,80): best valid BLEU by each.")] = None,
    allow_mixed: Annotated[bool, typer.Option(
        help="Report runs with different tokenizers, test sets, CPUs or CPU kinds, and runs resumed on "
             "another machine.")] = False,
    baseline: Annotated[Optional[str], typer.Option(
        help="The run (name or path) the paired bootstrap p-values compare with; default: the first.")] = None,
    group_seeds: Annotated[bool, typer.Option(
        help="Summarize runs of one recipe that differ only in train.seed: mean ± sd; the plot draws the "
             "mean in a min–max band; p-values compare the groups' first seeds.")] = False,
    breakdown: Annotated[Optional[list[str]], typer.Option(
        help="length or frequency (repeat for both): test BLEU/chrF per source-length bucket, or target-word "
             "F per training-frequency bucket, with intervals and Holm-corrected p-values against the "
             "baseline; printed instead of the cost table.")] = None,
    plot_breakdown: Annotated[Optional[Path], typer.Option(help="Write the --breakdown buckets to this PNG.")] = None,
    bucket_min: Annotated[int, typer.Option(help="Fewest test sentences in a source-length bucket.")] = 100,
    buckets: Annotated[int, typer.Option(help="Source-length buckets before small ones are merged.")] = 5,
    at_updates: Annotated[Optional[str], typer.Option(
        help="Updates, comma-separated (e.g. 1000,2000,4000): best valid BLEU by each, updates to --target, and "
             "how each run ended (converged by train.patience, or stopped at a cap); no clock affects it.")] = None,
    plot_updates: Annotated[Optional[Path], typer.Option(
        help="Write valid BLEU against updates to this PNG (seed groups: mean in a min–max band).")] = None,
    time_from: Annotated[Optional[list[Path]], typer.Option(
        help="A probe file of nmt bench (repeatable: a column and a curve per probed machine): each run's training "
             "time projected onto that hardware, its updates × the probe's seconds per update; --plot then draws "
             "BLEU against projected time.")] = None,
):
    """One row per run: cost (training time, tokens/s) and quality (valid/test BLEU, chrF).

    Test scores come with sacreBLEU's 95% confidence interval and paired bootstrap p-value
    (1000 resamples, seed SACREBLEU_SEED) against the baseline, from the hypotheses nmt eval kept.
    """
    from nmt import report as reports

    if breakdown or plot_breakdown is not None:
        from nmt.report import breakdown as by_bucket

        cost = [name for name, given in (("--plot", plot is not None), ("--target", target is not None),
                                         ("--at", at is not None), ("--speed", speed), ("--group-seeds", group_seeds),
                                         ("--at-updates", at_updates is not None),
                                         ("--plot-updates", plot_updates is not None))
                if given]
        if cost or not breakdown:
            raise NmtError(f"{cost[0]} is for the cost table, which --breakdown replaces; run nmt report once for each"
                           if cost else "--plot-breakdown draws the buckets of --breakdown length|frequency; add it")
        found = by_bucket.breakdown(runs, breakdown, baseline, bucket_min, buckets)
        typer.echo(by_bucket.render_breakdown(found, fmt), nl=False)
        if plot_breakdown is not None:
            by_bucket.plot_breakdown(found, plot_breakdown)
            typer.echo(f"plot: {plot_breakdown}", err=True)
        return
    marks = reports.parse_minutes(at) if at is not None else []
    updates = reports.parse_updates(at_updates) if at_updates is not None else []
    found = reports.compare(runs, target, marks, baseline, group_seeds, allow_mixed, time_from or [], updates)
    typer.echo(reports.render(found.rows, fmt, found.groups, found.significance, found.projections), nl=False)
    if plot is not None and found.projections:
        reports.plot_projected(found.projections, plot, target)
        typer.echo(f"plot: {plot} (projected training time)", err=True)
    elif plot is not None:
        reports.plot(runs, plot, target, speed, found.groups)
        typer.echo(f"plot: {plot}", err=True)
    if plot_updates is not None:
        reports.plot(runs, plot_updates, target, speed, found.groups, by_updates=True)
        typer.echo(f"plot: {plot_updates} (valid BLEU against updates)", err=True)


@app.command()
@user_errors
def hardware(
    runs: Annotated[Optional[list[Path]], typer.Argument(
        help="Run directories this machine must match (as nmt report compares them).")] = None,
):
    """Print this machine as a run's log records it (CPU, its kind, GPU).

    With runs, exit 1 with one line unless they trained on this machine's kind: check it before
    adding a run to a comparison, rather than learn it from nmt report hours later.
    """
    from nmt.hardware import check_here

    described, notes = check_here(runs or [])
    for note in notes:
        typer.echo(note, err=True)
    typer.echo(described)


@app.command()
@user_errors
def attention(
    model: Annotated[Path, typer.Option("--model", "-m", help="Run directory.")],
    text: Annotated[str, typer.Option(help="The source sentence.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path("attention.png"),
    checkpoint: Annotated[str, typer.Option(help="best, last, averaged, or a checkpoint path.")] = "best",
    beam: Annotated[Optional[int], typer.Option(help="Beam size.")] = None,
):
    """Translate one sentence and draw the model's attention over the source as a heat map."""
    from nmt.attention import attention_plot
    from nmt.hardware import pick_device
    from nmt.rundir import load_run
    from nmt.translate import translate as run_translate

    cfg, tokenizer, net = load_run(model, checkpoint, pick_device())
    search = _search_config(cfg, beam, 1, None, None, None)
    (result,) = run_translate(net, tokenizer, [text], search, keep_attention=True)
    if not result.hypotheses or result.hypotheses[0].attention is None:
        raise NmtError("nothing to draw: the sentence is empty or the model gives no attention")
    hyp = result.hypotheses[0]
    (src_ids,) = tokenizer.encode([text.strip()])
    src = [tokenizer.sp.IdToPiece(i) for i in src_ids[: hyp.attention.size(1) - 1]] + ["</s>"]
    tgt = [tokenizer.sp.IdToPiece(i) for i in hyp.tokens] + ["</s>"]
    attention_plot(src, tgt, hyp.attention[:, : len(src)].cpu().numpy(), output,
                   title=f"{cfg.model.kind}: {result.texts[0]}")
    typer.echo(result.texts[0])
    typer.echo(f"attention: {output}", err=True)


# --- data -----------------------------------------------------------------------------------

@data_app.command("multi30k")
@user_errors
def data_multi30k(
    dest: Annotated[Optional[Path], typer.Option(help="Data root (default: $NMT_DATA or ~/.cache/nmt/data).")] = None,
):
    """Download Multi30k task 1 (en, de, fr, cs), check sha256, unpack to DEST/multi30k."""
    from nmt.download import download_multi30k

    path = download_multi30k(dest, progress=sys.stderr.isatty())
    typer.echo(str(path))


# --- average --------------------------------------------------------------------------------

@app.command()
@user_errors
def average(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    last: Annotated[int, typer.Option(help="Average the last K step checkpoints.")] = 5,
):
    """Average the last K step checkpoints of a run into RUN/averaged.pt."""
    from nmt import checkpoint, rundir

    if last < 2:
        raise NmtError(f"--last {last}: give the number of step checkpoints to average, at least 2")
    paths = rundir.step_checkpoints(run)[-last:]
    if len(paths) < 2:
        raise NmtError(f"{run / rundir.STEP_DIR} has {len(paths)} step checkpoint(s); need at least 2 "
                       "(set train.keep_last)")
    averaged = rundir.checkpoint_path(run, "averaged")
    checkpoint.save(checkpoint.average(paths), averaged)
    typer.echo(f"{averaged}: mean of {', '.join(p.name for p in paths)}")


# --- shortlist ------------------------------------------------------------------------------

@app.command()
@user_errors
def shortlist(
    run: Annotated[Path, typer.Argument(help="Run directory written by nmt train.")],
    first: Annotated[int, typer.Option(help="Most frequent target pieces kept (every list holds them).")] = 1000,
    best: Annotated[int, typer.Option(help="Most translations kept per source piece, best first.")] = 100,
    prune: Annotated[float, typer.Option(help="Smallest p(t|s) of a translation kept.")] = 0.001,
):
    """Build RUN/shortlist.npz: p(target piece | source piece) by IBM Model 1 on the run's prepared
    training data, for decoding with --shortlist FIRST,BEST (nmt translate, nmt eval, search.shortlist)."""
    from nmt.shortlist import build

    typer.echo(build(run, first, best, prune).describe())


# --- export ---------------------------------------------------------------------------------

@app.command()
@user_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by nmt train (a Transformer).")],
    out: Annotated[Path, typer.Argument(help="Directory to write the exported model to.")],
    to: Annotated[str, typer.Option(help="Format to export to: ctranslate2.")],
    checkpoint: Annotated[str, typer.Option(help="best, last, averaged, or a checkpoint path.")] = "best",
    quantization: Annotated[Optional[str], typer.Option(
        help="Store the weights as int8, int8_float32, int16, float16, bfloat16... (default: float32).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an earlier export in OUT.")] = False,
    shortlist: Annotated[bool, typer.Option(
        "--shortlist", help="Add RUN/shortlist.npz as CTranslate2's vocabulary map (vmap.txt), at the run's "
        "search.shortlist sizes or else all the table holds; the export then decodes with it by default. "
        "CTranslate2 restricts a batch to the union of its sentences' lists, so its output can depend "
        "on the batch.")] = False,
):
    """Export a trained Transformer for CTranslate2, with its spm.model and search settings.

    Decode it with `nmt translate --engine ctranslate2 --model OUT`, or with CTranslate2 itself.
    """
    from nmt.export import export_ctranslate2

    if to != "ctranslate2":
        raise NmtError(f"--to {to}: nmt exports to ctranslate2 only")
    settings = export_ctranslate2(run, out, checkpoint, quantization, force, shortlist)
    typer.echo(f"{out}: CTranslate2 model ({settings['quantization']}) of {settings['checkpoint']}")
    for key, value in settings["left_out"].items():
        typer.echo(f"{out}: search.{key} {value} left out (CTranslate2 has none; decoding without it); its cost "
                   f"is not measured here: compare nmt eval --model {run} with --{key.replace('_', '-')} 0 "
                   "and without", err=True)


# --- serve ----------------------------------------------------------------------------------

@app.command()
@user_errors
def serve(
    model: Annotated[list[Path], typer.Option("--model", "-m", help=(
        "Run directory to serve (its language pair, its search settings); repeat for more pairs. With "
        "--engine ctranslate2, a directory written by nmt export."))],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    engine: Annotated[str, typer.Option(help="nmt, or ctranslate2 for directories written by nmt export.")] = "nmt",
    checkpoint: Annotated[str, typer.Option(help="best, last or averaged (each run's).")] = "best",
    int8: Annotated[Optional[bool], typer.Option(
        "--int8/--no-int8", help="Decode with int8 copies of the models, CPU only (default: the recipe's).")] = None,
    threads: Annotated[Optional[int], typer.Option(
        help="torch's intra-op threads (default: the usable cores).")] = None,
    api_keys: Annotated[Optional[Path], typer.Option(
        help="File of API keys, one a line: requests must then carry one (api_key), else 403.")] = None,
    char_limit: Annotated[int, typer.Option(help="Most characters in one request's texts (0: no limit).")] = 5000,
    batch_limit: Annotated[int, typer.Option(help="Most texts in one request's q list (0: no limit).")] = 100,
    body_limit: Annotated[int, typer.Option(help="Most bytes in a request body (413 past it).")] = 1 << 20,
    max_alternatives: Annotated[int, typer.Option(
        help="Most alternatives a request may ask for (also at most the beam size less one).")] = 3,
    max_batch_tokens: Annotated[Optional[int], typer.Option(
        help="Source tokens gathered from concurrent requests into one batch (default: the model's "
             "search.max_tokens).")] = None,
    max_batch_requests: Annotated[int, typer.Option(
        help="Requests gathered into one batch (1: each request decoded on its own).")] = 64,
    max_wait_ms: Annotated[float, typer.Option(
        help="A batch is sent once no request has joined it for this long (while it holds fewer requests "
             "than the batch before it, once 10 times this has passed).")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting or decoding; more get 503.")] = 256,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take in all; 504 after.")] = 30.0,
    access_log: Annotated[bool, typer.Option(help="Log every request (default: only errors, one line each).")] = False,
):
    """Serve models over HTTP: LibreTranslate's API, OpenNMT-py's route, and a page at /.

    Concurrent requests for one model are decoded together in the batches nmt translate makes;
    SIGTERM or Ctrl-C lets the requests in flight finish, then exits 0.
    """
    try:
        from nmt.serve.app import ServeLimits
        from nmt.serve.batcher import Limits
        from nmt.serve.run import serve as run_server
    except ImportError as e:
        raise NmtError(f"nmt serve needs the serve extra ({e.name} is missing): "
                       "python3 -m pip install -e \".[serve]\"") from None

    _check_counts(port=port, max_batch_requests=max_batch_requests, max_queue=max_queue, body_limit=body_limit,
                  max_batch_tokens=max_batch_tokens, threads=threads)
    if max_alternatives < 0 or max_wait_ms < 0 or not timeout > 0:
        raise NmtError("--max-alternatives and --max-wait-ms must be 0 or more, --timeout above 0")
    run_server(model, host=host, port=port, engine=engine, checkpoint=checkpoint, int8=int8, threads=threads,
               api_keys=api_keys, access_log=access_log,
               limits=ServeLimits(char_limit, batch_limit, body_limit, max_alternatives),
               batching=Limits(max_batch_tokens, max_batch_requests, max_wait_ms / 1000, max_queue, timeout))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
