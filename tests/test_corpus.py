"""Corpus readers and specs: every input format gives the same examples, validation errors
name file and line."""

import json
from pathlib import Path

import datasets
import pytest

from seq2seq_diff.arrow import load_pairs, tokenize_pairs
from seq2seq_diff.corpus import parse_hub_spec, resolve_source
from seq2seq_diff.errors import ConfigError, DataError


def _pairs(spec, src="en", tgt="ro", fmt="auto", cache=None, origins=None):
    source = resolve_source(str(spec), src, tgt, fmt)
    ds = load_pairs(source, src, tgt, cache, origins)
    return list(zip(ds["src_text"], ds["tgt_text"], strict=True))


# ----------------------------------------------------------------------------------------------
# Formats


def test_all_formats_give_identical_examples(tmp_path, corpus, lines, tok):
    en, ro = lines["en"], lines["ro"]
    records = [{"en": e, "ro": r} for e, r in zip(en, ro, strict=True)]
    (tmp_path / "flat.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    wmt = [{"translation": r} for r in records]
    (tmp_path / "wmt.jsonl").write_text("\n".join(json.dumps(r) for r in wmt) + "\n")
    (tmp_path / "plain.tsv").write_text("".join(f"{e}\t{r}\n" for e, r in zip(en, ro, strict=True)))
    # A header picks columns by name, whatever their order.
    header = "".join(f"{r}\t{e}\n" for e, r in zip(en, ro, strict=True))
    (tmp_path / "header.tsv").write_text("ro\ten\n" + header)
    flat = datasets.Dataset.from_list(records)
    flat.to_parquet(str(tmp_path / "flat.parquet"))
    flat.save_to_disk(str(tmp_path / "saved"))
    cache = tmp_path / "cache"
    specs = {
        "text prefix": (corpus, "auto"),
        "two paths": (f"{corpus}.en,{corpus}.ro", "auto"),
        "tsv": (tmp_path / "plain.tsv", "auto"),
        "tsv header": (tmp_path / "header.tsv", "auto"),
        "jsonl flat": (tmp_path / "flat.jsonl", "auto"),
        "jsonl wmt16": (tmp_path / "wmt.jsonl", "auto"),
        "load_dataset json": (tmp_path / "wmt.jsonl", "json"),
        "load_dataset parquet": (tmp_path / "flat.parquet", "auto"),
        "load_from_disk": (tmp_path / "saved", "auto"),
    }
    expected = list(zip(en, ro, strict=True))
    tokens = None
    for name, (spec, fmt) in specs.items():
        source = resolve_source(str(spec), "en", "ro", fmt)
        pairs = load_pairs(source, "en", "ro", cache)
        assert list(zip(pairs["src_text"], pairs["tgt_text"], strict=True)) == expected, name
        ids = tokenize_pairs(pairs, tok, cache)
        got = (ids["src_ids"], ids["tgt_ids"])
        tokens = tokens or got
        assert got == tokens, name


def test_direction_swaps(corpus, lines, tmp_path):
    expected = list(zip(lines["ro"], lines["en"], strict=True))
    assert _pairs(corpus, "ro", "en", cache=tmp_path) == expected


def test_crlf_and_bom_are_accepted(tmp_path, lines):
    en, ro = lines["en"][:20], lines["ro"][:20]
    (tmp_path / "w.en").write_bytes(("\ufeff" + "\r\n".join(en) + "\r\n").encode())
    (tmp_path / "w.ro").write_bytes(("\r\n".join(ro)).encode())  # no final newline either
    assert _pairs(tmp_path / "w", cache=tmp_path / "c") == list(zip(en, ro, strict=True))


def test_hub_spec(monkeypatch, tmp_path):
    assert parse_hub_spec("hf:wmt16:ro-en:train") == ("wmt16", "ro-en", "train")
    assert parse_hub_spec("hf:wmt16:ro-en") == ("wmt16", "ro-en", "train")
    assert parse_hub_spec("hf:org/name::validation") == ("org/name", None, "validation")
    calls = []
    features = datasets.Features({"translation": datasets.Translation(languages=["en", "ro"])})
    rows = {"translation": [{"en": "Hello.", "ro": "Salut."}]}

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert _pairs("hf:wmt16:ro-en:validation", "ro", "en", cache=tmp_path) == [("Salut.", "Hello.")]
    assert calls == [("wmt16", "ro-en", "validation")]


# ----------------------------------------------------------------------------------------------
# Validation errors


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_mismatched_line_counts(tmp_path):
    _write(tmp_path / "m.en", ["a", "b", "c"])
    _write(tmp_path / "m.ro", ["a", "b"])
    with pytest.raises(DataError, match="ends after 2 lines.*has 3 lines") as info:
        _pairs(tmp_path / "m", cache=tmp_path / "c")
    assert info.value.path == str(tmp_path / "m.ro") and info.value.line == 3


def test_empty_and_missing_files(tmp_path):
    _write(tmp_path / "e.en", ["a"])
    (tmp_path / "e.ro").write_bytes(b"")
    with pytest.raises(DataError, match="file is empty") as info:
        _pairs(tmp_path / "e", cache=tmp_path)
    assert info.value.path == str(tmp_path / "e.ro")
    with pytest.raises(DataError, match="not found") as info:
        _pairs(tmp_path / "nothing", cache=tmp_path)
    with pytest.raises(DataError, match="file not found") as info:
        _pairs(f"{tmp_path}/e.en,{tmp_path}/absent.ro", cache=tmp_path)
    assert info.value.path == str(tmp_path / "absent.ro")


def test_invalid_utf8_names_the_line(tmp_path):
    _write(tmp_path / "u.en", ["one", "two", "three"])
    (tmp_path / "u.ro").write_bytes(b"unu\ndoi\ntr\xe9i\n")
    with pytest.raises(DataError, match="invalid UTF-8") as info:
        _pairs(tmp_path / "u", cache=tmp_path / "c")
    assert (info.value.path, info.value.line) == (str(tmp_path / "u.ro"), 3)
    assert str(info.value).startswith(f"{tmp_path / 'u.ro'}:3: ")


def test_bad_json_and_missing_key(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", ['{"en": "a", "ro": "b"}', '{"en": "a", "ro": '])
    with pytest.raises(DataError, match="bad JSON") as info:
        _pairs(bad, cache=tmp_path / "c1")
    assert (info.value.path, info.value.line) == (str(bad), 2)
    key = _write(tmp_path / "key.jsonl", ['{"en": "a", "ro": "b"}', '{"en": "a", "de": "b"}'])
    with pytest.raises(DataError, match="missing language key 'ro'") as info:
        _pairs(key, cache=tmp_path / "c2")
    assert info.value.line == 2
    tsv = _write(tmp_path / "x.tsv", ["a\tb", "a\tb\tc"])
    with pytest.raises(DataError, match="expected 2 tab-separated fields") as info:
        _pairs(tsv, cache=tmp_path / "c3")
    assert info.value.line == 2
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"en": "a", "de": "b"}]).to_parquet(str(parquet))
    with pytest.raises(DataError, match="no 'en' and 'ro' columns"):
        _pairs(parquet, cache=tmp_path / "c4")


def test_origins_filter(corpus, lines, tmp_path):
    pairs = _pairs(corpus, cache=tmp_path, origins=["tatoeba_anki"])
    rows = zip(lines["en"], lines["ro"], lines["origin"], strict=True)
    wanted = [(e, r) for e, r, o in rows if o == "tatoeba_anki"]
    assert pairs == wanted and 0 < len(pairs) < len(lines["en"])
    with pytest.raises(ConfigError, match="origin"):
        _pairs(f"{corpus}.en,{corpus}.ro", cache=tmp_path, origins=["udhr"])
