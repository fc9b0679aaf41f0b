"""Scoring with sacreBLEU: corpus scores, signatures, per-document scores and bootstrap intervals.

Numbers are sacreBLEU's own: each metric is a ``sacrebleu.metrics`` object built with the same
defaults as the ``sacrebleu`` command line, so ``score`` and ``python cli.py evaluate`` agree with
``sacrebleu REF -i HYP -m bleu chrf ter`` to the last digit, signature included.

* ``tokenize`` applies to BLEU (chrF and TER have no tokenizer choice); ``lowercase`` applies to
  BLEU and chrF. TER keeps sacreBLEU's default, which is case-insensitive (``case:lc``).
* Bootstrap intervals are sacreBLEU's single-system bootstrap (``corpus_score(n_bootstrap=N)``,
  the same as ``sacrebleu --confidence -cin N``): segments resampled with replacement from a fixed
  seed (``SACREBLEU_SEED``, default 12345), corpus score recomputed for each resample, reported as
  the resample mean ``μ`` and half the width of the 2.5–97.5 percentile range ``±``. The signature
  then carries ``bs:N|seed:12345``.
* Files are read as sacreBLEU's command line reads them: UTF-8, split on ``\\n`` only, trailing
  whitespace (including ``\\r``) stripped; in addition a leading BOM is dropped. Empty hypothesis
  lines are kept (they score as empty translations); an empty reference line is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF, TER

from seq2seq_diff.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

METRICS = ("bleu", "chrf", "ter")
TOKENIZERS = tuple(sorted(BLEU.TOKENIZERS))


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def read_lines(path: str | Path, what: str = "file") -> list[str]:
    """Read a text file of one segment per line.

    Args:
        path: The file.
        what: What the file is ("hypothesis file", ...), for error messages.

    Returns:
        The lines without line ends or trailing whitespace; a final newline adds no line.

    Raises:
        DataError: The file is missing, is not a file, or is not valid UTF-8 (with the line).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found", path)
    if not path.is_file():
        raise DataError(f"{what} is not a regular file", path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"invalid UTF-8 in {what} (byte 0x{data[error.start]:02x}); "
            "convert it to UTF-8, e.g. with iconv",
            path,
            line,
        ) from None
    text = text.removeprefix("\ufeff")
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip() for line in lines]


def read_references(paths: Sequence[str | Path], num_segments: int, hyp: str) -> list[list[str]]:
    """Read reference files and check them against the hypotheses.

    Args:
        paths: One file per reference stream.
        num_segments: Number of hypothesis lines.
        hyp: Where the hypotheses came from, for the count-mismatch message.

    Returns:
        One list of lines per reference file.

    Raises:
        DataError: A file is unreadable, empty, has an empty line, or a different line count.
    """
    streams = []
    for path in paths:
        lines = read_lines(path, "reference file")
        if not lines:
            raise DataError("reference file is empty", path)
        if len(lines) != num_segments:
            raise DataError(
                f"reference has {len(lines)} lines but {hyp} has {num_segments}; "
                "hypotheses and references must be aligned line by line",
                path,
            )
        empty = [i for i, line in enumerate(lines, 1) if not line]
        if empty:
            raise DataError(
                f"empty reference line ({len(empty)} in all); every segment needs a reference "
                "(fix the alignment or drop the segment from both files)",
                path,
                empty[0],
            )
        streams.append(lines)
    return streams


def read_docids(path: str | Path) -> list[str]:
    """Read document ids: the first tab-separated column of each line.

    Raises:
        DataError: The file is unreadable or a line has no document id.
    """
    docids = []
    for number, line in enumerate(read_lines(path, "docids file"), 1):
        docid = line.split("\t", 1)[0].strip()
        if not docid:
            raise DataError("no document id in the first tab-separated column", path, number)
        docids.append(docid)
    return docids


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass
class MetricScore:
    """One metric's result.

    Attributes:
        metric: "bleu", "chrf" or "ter".
        name: sacreBLEU's name for the score ("BLEU", "chrF2", "TER").
        score: Corpus score.
        signature: ``str(metric.get_signature())``, exactly as sacreBLEU gives it.
        verbose: sacreBLEU's detail string (BLEU's n-gram precisions and brevity penalty), or "".
        bootstrap_mean: Mean score over the bootstrap resamples, when requested.
        bootstrap_ci: Half-width of the 95% bootstrap interval (sacreBLEU's "±"), when requested.
        documents: Score per document id, documents in first-seen order, when docids were given.
    """

    metric: str
    name: str
    score: float
    signature: str
    verbose: str = ""
    bootstrap_mean: float | None = None
    bootstrap_ci: float | None = None
    documents: dict[str, float] = field(default_factory=dict)

    def format(self, width: int = 2) -> str:
        """One report line, e.g. ``BLEU = 27.31 nrefs:1|case:mixed|...|version:2.6.0``."""
        text = f"{self.name} = {self.score:.{width}f}"
        if self.bootstrap_mean is not None:
            text += f" (μ = {self.bootstrap_mean:.{width}f} ± {self.bootstrap_ci:.{width}f})"
        return f"{text} {self.signature}"


