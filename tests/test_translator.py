"""Translator in memory: structure kept, nothing dropped, input order, batching, from_pretrained.

A tiny SentencePiece model (trained on a few hundred lines of the bundled corpus) and an
untrained tiny model: outputs are gibberish, but one output per input, blank lines, paragraphs
and order must hold. An "identity" translator (search returns the source pieces) checks order
and layout exactly.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq_diff.errors import ConfigError
from seq2seq_diff.segment import segment_document
from seq2seq_diff.translator import TranslationStats, Translator, make_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def make_translator(model, tokenizer, **options) -> Translator:
    options = {"beam_size": 1, "max_len_a": 1.0, "max_len_b": 5, **options}
    return Translator(model, tokenizer, **options)


class IdentityTranslator(Translator):
    """Search returns the source pieces: the "translation" is the tokenizer round trip."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def _search(self, src, src_mask):
        self.batches.append(int(src_mask.sum()))
        return [[(row[mask][:-1].tolist(), 0.0)] for row, mask in zip(src, src_mask, strict=True)]


def roundtrip(tokenizer, texts: list[str]) -> list[str]:
    return tokenizer.decode(tokenizer.encode(texts))


def exact_lines(tokenizer, english: list[str]) -> list[str]:
    """Corpus lines that survive the tokenizer round trip unchanged."""
    return [s for s, r in zip(english, roundtrip(tokenizer, english), strict=True) if s == r]


# --- batching -------------------------------------------------------------------------------

def test_make_batches_budget_order_and_coverage():
    lengths = [5, 30, 7, 7, 12, 3, 100, 1, 30]
    batches = make_batches(lengths, max_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 40 or len(b) == 1
    assert [6] in batches  # longer than the budget: alone, never dropped
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)
    assert make_batches([], 10) == []


# --- translate() ----------------------------------------------------------------------------

def test_one_output_per_input_blank_in_blank_out(model, tokenizer, english):
    lines = [english[0], "", "   ", english[1], "\t", english[2], ""]
    translator = make_translator(model, tokenizer)
    calls = []
    original = translator._search_units
    translator._search_units = lambda texts, *a, **k: calls.append(list(texts)) or original(
        texts, *a, **k)
    out = translator.translate(lines)
    assert len(out) == len(lines)
    assert [o == "" for o in out] == [not line.strip() for line in lines]
    assert all(o.strip() for o, line in zip(out, lines, strict=True) if line.strip())
    assert all(text.strip() for texts in calls for text in texts)  # blanks never sent
    assert translator.translate([]) == []
    assert translator.translate(["", " "]) == ["", ""]
    with pytest.raises(TypeError):
        translator.translate("a string")


def test_results_in_input_order_despite_length_sorting(model, tokenizer, english):
    lines = exact_lines(tokenizer, english)[:40]
    assert len({len(s) for s in lines}) > 10  # lengths differ: sorting reorders them
    translator = IdentityTranslator(model, tokenizer, max_tokens=60)
    assert translator.translate(lines) == lines
    assert len(translator.batches) > 1 and max(translator.batches) <= 60


def test_batched_equals_one_by_one_with_real_model(model, tokenizer, english):
    lines = english[:12]
    translator = make_translator(model, tokenizer, beam_size=2, max_tokens=50)
    batched = translator.translate(lines)
    assert batched == [translator.translate([line])[0] for line in lines]
    assert len(set(batched)) > 1  # outputs depend on the input


def test_long_line_is_chunked_not_truncated(model, tokenizer, english):
    long_line = " ".join(english * 2)[:10_000]
    assert len(long_line) == 10_000
    translator = IdentityTranslator(model, tokenizer, max_sentence_tokens=40)
    stats = TranslationStats()
    (out,) = translator.translate([long_line], stats)
    assert stats.lines == 1 and stats.units > 10 and stats.chunked_sentences + stats.sentences > 1
    # Every piece of the source comes back: the identity output is the whole line's round trip.
    assert out.split() == " ".join(roundtrip(tokenizer, [long_line])).split()
    real = make_translator(model, tokenizer, max_sentence_tokens=40)
    stats = TranslationStats()
    (out,) = real.translate([long_line], stats)
    assert out and stats.units > 10 and "\n" not in out
    # A 10,000-character word with no spaces is cut into character windows.
    word = "x" * 10_000
    stats = TranslationStats()
    (out,) = IdentityTranslator(model, tokenizer, max_sentence_tokens=40).translate([word], stats)
    assert out.replace(" ", "") == word and stats.char_window_sentences == 1


# --- translate_document() -------------------------------------------------------------------

