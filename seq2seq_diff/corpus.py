"""Parallel corpora: validated readers and corpus specs -> ``(src, tgt)`` pairs.

Read top to bottom: readers turn a corpus (plain-text pair, TSV, JSONL, a local or hub Hugging
Face dataset) into ``(src, tgt)`` pairs, validating at the boundary (every problem is a
``DataError`` naming the file and 1-based line). ``resolve_source`` turns a spec string into a
:class:`Source`, ``iter_pairs`` yields its pairs. :mod:`seq2seq_diff.arrow` puts them in cached
Arrow datasets.

Corpus specs (``format="auto"`` guesses from the spec):

- ``path/train`` with ``path/train.en`` and ``path/train.ro``: plain text, aligned by line
  (``path/train.origin``, if present, tags each line; see ``origins``);
- ``a.txt,b.txt``: two explicit plain-text files, source first then target;
- ``x.tsv``: ``src<TAB>tgt`` per line, or a header line naming the languages (``en<TAB>ro``);
- ``x.jsonl`` / ``x.json``: JSON Lines, ``{"en": .., "ro": ..}`` or the wmt16 schema
  ``{"translation": {"en": .., "ro": ..}}``;
- ``x.parquet``: ``datasets.load_dataset("parquet")`` (columns as in the JSON schemas);
- a directory written by ``Dataset.save_to_disk``: ``datasets.load_from_disk``;
- ``hf:NAME:CONFIG:SPLIT`` (``hf:wmt16:ro-en:train``): ``datasets.load_dataset`` from the hub;
  ``hf:NAME:CONFIG`` means the ``train`` split.

``format="json"`` reads a JSON file with ``datasets.load_dataset("json")`` instead of the
line-checking reader (it also accepts a JSON array).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import datasets

from seq2seq_diff.errors import ConfigError, DataError

Pair = tuple[str, str]
FORMATS = ("auto", "text", "tsv", "jsonl", "json", "parquet", "disk", "hf")


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# Readers: files -> (src, tgt) pairs, validated


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError("file not found", path)
    if not path.is_file():
        raise DataError("not a file", path)
    if path.stat().st_size == 0:
        raise DataError("file is empty", path)


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` of a UTF-8 file, 1-based.

    Lines split on ``\\n`` only (so U+2028 inside a sentence cannot shift the alignment); a
    trailing ``\\r`` and a UTF-8 byte-order mark on line 1 are removed.

    Raises:
        DataError: Missing or empty file, or a line that is not valid UTF-8.
    """
    path = Path(path)
    _check_file(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = raw[error.start : error.start + 4]
                raise DataError(
                    f"invalid UTF-8 (byte {error.start} of the line, {bad!r}); convert the file "
                    "to UTF-8, e.g. iconv -f latin1 -t utf-8",
                    path,
                    number,
                ) from None
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield number, text.rstrip("\r\n")


def _count_rest(lines: Iterator[tuple[int, str]], last: int) -> int:
    for last, _ in lines:  # noqa: B007 - we want the final line number
        pass
    return last


def _mismatch(short: Path, n_short: int, long: Path, n_long: int) -> DataError:
    return DataError(
        f"file ends after {n_short} lines but {long} has {n_long} lines; parallel files must "
        "have the same number of lines",
        short,
        n_short + 1,
    )


def read_text_pair(
    src_path: str | Path,
    tgt_path: str | Path,
    origin_path: str | Path | None = None,
    origins: Sequence[str] | None = None,
) -> Iterator[Pair]:
    """Yield pairs from two line-aligned plain-text files.

    Args:
        src_path: Source-language file.
        tgt_path: Target-language file.
        origin_path: Optional third aligned file with one tag per line.
        origins: Keep only the lines whose tag is in this list (needs ``origin_path``).

    Raises:
        DataError: A reader error, or files with different numbers of lines (both counts given).
    """
    paths = [Path(src_path), Path(tgt_path)] + ([Path(origin_path)] if origin_path else [])
    readers = [read_lines(p) for p in paths]
    keep = set(origins) if origins else None
    number = 0
    for rows in zip_longest(*readers):
        if any(row is None for row in rows):
            ended = [i for i, row in enumerate(rows) if row is None][0]
            longer = [i for i, row in enumerate(rows) if row is not None][0]
            n_long = _count_rest(readers[longer], rows[longer][0])
            raise _mismatch(paths[ended], number, paths[longer], n_long)
        number = rows[0][0]
        if keep is not None and rows[2][1].strip() not in keep:
            continue
        yield rows[0][1], rows[1][1]


def read_tsv(path: str | Path, src_lang: str, tgt_lang: str) -> Iterator[Pair]:
    """Yield pairs from a TSV file.

    A first line whose fields include both language codes is a header, and columns are picked by
    name (so one file serves both directions). Without a header, each line is exactly
    ``source<TAB>target`` in the configured direction.

    Raises:
        DataError: A reader error, or a line with the wrong number of fields.
    """
    path = Path(path)
    lines = read_lines(path)
    first_number, first = next(lines)
    header = first.split("\t")
    if src_lang in header and tgt_lang in header:
        columns, width = (header.index(src_lang), header.index(tgt_lang)), len(header)
        rows = lines
    else:
        columns, width = (0, 1), 2
        rows = _prepend((first_number, first), lines)
    for number, line in rows:
        fields = line.split("\t")
        if len(fields) != width:
            if not line.strip():
                yield "", ""  # dropped and counted later, like any empty pair
                continue
            raise DataError(
                f"expected {width} tab-separated fields, found {len(fields)}", path, number
            )
        yield fields[columns[0]], fields[columns[1]]


def _prepend(item: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield item
    yield from rest


def pair_from_record(
    record: Any, src_lang: str, tgt_lang: str, path: str | Path, line: int | None
) -> Pair:
    """Pick ``(src, tgt)`` from a flat ``{lang: text}`` record or the wmt16 ``translation`` one.

    Raises:
        DataError: Not an object, a missing language key, or a value that is not a string.
    """
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", path, line)
    if isinstance(record.get("translation"), dict):
        record = record["translation"]
    texts = []
    for lang in (src_lang, tgt_lang):
        if lang not in record:
            keys = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"missing language key '{lang}' (keys: {keys})", path, line)
        value = record[lang]
        if not isinstance(value, str):
            raise DataError(
                f"value of '{lang}' must be a string, got {type(value).__name__}", path, line
            )
        texts.append(value)
    return texts[0], texts[1]


def read_jsonl(path: str | Path, src_lang: str, tgt_lang: str) -> Iterator[Pair]:
    """Yield pairs from JSON Lines (flat or wmt16 ``translation`` schema); blank lines skipped.

    Raises:
        DataError: A reader error, a line that is not JSON, or a missing language key.
    """
    path = Path(path)
    for number, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"bad JSON ({error.msg}, column {error.colno}); expected one object per line "
                'such as {"en": "...", "ro": "..."}',
                path,
                number,
            ) from None
        yield pair_from_record(record, src_lang, tgt_lang, path, number)