@dataclass
class EvalResult:
    """Scores of one system on one test set.

    Attributes:
        scores: One entry per metric, in the order asked for.
        num_segments: Number of hypotheses scored.
        num_refs: Number of reference streams.
        document_sizes: Segments per document id (first-seen order); empty without docids.
    """

    scores: list[MetricScore]
    num_segments: int
    num_refs: int
    document_sizes: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, metric: str) -> MetricScore:
        for item in self.scores:
            if item.metric == metric:
                return item
        raise KeyError(metric)

    def report(self, width: int = 2, documents: bool = True) -> str:
        """Human-readable report: one line per metric, then a per-document table if scored."""
        lines = [item.format(width) for item in self.scores]
        if documents and self.document_sizes:
            key_width = max(len("document"), *(len(d) for d in self.document_sizes))
            names = [item.name for item in self.scores]
            score_width = max(7, *(len(n) + 1 for n in names))
            header = f"{'document':<{key_width}} {'segs':>5}"
            lines += ["", header + "".join(f"{n:>{score_width}}" for n in names)]
            for docid, size in self.document_sizes.items():
                row = f"{docid:<{key_width}} {size:>5}"
                row += "".join(f"{i.documents[docid]:>{score_width}.{width}f}" for i in self.scores)
                lines.append(row)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with full-precision scores."""
        return asdict(self)


def _make_metric(metric: str, tokenize: str, lowercase: bool) -> BLEU | CHRF | TER:
    """A fresh sacreBLEU metric object with the command line's defaults."""
    if metric == "bleu":
        try:
            return BLEU(tokenize=tokenize, lowercase=lowercase)
        except (KeyError, ImportError, RuntimeError) as error:
            raise ConfigError(
                f"cannot use BLEU tokenizer {tokenize!r} ({error}); choose one of "
                f"{', '.join(TOKENIZERS)} and install what it needs"
            ) from None
    if metric == "chrf":
        return CHRF(lowercase=lowercase)
    if metric == "ter":
        return TER()
    raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def _reference_streams(
    references: Sequence[str] | Sequence[Sequence[str]], num_segments: int
) -> list[list[str]]:
    """Normalise references to a list of streams and check their lengths."""
    if all(isinstance(ref, str) for ref in references):
        streams = [list(references)]
    else:
        streams = [list(stream) for stream in references]
    if not streams or not streams[0]:
        raise DataError("no references to score against")
    for number, stream in enumerate(streams, 1):
        if len(stream) != num_segments:
            raise DataError(
                f"reference stream {number} has {len(stream)} segments but there are "
                f"{num_segments} hypotheses"
            )
    return streams


