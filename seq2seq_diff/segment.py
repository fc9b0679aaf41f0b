"""The text side of whole-document translation: split a document into units, put it back together.

No model here. A document becomes a flat list of :class:`Unit` (the strings a model translates) plus
the layout needed to rebuild it, so that nothing is dropped or truncated and the structure survives:

* **Paragraphs** are runs of non-blank lines; blank lines between them are kept one for one.
  A whitespace-only line counts as blank and comes back as an empty line (never sent to a model).
  Leading and trailing blank lines and the final newline (or its absence) are kept.
* **Line breaks.** ``\\r\\n`` and a lone ``\\r`` are normalised to ``\\n`` on input. A single
  newline inside a paragraph *is* a unit boundary: each line is segmented on its own and the line
  breaks come back on reassembly. This suits one-unit-per-line text (the GIMP manual, subtitles,
  lists, verse); hard-wrapped prose gets each wrapped line translated separately.
* **Sentences** are found with ``sentencex`` (maintained, ~300 languages; ``lang`` is its language
  code). It is lossless: its pieces concatenate back to the line.
* **Long sentences** are cut by :func:`chunk`: at clause punctuation, then whitespace windows, then
  character windows, until each piece fits ``max_tokens``.
* **Whitespace between units** (between sentences, between chunks, a line's indentation and trailing
  spaces) is kept verbatim and put back around the translations. Unit texts and translations are
  stripped. With identity "translations" the output is therefore exactly the (CR-normalised) input,
  except that whitespace-only lines become empty. Translations are joined with the whitespace that
  separated their sources, which is one space between words and nothing inside a word cut by
  character windows.

Typical use::

    doc = segment_document(text, lang="en", max_tokens=200, count_tokens=count)
    logger.info("%s", doc.summary)
    out = doc.reassemble(model_translate([u.text for u in doc.units]))

For files of one segment per line, :func:`segment_lines` gives exactly one output line per input
line.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sentencex import segment as _sentencex_segment

from seq2seq_diff.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 200

# Clause boundaries: cut *after* the punctuation and the whitespace that follows it, so the
# punctuation stays with its clause and the whitespace becomes the separator. Western clause marks
# need following whitespace (so "1,000" or "a:b" are not cut); full-width CJK marks do not.
_CLAUSE_BREAK = re.compile(
    r"[;:,\u2014\u2013\u2015\u061b\u060c][\"'\)\]\u201d\u2019\u00bb]*\s+"  # ; : , — – ― ؛ ،
    r"|(?<=\s)--?\s+"  # " - " and " -- " used as dashes
    r"|[\u3001\uff0c\uff1b\uff1a]\s*"  # 、 ， ； ：
)
_WORD = re.compile(r"\S+\s*")
_LINE_BREAKS = re.compile(r"[\r\n]+")
_EXOTIC_WHITESPACE = re.compile(r"[^\S \t]")  # whitespace other than space and tab


def approx_token_count(text: str) -> int:
    """Rough subword count when no tokenizer is at hand: one token per 6 characters of each word.

    Close to a small SentencePiece vocabulary on English prose, and it grows with word length, so a
    10,000-character string without spaces still counts as long. Pass the real tokenizer's count
    (``lambda s: len(tok.encode([s])[0])``) where there is one.
    """
    return sum(math.ceil(len(word) / 6) for word in text.split())


def _split_ws(text: str) -> tuple[str, str, str]:
    """Split ``text`` into (leading whitespace, core, trailing whitespace)."""
    core = text.strip()
    if not core:
        return text, "", ""
    start = len(text) - len(text.lstrip())
    end = start + len(core)
    return text[:start], core, text[end:]


# ---------------------------------------------------------------------------------------------
# Chunking long sentences
# ---------------------------------------------------------------------------------------------


@dataclass
class _ChunkStats:
    """What :func:`_chunk` had to do to one sentence."""

    chunked: bool = False
    char_windows: bool = False
    over_limit: int = 0


def _clause_pieces(text: str) -> list[str]:
    """Cut ``text`` after each clause boundary; the pieces concatenate back to ``text``."""
    pieces, start = [], 0
    for match in _CLAUSE_BREAK.finditer(text):
        if match.end() > start and match.end() < len(text):
            pieces.append(text[start : match.end()])
            start = match.end()
    pieces.append(text[start:])
    return pieces


def _pack(pieces: list[str], fits: Callable[[str], bool]) -> list[str]:
    """Greedily merge consecutive pieces while the merged text still fits."""
    out: list[str] = []
    current = ""
    for piece in pieces:
        if current and not fits(current + piece):
            out.append(current)
            current = piece
        else:
            current += piece
    if current:
        out.append(current)
    return out


def _char_windows(token: str, fits: Callable[[str], bool], stats: _ChunkStats) -> list[str]:
    """Cut one whitespace-free word (plus its trailing whitespace) into windows that fit."""
    lead, rest, trail = _split_ws(token)
    windows = []
    while rest:
        lo, hi = 1, len(rest)
        if fits(rest):
            n = hi
        else:
            # Invariant: fits(rest[:hi]) is false; fits(rest[:lo]) is true unless lo never moved.
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(rest[:mid]):
                    lo = mid
                else:
                    hi = mid
            n = lo
            if not fits(rest[:n]):
                stats.over_limit += 1  # one character already exceeds the limit: cannot do better
        windows.append(rest[:n])
        rest = rest[n:]
    windows[0] = lead + windows[0]
    windows[-1] += trail
    return windows


def _chunk(
    sentence: str, max_tokens: int, count_tokens: Callable[[str], int]
) -> tuple[list[str], _ChunkStats]:
    """:func:`chunk` plus a record of what it had to do."""
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be at least 1, got {max_tokens}")
    stats = _ChunkStats()

    def fits(text: str) -> bool:
        return count_tokens(text.strip()) <= max_tokens

    if fits(sentence):
        return [sentence], stats
    stats.chunked = True
    lead, core, trail = _split_ws(sentence)
    chunks: list[str] = []
    for clause in _pack(_clause_pieces(core), fits):
        if fits(clause):
            chunks.append(clause)
            continue
        for window in _pack(_WORD.findall(clause), fits):
            if fits(window):
                chunks.append(window)
            else:  # a single "word" too long for the limit
                stats.char_windows = True
                chunks.extend(_char_windows(window, fits, stats))
    chunks[0] = lead + chunks[0]
    chunks[-1] += trail
    return chunks, stats


def chunk(sentence: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Split a sentence longer than ``max_tokens`` into pieces that fit.

    First at clause punctuation (``; : , — –`` and similar, followed by whitespace), merging
    neighbouring clauses back while they fit; a clause still too long is cut into windows of
    whitespace-separated words, and a single word still too long into character windows.

    Every character of ``sentence`` is in exactly one chunk: ``"".join(chunks) == sentence``. The
    whitespace between two chunks stays at the end of the first; translate ``c.strip()`` for each
    chunk and join the translations with that whitespace (a space, or nothing inside a word).

    Args:
        sentence: The text to split.
        max_tokens: Largest allowed ``count_tokens(c.strip())`` of a chunk; at least 1.
        count_tokens: Counts the tokens of a string (e.g. the SentencePiece piece count).

    Returns:
        The chunks, in order; ``[sentence]`` when it already fits.

    Raises:
        ConfigError: ``max_tokens`` is below 1.
    """
    return _chunk(sentence, max_tokens, count_tokens)[0]


