"""Segmentation never loses text or structure: property tests plus a few concrete cases."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq_diff.errors import ConfigError, DataError
from seq2seq_diff.segment import (
    approx_token_count,
    chunk,
    segment_document,
    segment_lines,
)

BOOK = Path("/work/shared/data/en-ro/book/gimp-manual-heldout.en")

# Characters that exercise every path: sentence ends, clause marks, all kinds of whitespace and
# line breaks (\u2028, \x85 and \x0b are whitespace but not line breaks here), non-ASCII letters.
_ALPHABET = st.sampled_from(
    list("ab ..?!,;:—–-\t\n\n\r\u00a0\u2028\x85\x0b\"')(șțăî…。、")
) | st.characters(blacklist_categories=("Cs",))
TEXT = st.text(alphabet=_ALPHABET, max_size=200)
COUNTERS = st.sampled_from([len, approx_token_count, lambda s: len(s.split())])
SETTINGS = settings(max_examples=150, deadline=None)


def expected_identity(text: str) -> str:
    """What identity translation must give back: CR normalised, whitespace-only lines emptied."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join("" if not line.strip() else line for line in text.split("\n"))


@SETTINGS
@given(text=TEXT, max_tokens=st.integers(1, 30), count=COUNTERS)
def test_identity_translation_gives_back_the_text(text, max_tokens, count):
    doc = segment_document(text, "en", max_tokens, count)
    assert doc.reassemble([u.text for u in doc.units]) == expected_identity(text)


@SETTINGS
@given(text=TEXT, max_tokens=st.integers(1, 30))
def test_units_are_clean_and_within_limit(text, max_tokens):
    doc = segment_document(text, "en", max_tokens, len)
    for unit in doc.units:
        assert unit.text and unit.text == unit.text.strip()
        assert "\n" not in unit.text and "\r" not in unit.text
        assert len(unit.text) <= max_tokens
        assert not unit.before.strip()
    assert doc.summary.units == len(doc.units)


@SETTINGS
@given(text=TEXT, max_tokens=st.integers(1, 30))
def test_any_translation_keeps_paragraph_and_blank_line_structure(text, max_tokens):
    doc = segment_document(text, "en", max_tokens, len)
    # Translations that change length and even contain line breaks must not move a line.
    out = doc.reassemble([f"T{i}\nx\r\n" for i in range(len(doc.units))])
    source = expected_identity(text).split("\n")
    target = out.split("\n")
    assert len(target) == len(source)
    assert [line == "" for line in target] == [line == "" for line in source]
    assert out.endswith("\n") == expected_identity(text).endswith("\n")
    paragraphs = {u.paragraph for u in doc.units}
    assert paragraphs == set(range(doc.summary.paragraphs))


@SETTINGS
@given(lines=st.lists(TEXT, max_size=20), max_tokens=st.integers(1, 30), count=COUNTERS)
def test_line_mode_gives_one_line_per_input_line(lines, max_tokens, count):
    doc = segment_lines(lines, "en", max_tokens, count)
    out = doc.reassemble_lines([u.text for u in doc.units])
    assert len(out) == len(lines)
    for src, tgt in zip(lines, out, strict=True):
        assert "\n" not in tgt and "\r" not in tgt
        if not src.strip():
            assert tgt == ""
        elif "\n" not in src and "\r" not in src:
            assert tgt == src  # identity gives the line back exactly
    blank_units = [u for u in doc.units if not u.text.strip()]
    assert not blank_units  # blank lines are never sent to the model


@SETTINGS
@given(sentence=TEXT, max_tokens=st.integers(1, 40), count=COUNTERS)
def test_chunk_is_lossless_and_fits(sentence, max_tokens, count):
    chunks = chunk(sentence, max_tokens, count)
    assert "".join(chunks) == sentence
    assert all(count(c.strip()) <= max_tokens for c in chunks)
    if len(chunks) > 1:
        assert all(c.strip() for c in chunks)