def score(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    metrics: Sequence[str] = METRICS,
    tokenize: str = "13a",
    lowercase: bool = False,
    bootstrap: int | None = None,
    docids: Sequence[str] | None = None,
) -> EvalResult:
    """Score hypotheses against references with sacreBLEU.

    Args:
        hypotheses: One translation per segment (empty strings allowed).
        references: One reference per segment, or several streams (``references[k][i]`` is the
            k-th reference of segment i), as in ``sacrebleu.corpus_bleu``.
        metrics: Any of "bleu", "chrf", "ter", in the order to report.
        tokenize: BLEU tokenizer (sacreBLEU's ``tok``); "13a" is the WMT standard.
        lowercase: Lowercase before scoring BLEU and chrF.
        bootstrap: Number of bootstrap resamples (at least 2) for 95% intervals; None for none.
        docids: Document id per segment; adds one score per document and metric.

    Returns:
        The scores, signatures and, as requested, intervals and per-document scores.

    Raises:
        DataError: No segments, or references/docids of the wrong length.
        ConfigError: Unknown metric or tokenizer, or ``bootstrap`` below 2.
    """
    if not hypotheses:
        raise DataError("no hypotheses to score")
    if not metrics:
        raise ConfigError(f"no metrics asked for; choose from {', '.join(METRICS)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if bootstrap is not None and bootstrap < 2:
        raise ConfigError(f"bootstrap needs at least 2 resamples (1000 is usual), got {bootstrap}")
    hypotheses = list(hypotheses)
    streams = _reference_streams(references, len(hypotheses))
    groups: dict[str, list[int]] = {}
    if docids is not None:
        if len(docids) != len(hypotheses):
            raise DataError(f"{len(docids)} document ids for {len(hypotheses)} hypotheses")
        for index, docid in enumerate(docids):
            groups.setdefault(docid, []).append(index)

    results = []
    for name in metrics:
        metric = _make_metric(name, tokenize, lowercase)
        corpus = metric.corpus_score(hypotheses, streams, n_bootstrap=bootstrap or 1)
        item = MetricScore(
            metric=name,
            name=corpus.name,
            score=corpus.score,
            signature=str(metric.get_signature()),
            verbose=getattr(corpus, "_verbose", ""),
        )
        if bootstrap:
            # sacreBLEU keeps the bootstrap estimate on the Score (Score.estimate_ci).
            item.bootstrap_mean = float(corpus._mean)
            item.bootstrap_ci = float(corpus._ci)
        for docid, indices in groups.items():
            doc_metric = _make_metric(name, tokenize, lowercase)
            doc_hyps = [hypotheses[i] for i in indices]
            doc_refs = [[stream[i] for i in indices] for stream in streams]
            item.documents[docid] = doc_metric.corpus_score(doc_hyps, doc_refs).score
        results.append(item)
    sizes = {docid: len(indices) for docid, indices in groups.items()}
    return EvalResult(results, len(hypotheses), len(streams), sizes)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python cli.py evaluate``."""
    parser = argparse.ArgumentParser(
        prog="cli.py evaluate",
        description="Score translations with sacreBLEU (BLEU, chrF, TER), optionally per document "
        "and with bootstrap confidence intervals.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hyp", metavar="FILE", help="hypotheses, one segment per line")
    source.add_argument("--model", metavar="DIR", help="model directory: translate --src first")
    parser.add_argument("--src", metavar="FILE", help="source file to translate (with --model)")
    parser.add_argument(
        "--ref", metavar="FILE", nargs="+", action="extend", required=True,
        help="reference file(s), aligned with the hypotheses; repeat for several references",
    )  # fmt: skip
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--tokenize", default="13a", choices=TOKENIZERS, help="BLEU tokenizer")
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU and chrF")
    parser.add_argument(
        "--docids", metavar="FILE", help="document id per line (first tab-separated column)"
    )
    parser.add_argument(
        "--bootstrap", metavar="N", type=int, help="bootstrap resamples for 95%% intervals"
    )
    parser.add_argument("--json", action="store_true", help="write JSON instead of text")
    parser.add_argument("--output", metavar="FILE", help="write the report here, not to stdout")
    return parser


def _translate(model_dir: str, src_path: str) -> list[str]:
    """Translate a source file with a trained model (``seq2seq_diff.translator``)."""
    try:
        from seq2seq_diff.translator import Translator
    except ImportError as error:
        raise ConfigError(
            f"--model needs seq2seq_diff.translator, which cannot be imported ({error}); "
            "translate first and pass --hyp"
        ) from None
    sources = read_lines(src_path, "source file")
    if not sources:
        raise DataError("source file is empty", src_path)
    translations = list(Translator.from_pretrained(model_dir).translate(sources))
    if len(translations) != len(sources):
        raise DataError(
            f"the model returned {len(translations)} translations for {len(sources)} lines",
            src_path,
        )
    return translations


def cli_main(argv: list[str]) -> int:
    """``python cli.py evaluate``: score a hypothesis file, or a model on a source file.

    Args:
        argv: Arguments after the command name.

    Returns:
        0 on success.

    Raises:
        DataError: Unreadable or misaligned files.
        ConfigError: Contradictory options.
    """
    args = build_parser().parse_args(argv)
    if args.model is not None:
        if args.src is None:
            raise ConfigError("--model needs --src FILE, the source side to translate")
        hypotheses = _translate(args.model, args.src)
        hyp_name = f"the source {args.src}"
    else:
        if args.src is not None:
            raise ConfigError("--src is only used with --model; with --hyp drop it")
        hypotheses = read_lines(args.hyp, "hypothesis file")
        hyp_name = f"the hypothesis {args.hyp}"
        if not hypotheses:
            raise DataError("hypothesis file is empty", args.hyp)
    references = read_references(args.ref, len(hypotheses), hyp_name)
    docids = None
    if args.docids is not None:
        docids = read_docids(args.docids)
        if len(docids) != len(hypotheses):
            raise DataError(
                f"{len(docids)} document ids but {hyp_name} has {len(hypotheses)} lines",
                args.docids,
            )
    result = score(
        hypotheses,
        references,
        metrics=args.metrics,
        tokenize=args.tokenize,
        lowercase=args.lowercase,
        bootstrap=args.bootstrap,
        docids=docids,
    )
    if args.json:
        payload = {
            "hyp": args.hyp,
            "model": args.model,
            "src": args.src,
            "ref": args.ref,
            "docids": args.docids,
            **result.to_dict(),
        }
        text = json.dumps(payload, indent=1, ensure_ascii=False)
    else:
        text = result.report()
    if args.output is not None:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n", encoding="utf-8")
        logger.info("wrote %s", output)
    else:
        sys.stdout.write(text + "\n")
    return 0
