"""Arrow datasets: empty, too long and badly proportioned pairs are dropped and counted; the
token cache is keyed on the tokenizer."""

import logging
from pathlib import Path

import numpy as np

from seq2seq_diff.arrow import filter_pairs, load_pairs, tokenize_pairs
from seq2seq_diff.corpus import resolve_source
from seq2seq_diff.tokenizer import train_tokenizer


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_empty_pairs_dropped_and_counted(tmp_path, tok, caplog):
    _write(tmp_path / "w.en", ["Hello.", "   ", "Good night.", "", "Yes.", "\t"])
    _write(tmp_path / "w.ro", ["Salut.", "Ceva.", "Noapte bună.", "", "Da.", " "])
    source = resolve_source(str(tmp_path / "w"), "en", "ro")
    tokens = tokenize_pairs(load_pairs(source, "en", "ro", tmp_path / "c"), tok, tmp_path)
    with caplog.at_level(logging.INFO, logger="seq2seq_diff.arrow"):
        ds, stats = filter_pairs(tokens, name="w")
    assert (stats.total, stats.empty, stats.kept) == (6, 3, 3)
    assert ds["src_text"] == ["Hello.", "Good night.", "Yes."]
    assert "dropped 3 with an empty side" in caplog.text


def test_length_and_ratio_filters_counted(corpus, lines, tok, tmp_path):
    pairs = load_pairs(resolve_source(str(corpus), "en", "ro"), "en", "ro", tmp_path)
    tokens = tokenize_pairs(pairs, tok, tmp_path)
    src = np.array(tokens["src_len"])
    tgt = np.array(tokens["tgt_len"])
    long = (src > 12) | (tgt > 12)
    bad = ~long & (np.maximum(src, tgt) / np.minimum(src, tgt) > 1.3)
    ds, stats = filter_pairs(tokens, max_len=12, max_len_ratio=1.3)
    assert (stats.too_long, stats.bad_ratio) == (long.sum(), bad.sum())
    assert stats.kept == len(ds) == len(lines["en"]) - long.sum() - bad.sum()
    assert max(ds["src_len"]) <= 12 and max(ds["tgt_len"]) <= 12


def test_tokens_cache_keyed_on_tokenizer(corpus, lines, tok, tmp_path):
    pairs = load_pairs(resolve_source(str(corpus), "en", "ro"), "en", "ro", tmp_path)
    first = tokenize_pairs(pairs, tok, tmp_path / "tok")
    again = tokenize_pairs(pairs, tok, tmp_path / "tok")
    assert again.cache_files == first.cache_files  # reused
    other = train_tokenizer(lines["en"] + lines["ro"], tmp_path / "o.model", vocab_size=250)
    retok = tokenize_pairs(pairs, other, tmp_path / "tok")
    assert retok.cache_files != first.cache_files
    assert retok["src_ids"] == other.encode(pairs["src_text"])
    assert len(list((tmp_path / "tok").glob("tokens-*.arrow"))) == 2


def test_add_context_prepends_previous_sources_across_map_batches(tmp_path):
    import datasets

    from seq2seq_diff.arrow import add_context

    rows = [[10 + i] * (1 + i % 3) for i in range(2500)]  # > one map batch of 1000 rows
    tokens = datasets.Dataset.from_dict({
        "src_ids": rows, "tgt_ids": [[7]] * len(rows), "src_len": [len(r) + 1 for r in rows],
        "tgt_len": [2] * len(rows)})
    assert add_context(tokens, 0, 3, tmp_path) is tokens
    for k in (1, 2):
        with_context = add_context(tokens, k, 3, tmp_path)
        for i in (0, 1, 2, 999, 1000, 1001, 2000, 2499):  # batch starts and ends included
            expected = [t for prev in rows[max(0, i - k):i] for t in (*prev, 3)] + rows[i]
            assert with_context[i]["src_ids"] == expected
            assert with_context[i]["src_len"] == len(expected) + 1
            assert with_context[i]["tgt_ids"] == [7]  # targets untouched