def test_document_round_trip_keeps_layout(model, tokenizer, english):
    sents = exact_lines(tokenizer, english)
    text = (f"\n{sents[0]} {sents[1]}\n{sents[2]}\n\n\n{sents[3]}  {sents[4]} {sents[5]}\n"
            f"   \n{sents[6]}\n\n")
    translator = IdentityTranslator(model, tokenizer)
    stats = TranslationStats()
    assert translator.translate_document(text, stats) == text.replace("   \n", "\n")
    assert stats.paragraphs == 3 and stats.blank_lines == 5 and stats.whitespace_lines == 1
    assert translator.translate_document("") == ""
    assert translator.translate_document("\n\n") == "\n\n"
    assert translator.translate_document(sents[0]) == sents[0]  # no final newline added

    real = make_translator(model, tokenizer)
    out = real.translate_document(text)
    assert [not line.strip() for line in out.split("\n")] == \
        [not line.strip() for line in text.split("\n")]


def test_sentence_count_in_equals_sentences_translated(model, tokenizer, english):
    text = " ".join(english[:10]) + "\n\n" + " ".join(english[10:25]) + "\n"
    expected = segment_document(text, "en").summary.sentences
    translator = IdentityTranslator(model, tokenizer)
    stats = TranslationStats()
    translator.translate_document(text, stats)
    assert stats.sentences == expected == stats.units
    assert sum(1 for _ in translator.batches) >= 1
    assert stats.source_tokens == sum(len(ids) + 1 for ids in tokenizer.encode(
        [u.text for u in segment_document(text, "en").units]))


# --- from_pretrained ------------------------------------------------------------------------

def test_from_pretrained_matches_direct(model_dir, model, tokenizer, english):
    loaded = Translator.from_pretrained(model_dir, beam_size=2, max_len_a=1.0, max_len_b=5)
    direct = make_translator(model, tokenizer, beam_size=2)
    assert loaded.translate(english[:5]) == direct.translate(english[:5])
    with pytest.raises(ConfigError):
        Translator.from_pretrained(model_dir, beam_size=2, n_best=3)



def test_context_sentences_precede_each_unit_closed_by_eos(model, tokenizer):
    translator = make_translator(model, tokenizer, context=1)
    doc = segment_document("The cat sat down. The dog ran off.\nBirds sing.\n\nA new page.", "en",
                           200, translator.count_tokens)
    texts = [u.text for u in doc.units]
    contexts = [doc.context_sentences(i, 1) for i in range(len(texts))]
    assert contexts == [[], ["The cat sat down."], ["The dog ran off."], []]  # per paragraph
    ids = translator._encode(texts, contexts)
    eos = tokenizer.eos_id
    enc = tokenizer.encode
    assert ids[0] == enc([texts[0]])[0] + [eos]
    assert ids[2] == enc(["The dog ran off."])[0] + [eos] + enc([texts[2]])[0] + [eos]
    assert ids[3] == enc([texts[3]])[0] + [eos]  # no context across paragraphs
    out = translator.translate_document("The cat sat down. The dog ran off.\nBirds sing.\n\nNew.")
    assert out.count("\n") == 3 and out.split("\n")[2] == ""  # layout kept with context


def test_from_pretrained_takes_context_from_training_config(tmp_path, model, tokenizer):
    from seq2seq_diff.model_dir import save_model_dir

    path = save_model_dir(tmp_path / "ctx", model, tokenizer,
                          training_config={"data": {"src_lang": "en", "context": 2}})
    assert Translator.from_pretrained(path).context == 2
    assert Translator.from_pretrained(path, context=0).context == 0
    assert Translator.from_pretrained(path, context=None).context == 2
    with pytest.raises(ConfigError, match="context"):
        make_translator(model, tokenizer, context=-1)


# -- properties and soak ----------------------------------------------------------------------

_LINE = st.one_of(
    st.text(max_size=60),  # anything: control characters, emoji, other scripts
    st.sampled_from(["", "   ", "\t", "!!!", "🙂🙂", "…", "Open the file.", "x" * 300]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_LINE, max_size=8))
def test_any_lines_give_one_output_line_each(model, tokenizer, lines):
    translator = Translator(model, tokenizer, beam_size=2, max_len_a=0.5, max_len_b=4,
                            max_sentence_tokens=24)
    out = translator.translate(lines)
    assert len(out) == len(lines)
    for src, tgt in zip(lines, out, strict=True):
        assert "\n" not in tgt and "\r" not in tgt
        if not src.strip():
            assert tgt == ""


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
def test_translating_the_book_three_times_does_not_grow_memory(model, tokenizer):
    from pathlib import Path

    book = (Path(__file__).resolve().parents[1] / "data/en-ro/book/gimp-manual-heldout.en")
    lines = book.read_text(encoding="utf-8").splitlines()
    translator = Translator(model, tokenizer, beam_size=2, max_len_a=0.5, max_len_b=8)
    sizes = []
    for _ in range(3):
        assert len(translator.translate(lines)) == len(lines)
        sizes.append(_rss_mib())
    assert sizes[2] - sizes[0] < 50, sizes  # MiB: the first pass allocates, later ones reuse