# ---------------------------------------------------------------------------------------------
# Segmented documents
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One string for the model to translate.

    Attributes:
        paragraph: 0-based paragraph index in the document.
        line: 0-based line index within the paragraph.
        sentence: 0-based sentence index within the line.
        chunk: 0-based chunk index within the sentence (0 when the sentence was not chunked).
        text: The source text, stripped of surrounding whitespace; never empty.
        before: The whitespace that precedes this unit on its line (indentation, the space between
            sentences or chunks), put back before its translation.
    """

    paragraph: int
    line: int
    sentence: int
    chunk: int
    text: str
    before: str = ""


@dataclass(frozen=True)
class LineLayout:
    """One line of the document: blank, or the units it holds.

    Attributes:
        paragraph: The paragraph the line belongs to; ``None`` for a blank line.
        first_unit: Index in ``SegmentedDocument.units`` of its first unit.
        num_units: How many units the line holds (0 for a blank line).
        trailing: Whitespace after the last unit, put back at the end of the line.
    """

    paragraph: int | None
    first_unit: int = 0
    num_units: int = 0
    trailing: str = ""


# What a one-line summary reports beyond the counts: (counter attribute, message template).
UNUSUAL_NOTES: tuple[tuple[str, str], ...] = (
    ("chunked_sentences", "{} long sentences chunked"),
    ("char_window_sentences", "{} cut inside a word"),
    ("over_limit_units", "{} units still over the limit"),
    ("whitespace_lines", "{} whitespace-only lines emptied"),
    ("crlf_normalised", "{} CR line ends normalised to LF"),
    ("split_failures", "{} lines not sentence-split"),
)


def unusual_notes(counts: object, notes: Sequence[tuple[str, str]] = UNUSUAL_NOTES) -> list[str]:
    """The messages of ``notes`` whose counter on ``counts`` is non-zero, in order."""
    return [template.format(getattr(counts, name)) for name, template in notes
            if getattr(counts, name)]


@dataclass
class SegmentSummary:
    """Counts for a one-line report, including anything unusual.

    Attributes:
        paragraphs: Runs of non-blank lines.
        lines: Lines in the document (blank ones included, not the final newline).
        blank_lines: Empty or whitespace-only lines.
        whitespace_lines: Of the blank lines, those that held only whitespace (emptied on output).
        sentences: Sentences found (a line that is one segment counts as one).
        units: Strings to translate (sentences and chunks).
        chunked_sentences: Sentences longer than ``max_tokens`` that had to be cut.
        char_window_sentences: Of those, how many needed a cut inside a word.
        over_limit_units: Units still over the limit (only when one character exceeds it).
        crlf_normalised: Carriage returns turned into line feeds.
        split_failures: Lines ``sentencex`` could not segment (kept as one sentence).
    """

    paragraphs: int = 0
    lines: int = 0
    blank_lines: int = 0
    whitespace_lines: int = 0
    sentences: int = 0
    units: int = 0
    chunked_sentences: int = 0
    char_window_sentences: int = 0
    over_limit_units: int = 0
    crlf_normalised: int = 0
    split_failures: int = 0

    def __str__(self) -> str:
        text = (
            f"{self.paragraphs} paragraphs, {self.lines} lines ({self.blank_lines} blank), "
            f"{self.sentences} sentences, {self.units} units"
        )
        unusual = unusual_notes(self)
        return text + ("; " + ", ".join(unusual) if unusual else "")


def _clean_translation(text: str) -> str:
    """A translation as it goes back into a line: no line breaks, no surrounding whitespace."""
    return _LINE_BREAKS.sub(" ", text).strip()


@dataclass
class SegmentedDocument:
    """A document cut into units, with the layout to put translations back.

    Attributes:
        units: The strings to translate, in document order.
        lines: One entry per line of the document.
        final_newline: Whether the document ended with a newline.
        summary: Counts for a one-line report.
    """

    units: list[Unit]
    lines: list[LineLayout]
    final_newline: bool = False
    summary: SegmentSummary = field(default_factory=SegmentSummary)

    def reassemble_lines(self, translations: Sequence[str]) -> list[str]:
        """Rebuild the document's lines from one translation per unit.

        Translations are stripped and any line break inside one becomes a space, so there is
        exactly one output line per input line.

        Args:
            translations: Aligned with ``self.units``.

        Returns:
            One string per line, without newlines; blank lines are empty strings.

        Raises:
            DataError: The number of translations differs from the number of units.
        """
        if len(translations) != len(self.units):
            raise DataError(
                f"got {len(translations)} translations for {len(self.units)} units; "
                "translate every unit exactly once"
            )
        out = []
        for layout in self.lines:
            parts = []
            for i in range(layout.first_unit, layout.first_unit + layout.num_units):
                parts.append(self.units[i].before)
                parts.append(_clean_translation(translations[i]))
            parts.append(layout.trailing)
            out.append("".join(parts))
        return out

    def reassemble(self, translations: Sequence[str]) -> str:
        """Rebuild the whole document text from one translation per unit.

        Args:
            translations: Aligned with ``self.units``.

        Returns:
            The text with the document's paragraphs, blank lines and final newline.

        Raises:
            DataError: The number of translations differs from the number of units.
        """
        text = "\n".join(self.reassemble_lines(translations))
        return text + "\n" if self.final_newline else text

    def sentence_text(self, unit_index: int) -> str:
        """The full source sentence that unit ``unit_index`` belongs to (all its chunks)."""
        first = unit_index - self.units[unit_index].chunk
        parts = [self.units[first].text]
        i = first + 1
        while i < len(self.units) and self.units[i].chunk > 0:
            parts.append(self.units[i].before + self.units[i].text)
            i += 1
        return "".join(parts)

    def context(self, unit_index: int, k: int) -> str:
        """The previous ``k`` source sentences of the same paragraph, joined with spaces.

        See :meth:`context_sentences`; "" at a paragraph start.
        """
        return " ".join(self.context_sentences(unit_index, k))

    def context_sentences(self, unit_index: int, k: int) -> list[str]:
        """The previous ``k`` source sentences of the same paragraph, oldest first.

        Sentences on earlier lines of the paragraph count; earlier chunks of the unit's own
        sentence do not (they are not a previous sentence). A context-aware model translates a
        unit with these before it.

        Args:
            unit_index: Index into ``self.units``.
            k: How many sentences to return at most; 0 gives [].
        """
        unit = self.units[unit_index]
        sentences: list[str] = []
        i = unit_index - unit.chunk - 1  # last unit of the previous sentence
        while i >= 0 and len(sentences) < k and self.units[i].paragraph == unit.paragraph:
            sentences.append(self.sentence_text(i))
            i -= self.units[i].chunk + 1
        return sentences[::-1]


def _sentences(line: str, lang: str, summary: SegmentSummary) -> list[str]:
    """Split a line into sentences with sentencex; the pieces concatenate back to ``line``."""
    # sentencex 1.0.x panics on some multi-byte whitespace (e.g. "Ĉ.T\xa0.Ĉ"), so it sees a copy
    # with such whitespace turned into spaces (same length) and we cut the original at its offsets.
    safe = _EXOTIC_WHITESPACE.sub(" ", line)
    try:
        lengths = [len(piece) for piece in _sentencex_segment(lang, safe)]
    except BaseException as error:  # lone surrogates; a Rust panic is not an Exception subclass
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        logger.warning("sentencex could not split a line (%s); keeping it whole", error)
        lengths = None
    if lengths is None or sum(lengths) != len(line):
        summary.split_failures += 1
        return [line]
    pieces, start = [], 0
    for length in lengths:
        pieces.append(line[start : start + length])
        start += length
    return pieces


def _segment(
    lines: list[str],
    lang: str,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    split_short_lines: bool,
    summary: SegmentSummary,
) -> tuple[list[Unit], list[LineLayout]]:
    """Cut CR-free lines into units; see :func:`segment_document`."""
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be at least 1, got {max_tokens}")
    if not lang:
        raise ConfigError("lang must be a language code such as 'en'")
    units: list[Unit] = []
    layouts: list[LineLayout] = []
    paragraph, line_in_paragraph, in_paragraph = -1, 0, False
    for line in lines:
        summary.lines += 1
        if not line.strip():
            summary.blank_lines += 1
            summary.whitespace_lines += bool(line)
            layouts.append(LineLayout(paragraph=None, first_unit=len(units)))
            in_paragraph = False
            continue
        if in_paragraph:
            line_in_paragraph += 1
        else:
            paragraph, line_in_paragraph, in_paragraph = paragraph + 1, 0, True
        first = len(units)
        pending = ""  # whitespace waiting to go before the next unit
        if split_short_lines or count_tokens(line.strip()) > max_tokens:
            sentences = _sentences(line, lang, summary)
        else:
            sentences = [line]
        sentence_index = 0
        for sentence in sentences:
            lead, core, trail = _split_ws(sentence)
            pending += lead
            if not core:
                continue
            pieces, stats = _chunk(core, max_tokens, count_tokens)
            summary.chunked_sentences += stats.chunked
            summary.char_window_sentences += stats.char_windows
            summary.over_limit_units += stats.over_limit
            for chunk_index, piece in enumerate(pieces):
                chunk_lead, chunk_core, chunk_trail = _split_ws(piece)
                units.append(
                    Unit(
                        paragraph,
                        line_in_paragraph,
                        sentence_index,
                        chunk_index,
                        chunk_core,
                        pending + chunk_lead,
                    )
                )
                pending = chunk_trail
            pending += trail
            sentence_index += 1
        summary.sentences += sentence_index
        layouts.append(LineLayout(paragraph, first, len(units) - first, pending))
    summary.paragraphs = paragraph + 1
    summary.units = len(units)
    return units, layouts


def segment_document(
    text: str,
    lang: str = "en",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    count_tokens: Callable[[str], int] = approx_token_count,
) -> SegmentedDocument:
    """Cut a whole document into sentence (and chunk) units, keeping its layout.

    ``\\r\\n`` and lone ``\\r`` become ``\\n`` first. Every non-blank line is split into sentences
    (a newline inside a paragraph is a boundary and is kept), and each sentence longer than
    ``max_tokens`` is chunked with :func:`chunk`.

    Args:
        text: The document.
        lang: sentencex language code (e.g. "en", "ro").
        max_tokens: Longest unit, counted by ``count_tokens``; at least 1.
        count_tokens: Counts the tokens of a string.

    Returns:
        The units and layout; ``reassemble([u.text for u in doc.units])`` gives back the
        normalised text with whitespace-only lines emptied.

    Raises:
        ConfigError: ``max_tokens`` below 1 or an empty ``lang``.
    """
    summary = SegmentSummary(crlf_normalised=text.count("\r"))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    final_newline = text.endswith("\n")
    body = text[:-1] if final_newline else text
    lines = body.split("\n") if text else []
    units, layouts = _segment(lines, lang, max_tokens, count_tokens, True, summary)
    return SegmentedDocument(units, layouts, final_newline, summary)


def segment_lines(
    lines: Sequence[str],
    lang: str = "en",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    count_tokens: Callable[[str], int] = approx_token_count,
) -> SegmentedDocument:
    """Line mode, for files of one segment per line: each line is one unit.

    A line is split into sentences and chunks only when it is longer than ``max_tokens``; blank and
    whitespace-only lines give no unit and come back empty. ``reassemble_lines`` returns exactly
    one line per input line. Line breaks inside a given line (``\\r``, ``\\n``) are treated as
    spaces, so they cannot add lines.

    Args:
        lines: The segments, without their newlines.
        lang: sentencex language code, used for over-long lines.
        max_tokens: Longest unit, counted by ``count_tokens``; at least 1.
        count_tokens: Counts the tokens of a string.

    Returns:
        The units and layout (one ``LineLayout`` per input line).

    Raises:
        ConfigError: ``max_tokens`` below 1 or an empty ``lang``.
    """
    summary = SegmentSummary()
    clean = []
    for line in lines:
        if "\r" in line or "\n" in line:
            summary.crlf_normalised += line.count("\r")
            line = line.rstrip("\r\n").replace("\r", " ").replace("\n", " ")
        clean.append(line)
    units, layouts = _segment(clean, lang, max_tokens, count_tokens, False, summary)
    return SegmentedDocument(units, layouts, False, summary)
