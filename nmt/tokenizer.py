"""One joint SentencePiece model for source and target, shared by every model.

Byte fallback is on: a character the vocabulary lacks (emoji, CJK, control characters)
becomes byte pieces instead of ``<unk>``, so decoding gives back text, never ``<unk>``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from nmt import files
from nmt.errors import NmtError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
MODEL_FILE = "spm.model"


class Tokenizer:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise NmtError(f"{self.path}: not a readable SentencePiece model ({e}); "
                           "retrain it with nmt train or point to the run's spm.model") from None
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD, UNK, BOS, EOS):
            raise NmtError(f"{self.path}: SentencePiece model has other special ids than "
                           f"pad={PAD} unk={UNK} bos={BOS} eos={EOS}; train one with nmt train")

    def __len__(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        return self.sp.Encode(list(lines), out_type=int)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.sp.Decode([list(x) for x in ids])

    def sha256(self) -> str:
        return files.sha256(self.path)


def train_tokenizer(lines: Iterable[str], out_dir: Path, vocab_size: int, model_type: str = "unigram",
                    seed: int = 1, max_sentences: int = 2_000_000, threads: int = 2) -> Tokenizer:
    """Train a joint model on ``lines`` (both languages) and write ``out_dir/spm.model``.

    ``threads`` are SentencePiece's own C++ threads (nmt prepare gives it every core).
    """
    sample = [line for line in lines if line]
    if len(sample) > max_sentences:
        sample = random.Random(seed).sample(sample, max_sentences)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "spm"
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sample),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,
            # Keep the text as it is: the output is scored against raw references.
            normalization_rule_name="identity",
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=False,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise NmtError(f"SentencePiece training failed: {e}; adjust tokenizer.vocab_size to "
                       "what the message asks, or give it more training text") from None
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return Tokenizer(out_dir / MODEL_FILE)
