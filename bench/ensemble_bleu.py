"""Quality and speed of an ensemble beside its members: test BLEU and sentences/s of each.

    python bench/ensemble_bleu.py [RUN ...] [--src FILE] [--ref FILE] [--beam 5] [--checkpoint best]

Translates the source (default: Multi30k test2016 under $NMT_DATA) with every run alone,
each under its own search settings (its recipe and search.yaml; --beam overrides the beam),
then with the ensemble of all of them (nmt.ensemble: log of the members' mean probability at
each step, under the first run's settings), and prints sacreBLEU BLEU, chrF and
sentences/s (decoding time, encoder included, model loading excluded) for each. The runs
must share one spm.model. Default runs: runs/quick (Transformer) and runs/gnmt-quick (GNMT).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine  # noqa: E402

from nmt.data import read_parallel  # noqa: E402
from nmt.ensemble import load_ensemble  # noqa: E402
from nmt.metrics import bleu, chrf  # noqa: E402
from nmt.translate import translate_text  # noqa: E402


def main() -> None:
    data = Path(os.environ.get("NMT_DATA", Path.home() / ".cache/nmt/data")) / "multi30k"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="*", default=[Path("runs/quick"), Path("runs/gnmt-quick")])
    parser.add_argument("--src", type=Path, default=data / "test2016.en")
    parser.add_argument("--ref", type=Path, default=data / "test2016.de")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give at least two runs: the members of the ensemble")
    if args.threads:
        torch.set_num_threads(args.threads)

    lines, refs = read_parallel(args.src, args.ref)
    print(describe_machine())
    print(f"{len(lines)} sentences of {args.src}; beam {args.beam}; checkpoint {args.checkpoint}")
    print("| model | kind | BLEU | chrF | sentences/s | search settings |\n|---|---|---|---|---|---|")
    for members in [[run] for run in args.runs] + [args.runs]:
        cfg, tokenizer, model = load_ensemble(members, args.checkpoint)
        search = dataclasses.replace(cfg.search, beam=args.beam, n_best=1)
        start = time.perf_counter()
        hyps = translate_text(model, tokenizer, lines, search)
        seconds = time.perf_counter() - start
        name = " + ".join(str(run) for run in members)
        kind = " + ".join(getattr(m, "kind", "?") for m in getattr(model, "members", [model]))
        settings = (f"alpha {search.length_penalty}, beta {search.coverage_penalty}, "
                    f"max_len {search.max_len_a}*src+{search.max_len_b}")
        score = bleu(hyps, refs, tokenize=cfg.data.bleu_tokenize).score
        print(f"| {name} | {kind} | {score:.2f} | {chrf(hyps, refs).score:.2f} | "
              f"{len(lines) / seconds:.1f} | {settings} |", flush=True)


if __name__ == "__main__":
    main()
