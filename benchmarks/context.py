"""Document context vs sentence-by-sentence translation of the held-out book, BLEU side by side.

The book (one unit per line, ``.docids`` giving its page) is laid out as a document: one paragraph
per page, lines kept. Each model translates it in document mode (``Translator.translate_document``),
with the given number of context sentences (the previous sentences of the paragraph, i.e. of the
page); the output lines, page breaks removed, are scored against the reference with sacreBLEU.

    python benchmarks/context.py runs/demo/model:0 runs/tiny-enro-context/model:1 \\
        runs/tiny-enro-context/model:0
"""

from __future__ import annotations

import argparse
from itertools import groupby
from pathlib import Path

from seq2seq_diff.evaluate import score
from seq2seq_diff.translator import Translator

BOOK = Path(__file__).resolve().parents[1] / "data/en-ro/book/gimp-manual-heldout"


def book_document(prefix: Path) -> tuple[str, list[str]]:
    """The book as paragraphs (pages) separated by blank lines, and its reference lines."""
    source = prefix.with_suffix(".en").read_text(encoding="utf-8").splitlines()
    reference = prefix.with_suffix(".ro").read_text(encoding="utf-8").splitlines()
    pages = [line.split("\t")[0]
             for line in prefix.with_suffix(".docids").read_text(encoding="utf-8").splitlines()]
    lines = iter(source)
    paragraphs = ["\n".join(next(lines) for _ in group) for _, group in groupby(pages)]
    return "\n\n".join(paragraphs) + "\n", reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="MODEL_DIR:CONTEXT",
                        help="a model directory and the context sentences to give it")
    parser.add_argument("--book", default=str(BOOK), help="path prefix of .en/.ro/.docids")
    parser.add_argument("--beam-size", type=int, default=5)
    args = parser.parse_args()
    document, reference = book_document(Path(args.book))
    print(f"{len(reference)} lines in {document.count(chr(10) * 2) + 1} pages, "
          f"beam {args.beam_size}, document mode")
    print(f"{'model':<34} {'context':>7} {'BLEU':>6} {'chrF':>6}")
    for run in args.runs:
        model_dir, context = run.rsplit(":", 1)
        translator = Translator.from_pretrained(model_dir, beam_size=args.beam_size,
                                                context=int(context))
        output = translator.translate_document(document)
        # Document mode keeps the layout line for line: drop the page breaks by position.
        hypotheses = [out for src, out in zip(document.split("\n"), output.split("\n"),
                                              strict=True) if src]
        result = score(hypotheses, reference, metrics=("bleu", "chrf"))
        print(f"{model_dir:<34} {context:>7} {result['bleu'].score:>6.2f} "
              f"{result['chrf'].score:>6.2f}", flush=True)
    print(f"signature: {result['bleu'].signature}")


if __name__ == "__main__":
    main()
