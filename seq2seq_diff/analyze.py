"""``python cli.py analyze`` and ``python cli.py plot-attention``: look inside trained models.

``analyze`` takes one or more model directories (e.g. a DIFF model and its standard twin) and a
test set, and reports side by side:

(a) cross-attention focus on verbatim-copied source pieces (:func:`analysis.copy_focus`);
(b) activation outliers: top-1/10/100 and median |attention logit| and |hidden state|
    (:func:`analysis.activation_outliers`);
(c) quantisation robustness: BLEU with float32 weights, int8 dynamic quantisation and simulated
    4- and 3-bit weights (:mod:`seq2seq_diff.quantize`), and the drop from float32.

    python cli.py analyze --model runs/a/model runs/b/model \\
        --src data/en-ro/test/newstest2016.en --ref data/en-ro/test/newstest2016.ro --lines 500
    python cli.py plot-attention --model runs/a/model --src "The layer is hidden." --out plots/a
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seq2seq_diff.errors import ConfigError, DataError

QUANT_SETTINGS = ("float32", "int8", "4-bit", "3-bit")


def _read(path: str, limit: int | None) -> list[str]:
    from seq2seq_diff.evaluate import read_lines

    lines = read_lines(path, "file")
    if not lines:
        raise DataError("file is empty", path)
    return lines[:limit] if limit else lines


def quantization_bleu(translator, sources: list[str], references: list[str]) -> dict:
    """BLEU under each of ``QUANT_SETTINGS`` (greedy or the translator's beam)."""
    from seq2seq_diff.evaluate import score
    from seq2seq_diff.quantize import fake_quantize_weights, quantize_int8

    original = translator.model
    variants = {"float32": lambda: original, "int8": lambda: quantize_int8(original),
                "4-bit": lambda: fake_quantize_weights(original, 4),
                "3-bit": lambda: fake_quantize_weights(original, 3)}
    results = {}
    try:
        for name in QUANT_SETTINGS:
            translator.model = variants[name]()
            hypotheses = translator.translate(sources)
            results[name] = round(score(hypotheses, references, metrics=("bleu",))["bleu"].score,
                                  2)
    finally:
        translator.model = original
    return results


def analyze_model(model_dir: str, sources: list[str], references: list[str], beam_size: int,
                  quantization: bool) -> dict:
    from seq2seq_diff.analysis import activation_outliers, copy_focus
    from seq2seq_diff.translator import Translator

    translator = Translator.from_pretrained(model_dir, beam_size=beam_size)
    model, tokenizer = translator.model, translator.tokenizer
    report = {"model": model_dir, "attention": model.config.attention,
              "copy_focus": copy_focus(model, tokenizer, sources, references),
              "outliers": activation_outliers(model, tokenizer, sources, references)}
    if quantization:
        report["bleu"] = quantization_bleu(translator, sources, references)
    return report


def format_reports(reports: list[dict]) -> str:
    width = 14
    header = f"{'':<34}" + "".join(f"{r['attention'] + ' ' + str(i + 1):>{width}}"
                                   for i, r in enumerate(reports))
    lines = ["models: " + ", ".join(f"{i + 1} = {r['model']}" for i, r in enumerate(reports)),
             "", header, "(a) cross-attention focus on copied pieces "
             f"({reports[0]['copy_focus']['pairs']} pairs)"]

    def row(label: str, values: list[float], fmt: str = ".3f") -> None:
        lines.append(f"  {label:<32}" + "".join(f"{v:>{width}{fmt}}" for v in values))

    row("mean over layers and heads", [r["copy_focus"]["mean_focus"] for r in reports])
    for layer in range(len(reports[0]["copy_focus"]["layers"])):
        row(f"decoder layer {layer}",
            [r["copy_focus"]["layers"][layer]["focus"] if layer < len(r["copy_focus"]["layers"])
             else float("nan") for r in reports])
    lines.append("(b) activation magnitudes")
    for group in ("attention_logits", "hidden_states"):
        for stat in reports[0]["outliers"][group]:
            row(f"{group.replace('_', ' ')} {stat}", [r["outliers"][group][stat] for r in reports],
                ".2f")
    if all("bleu" in r for r in reports):
        lines.append("(c) BLEU by weight precision (drop from float32)")
        for name in QUANT_SETTINGS:
            lines.append(f"  {name:<32}" + "".join(
                f"{r['bleu'][name]:>{width - 8}.2f} ({r['bleu'][name] - r['bleu']['float32']:+.2f})"
                for r in reports))
    return "\n".join(lines) + "\n"


def analyze_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cli.py analyze", description="Attention focus, activation outliers and "
        "quantisation robustness of one or more models, side by side.")
    parser.add_argument("--model", nargs="+", required=True, metavar="DIR")
    parser.add_argument("--src", required=True, metavar="FILE")
    parser.add_argument("--ref", required=True, metavar="FILE")
    parser.add_argument("--lines", type=int, default=500, metavar="N",
                        help="use the first N lines (default 500; 0 = all)")
    parser.add_argument("--beam-size", type=int, default=1, help="for the BLEU of (c)")
    parser.add_argument("--no-quantization", dest="quantization", action="store_false")
    parser.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    args = parser.parse_args(argv)
    sources, references = _read(args.src, args.lines), _read(args.ref, args.lines)
    if len(sources) != len(references):
        raise DataError(f"{len(sources)} source lines but {len(references)} reference lines",
                        args.ref)
    reports = [analyze_model(d, sources, references, args.beam_size, args.quantization)
               for d in args.model]
    sys.stdout.write(format_reports(reports))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1) + "\n")
    return 0


def plot_attention_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cli.py plot-attention", description="Attention heatmaps of one sentence: encoder, "
        "decoder and cross-attention per layer and head (DIFF: A1, A2 and A1 − λ·A2).")
    parser.add_argument("--model", required=True, metavar="DIR")
    parser.add_argument("--src", required=True, help="the source sentence")
    parser.add_argument("--out", required=True, metavar="PREFIX",
                        help="writes PREFIX-encoder.png, PREFIX-decoder.png, PREFIX-cross.png")
    parser.add_argument("--max-heads", type=int, default=None, metavar="N")
    args = parser.parse_args(argv)
    from seq2seq_diff.plots import plot_attention
    from seq2seq_diff.translator import Translator

    if args.max_heads is not None and args.max_heads < 1:
        raise ConfigError("--max-heads must be >= 1")
    translator = Translator.from_pretrained(args.model, beam_size=1)
    for path in plot_attention(translator, args.src, args.out, args.max_heads):
        print(path)
    return 0