@settings(max_examples=25, deadline=None)
@given(
    seed_text=st.text(alphabet=st.sampled_from(list("abcdeș ,.;")), min_size=1, max_size=50),
    max_tokens=st.integers(5, 60),
)
def test_ten_thousand_character_line_is_chunked_within_the_limit(seed_text, max_tokens):
    line = (seed_text * (10_000 // len(seed_text) + 1))[:10_000]
    doc = segment_document(line, "en", max_tokens, len)
    assert all(len(u.text) <= max_tokens for u in doc.units)
    assert doc.reassemble([u.text for u in doc.units]) == expected_identity(line)


def test_ten_thousand_characters_without_spaces_use_character_windows():
    line = "x" * 10_000
    assert approx_token_count(line) > 200  # the default counter sees that it is long
    doc = segment_document(line, "en", 64, approx_token_count)
    assert all(approx_token_count(u.text) <= 64 for u in doc.units)
    assert "".join(u.text for u in doc.units) == line
    assert doc.summary.char_window_sentences == 1
    assert doc.summary.chunked_sentences == 1
    assert "cut inside a word" in str(doc.summary)


def test_chunk_prefers_clause_punctuation_then_words():
    sentence = "one two three, four five six; seven eight nine ten eleven twelve"
    words = lambda s: len(s.split())  # noqa: E731
    assert chunk(sentence, 3, words) == [
        "one two three, ",
        "four five six; ",
        "seven eight nine ",
        "ten eleven twelve",
    ]
    # Neighbouring clauses are merged back while they fit.
    assert chunk(sentence, 6, words) == ["one two three, four five six; ", sentence[30:]]
    assert chunk(sentence, 100, words) == [sentence]
    # No cut inside numbers such as 1,000 (no space after the comma).
    assert chunk("costs 1,000,000 euro", 1, words) == ["costs ", "1,000,000 ", "euro"]


def test_chunk_rejects_a_zero_limit():
    with pytest.raises(ConfigError, match="max_tokens"):
        chunk("a b", 0, len)


@pytest.mark.parametrize("text", ["", "\n", "\n\n\n", "  \n\t\n", " "])
def test_blank_in_blank_out(text):
    doc = segment_document(text)
    assert doc.units == []
    assert doc.reassemble([]) == expected_identity(text)
    assert segment_lines(text.split("\n")).reassemble_lines([]) == [""] * len(text.split("\n"))


def test_layout_of_paragraphs_blank_runs_and_final_newline():
    text = "\n\nFirst one. Second one.\nNext line.\n\n\n  \nLast paragraph."
    doc = segment_document(text)
    assert [(u.paragraph, u.line, u.sentence, u.text) for u in doc.units] == [
        (0, 0, 0, "First one."),
        (0, 0, 1, "Second one."),
        (0, 1, 0, "Next line."),
        (1, 0, 0, "Last paragraph."),
    ]
    summary = doc.summary
    assert (summary.paragraphs, summary.lines, summary.blank_lines) == (2, 8, 5)
    assert (summary.sentences, summary.units, summary.whitespace_lines) == (4, 4, 1)
    assert doc.final_newline is False
    out = doc.reassemble(["A.", "B.", "C.", "D."])
    assert out == "\n\nA. B.\nC.\n\n\n\nD."
    assert segment_document(text + "\n").reassemble(["A.", "B.", "C.", "D."]) == out + "\n"


def test_crlf_is_normalised_and_counted():
    doc = segment_document("One.\r\nTwo.\r\n\r\nThree.\r")
    assert doc.reassemble([u.text for u in doc.units]) == "One.\nTwo.\n\nThree.\n"
    assert doc.summary.crlf_normalised == 4


def test_sentencex_knows_abbreviations_and_languages():
    doc = segment_document("Mr. Smith went to Washington. He arrived at 5 p.m. today!")
    assert [u.text for u in doc.units] == [
        "Mr. Smith went to Washington.",
        "He arrived at 5 p.m. today!",
    ]
    ro = segment_document("Ana are mere. Ion are pere? Da.", lang="ro")
    assert [u.text for u in ro.units] == ["Ana are mere.", "Ion are pere?", "Da."]


def test_reassemble_rejects_a_wrong_number_of_translations():
    doc = segment_document("One. Two.")
    with pytest.raises(DataError, match="1 translations for 2 units"):
        doc.reassemble(["Unu."])


def test_line_mode_splits_only_long_lines():
    lines = ["Short one. Still one unit.", "", "   ", "A long line. " * 10]
    doc = segment_lines(lines, "en", max_tokens=8, count_tokens=lambda s: len(s.split()))
    assert doc.units[0].text == "Short one. Still one unit."
    assert [u.paragraph for u in doc.units[1:]] == [1] * 10
    out = doc.reassemble_lines(["X"] * len(doc.units))
    assert out == ["X", "", "", "X " * 10]  # the source line's trailing space is kept


def test_context_gives_previous_sentences_of_the_paragraph():
    text = "S1. S2.\nS3 has, two chunks.\n\nP2 first."
    doc = segment_document(text, max_tokens=2, count_tokens=lambda s: len(s.split()))
    texts = [u.text for u in doc.units]
    assert texts == ["S1.", "S2.", "S3 has,", "two chunks.", "P2 first."]
    assert doc.context(0, 2) == ""
    assert doc.context(1, 2) == "S1."
    assert doc.context(2, 2) == "S1. S2."
    assert doc.context(3, 5) == "S1. S2."  # second chunk: its own first chunk is not context
    assert doc.context(2, 1) == "S2."
    assert doc.sentence_text(3) == "S3 has, two chunks."
    assert doc.context(4, 3) == ""  # new paragraph


@pytest.mark.skipif(not BOOK.exists(), reason="shared GIMP book data not present")
def test_gimp_book_round_trip_one_unit_group_per_line():
    text = BOOK.read_text(encoding="utf-8")
    doc = segment_document(text, "en", 64, approx_token_count)
    assert doc.reassemble([u.text for u in doc.units]) == text
    assert doc.summary.lines == text.count("\n")
    assert doc.summary.sentences >= doc.summary.lines
    lines = text.splitlines()
    line_doc = segment_lines(lines, "en", 64, approx_token_count)
    assert line_doc.reassemble_lines([u.text for u in line_doc.units]) == lines


@pytest.mark.parametrize("line", ["😍.T\xa0.Ĉ and more. Yes.", "Lone \ud800 surrogate. Two."])
def test_lines_that_trip_sentencex_are_kept(line):
    # sentencex 1.0.x panics on the first (multi-byte whitespace) and cannot encode the second.
    doc = segment_document(line)
    assert doc.reassemble([u.text for u in doc.units]) == line
    assert len(doc.units) >= 1
