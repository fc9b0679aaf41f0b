"""Attention heatmaps of one sentence (``python cli.py plot-attention``), with matplotlib.

The source is translated (greedy), then the model is run teacher-forced on its own translation
and every attention recorded (:func:`seq2seq_diff.analysis.record_attention`). One PNG per
attention type — encoder self-attention, decoder self-attention, cross-attention — with a row per
layer and, per head, the two softmax maps A1 and A2 and the differential map A1 − λ·A2 (DIFF), or
one map per head (standard attention).
"""

from __future__ import annotations

from pathlib import Path

import torch

from seq2seq_diff.analysis import record_attention, teacher_forced_batch
from seq2seq_diff.errors import ConfigError
from seq2seq_diff.translator import Translator

KINDS = {"encoder": "self_attn", "decoder": "self_attn", "cross": "cross_attn"}


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plot-attention needs matplotlib: pip install -e .[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.inference_mode()
def plot_attention(translator: Translator, source: str, out_prefix: str | Path,
                   max_heads: int | None = None) -> list[Path]:
    """Write ``<out_prefix>-{encoder,decoder,cross}.png`` for one source sentence.

    Returns:
        The paths written.
    """
    plt = _matplotlib()
    if not source.strip():
        raise ConfigError("plot-attention needs a non-empty --src sentence")
    model, tokenizer = translator.model, translator.tokenizer
    translation = translator.translate([source])[0]
    batch = teacher_forced_batch(model, tokenizer, [source], [translation])
    with record_attention(model) as records:
        model(batch.src.to(translator.device), batch.tgt_in.to(translator.device))
    src_labels = [tokenizer.id_to_piece(i) for i in batch.src_ids[0]]
    tgt_labels = ["<s>"] + [tokenizer.id_to_piece(i) for i in batch.tgt_ids[0]]
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, suffix in KINDS.items():
        prefix = "encoder_layers" if kind == "encoder" else "decoder_layers"
        layer_records = [r for r in records
                         if r.name.startswith(prefix) and r.name.endswith(suffix)]
        rows_labels = src_labels if kind == "encoder" else tgt_labels
        cols_labels = tgt_labels if kind == "decoder" else src_labels
        path = out_prefix.with_name(f"{out_prefix.name}-{kind}.png")
        _plot_kind(plt, layer_records, rows_labels, cols_labels, kind, source, translation,
                   path, max_heads)
        written.append(path)
    return written


def _plot_kind(plt, records, rows_labels, cols_labels, kind, source, translation, path,
               max_heads) -> None:
    diff = records[0].diff is not None
    heads = records[0].diff.shape[1] if diff else records[0].probs.shape[1]
    heads = min(heads, max_heads) if max_heads else heads
    panels = 3 if diff else 1
    cols = heads * panels
    size = 0.6 + 0.13 * max(len(rows_labels), len(cols_labels))
    figure, axes = plt.subplots(len(records), cols, figsize=(size * cols, size * len(records)),
                                squeeze=False)
    for layer, record in enumerate(records):
        for head in range(heads):
            if diff:
                maps = [(record.probs[0, 2 * head], "A1"), (record.probs[0, 2 * head + 1], "A2"),
                        (record.diff[0, head], f"A1−λA2 (λ={record.lam:.2f})")]
            else:
                maps = [(record.probs[0, head], "A")]
            for panel, (amap, title) in enumerate(maps):
                axis = axes[layer][head * panels + panel]
                signed = title.startswith("A1−")
                limit = float(amap.abs().max()) or 1.0
                axis.imshow(amap.numpy(), cmap="RdBu_r" if signed else "viridis",
                            vmin=-limit if signed else 0.0, vmax=limit, aspect="auto")
                axis.set_title(f"L{layer} h{head} {title}", fontsize=7)
                axis.set_xticks(range(len(cols_labels)), cols_labels, rotation=90, fontsize=5)
                axis.set_yticks(range(len(rows_labels)), rows_labels, fontsize=5)
    figure.suptitle(f"{kind} attention\n{source}\n→ {translation}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