# ----------------------------------------------------------------------------------------------
# Sources: a spec string -> what to read and how


@dataclass(frozen=True)
class Source:
    """A resolved corpus spec.

    Attributes:
        spec: The spec as given.
        format: One of ``FORMATS`` other than ``auto``.
        paths: The files read: ``(src, tgt)`` for ``text``, else ``(file_or_dir,)``.
        origin: The ``.origin`` tag file next to a ``text`` prefix, when there is one.
        hub: ``(name, config, split)`` for ``hf``.
    """

    spec: str
    format: str
    paths: tuple[Path, ...] = ()
    origin: Path | None = None
    hub: tuple[str, str | None, str] | None = None

    def fingerprint(self) -> str:
        """Changes when a file read changes (path, size, modification time) or the spec does."""
        stats = []
        for path in [*self.paths, *([self.origin] if self.origin else [])]:
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            for file in files:
                if file.is_file():
                    stat = file.stat()
                    stats.append((str(file.resolve()), stat.st_size, stat.st_mtime_ns))
        return _hash(self.spec, self.format, self.hub, stats)


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` -> ``(name, config, split)``, split ``train`` if unset."""
    parts = spec.split(":")[1:]
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise ConfigError(f"hub spec must look like hf:NAME:CONFIG:SPLIT, got {spec!r}")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _detect_format(spec: str, src_lang: str, tgt_lang: str) -> str:
    path = Path(spec)
    if spec.startswith("hf:"):
        return "hf"
    if "," in spec and not path.exists():
        return "text"
    if path.is_dir():
        return "disk"
    suffixes = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    if path.suffix.lower() in suffixes:
        return suffixes[path.suffix.lower()]
    if Path(f"{spec}.{src_lang}").exists() or Path(f"{spec}.{tgt_lang}").exists():
        return "text"
    if path.exists():
        raise DataError(
            "cannot tell the format from the name; set format to one of "
            f"{', '.join(FORMATS[1:])}",
            path,
        )
    raise DataError(
        f"not found (nor {spec}.{src_lang} / {spec}.{tgt_lang} for a plain-text pair)", path
    )


def resolve_source(spec: str, src_lang: str, tgt_lang: str, format: str = "auto") -> Source:
    """Turn a corpus spec into a :class:`Source`, checking that its files exist.

    Raises:
        ConfigError: An unknown format.
        DataError: A missing file, or a spec whose format cannot be guessed.
    """
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    fmt = _detect_format(spec, src_lang, tgt_lang) if format == "auto" else format
    if fmt == "hf":
        return Source(spec, fmt, hub=parse_hub_spec(spec))
    if fmt == "text":
        if "," in spec and not Path(spec).exists():
            src, tgt = (Path(p.strip()) for p in spec.split(",", 1))
            origin = None
        else:
            src, tgt = Path(f"{spec}.{src_lang}"), Path(f"{spec}.{tgt_lang}")
            origin = Path(f"{spec}.origin")
        for path in (src, tgt):
            _check_file(path)
        return Source(spec, fmt, (src, tgt), origin if origin and origin.exists() else None)
    path = Path(spec)
    if not path.exists():
        raise DataError("not found", path)
    if fmt == "disk" and not path.is_dir():
        raise DataError("format 'disk' needs a directory written by save_to_disk", path)
    if fmt != "disk":
        _check_file(path)
    return Source(spec, fmt, (path,))


def _load_hf(source: Source, cache_dir: Path | None) -> datasets.Dataset:
    """Load an Arrow-backed source with ``datasets``."""
    if source.format == "hf":
        name, config, split = source.hub
        return datasets.load_dataset(name, config, split=split)
    path = source.paths[0]
    if source.format == "disk":
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise DataError(
                    f"holds splits {list(loaded)}; save the one split to use on its own "
                    "(dataset_dict[split].save_to_disk(...))",
                    path,
                )
            loaded = next(iter(loaded.values()))
        return loaded
    builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}[source.format]
    hf_cache = str(cache_dir / "hf") if cache_dir is not None else None
    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=hf_cache)


def _check_columns(ds: datasets.Dataset, src_lang: str, tgt_lang: str, where: str) -> None:
    columns = ds.column_names
    if src_lang in columns and tgt_lang in columns:
        return
    if "translation" in columns:
        feature = ds.features["translation"]
        langs = getattr(feature, "languages", None) or list(feature)
        missing = [lang for lang in (src_lang, tgt_lang) if lang not in langs]
        if not missing:
            return
        raise DataError(f"missing language key '{missing[0]}' in 'translation' ({langs})", where)
    raise DataError(
        f"no '{src_lang}' and '{tgt_lang}' columns and no 'translation' column "
        f"(columns: {columns})",
        where,
    )


def _check_origins(source: Source, origins: Sequence[str] | None) -> None:
    if origins and source.origin is None:
        raise ConfigError(
            f"origins={list(origins)} needs a '.origin' file next to the plain-text corpus "
            f"{source.spec!r}"
        )


def iter_pairs(
    source: Source,
    src_lang: str,
    tgt_lang: str,
    origins: Sequence[str] | None = None,
    cache_dir: Path | None = None,
) -> Iterator[Pair]:
    """Yield the stripped ``(src, tgt)`` pairs of a source, empty ones included.

    Raises:
        ConfigError: ``origins`` for a source without a ``.origin`` file.
        DataError: Any reader error.
    """
    _check_origins(source, origins)
    if source.format == "text":
        pairs = read_text_pair(*source.paths, origin_path=source.origin, origins=origins)
    elif source.format == "tsv":
        pairs = read_tsv(source.paths[0], src_lang, tgt_lang)
    elif source.format == "jsonl":
        pairs = read_jsonl(source.paths[0], src_lang, tgt_lang)
    else:
        ds = _load_hf(source, cache_dir)
        _check_columns(ds, src_lang, tgt_lang, source.spec)
        pairs = (
            pair_from_record(record, src_lang, tgt_lang, source.spec, index + 1)
            for index, record in enumerate(ds)
        )
    for src, tgt in pairs:
        yield src.strip(), tgt.strip()
