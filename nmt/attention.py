"""The heat map of a sentence's attention: which source pieces each output piece attended to
(``nmt attention``)."""

from __future__ import annotations

from pathlib import Path


def attention_plot(src_pieces: list[str], tgt_pieces: list[str], weights, out: Path, title: str = "") -> None:
    """Heat map of (target x source) attention weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(src_pieces) + 2), max(3, 0.35 * len(tgt_pieces) + 1.5)))
    ax.imshow(weights, cmap="Greys", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90)
    ax.set_yticks(range(len(tgt_pieces)), tgt_pieces)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
