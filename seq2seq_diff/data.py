"""Parallel data: readers, Arrow datasets, token-bounded batches and the Lightning data module.

Read top to bottom: readers turn a corpus (plain-text pair, TSV, JSONL, a local or hub Hugging
Face dataset) into ``(src, tgt)`` pairs, validating at the boundary (every problem is a
``DataError`` naming the file and 1-based line). ``load_pairs`` puts the pairs in an Arrow-backed
``datasets.Dataset`` on disk, ``tokenize_pairs`` adds piece ids (cached, keyed on the data and the
tokenizer), ``filter_pairs`` drops empty, too long and badly proportioned pairs (counted and
logged). ``TokenBatchSampler`` groups examples of similar length into batches bounded by a token
budget, ``BatchLoader`` iterates them and can be checkpointed mid-epoch, ``collate`` builds the
batch dict of docs/CONTRACTS.md. ``TranslationDataModule`` wires it all up for Lightning.

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

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from seq2seq_diff.errors import ConfigError, DataError, ModelDirError
from seq2seq_diff.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

Pair = tuple[str, str]
FORMATS = ("auto", "text", "tsv", "jsonl", "json", "parquet", "disk", "hf")
# Bump when the cached columns change meaning, so old caches are not reused.
CACHE_VERSION = "1"
PAIR_FEATURES = datasets.Features(
    {"src_text": datasets.Value("string"), "tgt_text": datasets.Value("string")}
)
TOKEN_FEATURES = datasets.Features(
    {
        **PAIR_FEATURES,
        "src_ids": datasets.List(datasets.Value("int32")),
        "tgt_ids": datasets.List(datasets.Value("int32")),
        "src_len": datasets.Value("int32"),
        "tgt_len": datasets.Value("int32"),
    }
)


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


def _extract_batch(
    batch: dict[str, list], indices: list[int], src_lang: str, tgt_lang: str, where: str
) -> dict[str, list[str]]:
    keys = list(batch)
    src_texts, tgt_texts = [], []
    for row, index in enumerate(indices):
        record = {key: batch[key][row] for key in keys}
        src, tgt = pair_from_record(record, src_lang, tgt_lang, where, index + 1)
        src_texts.append(src.strip())
        tgt_texts.append(tgt.strip())
    return {"src_text": src_texts, "tgt_text": tgt_texts}


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


# ----------------------------------------------------------------------------------------------
# Arrow datasets: pairs -> cached, tokenised, filtered


def _generate(source: Source, src_lang: str, tgt_lang: str, origins: list[str] | None):
    for src, tgt in iter_pairs(source, src_lang, tgt_lang, origins):
        yield {"src_text": src, "tgt_text": tgt}


def _unwrap_data_error(error: BaseException) -> BaseException:
    """``datasets`` wraps generator errors; give back our own DataError/ConfigError if inside."""
    cause: BaseException | None = error
    seen = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, DataError | ConfigError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return error


def load_pairs(
    source: Source,
    src_lang: str,
    tgt_lang: str,
    cache_dir: str | Path,
    origins: Sequence[str] | None = None,
) -> datasets.Dataset:
    """An Arrow-backed dataset of stripped pairs (columns ``src_text``, ``tgt_text``).

    Files are streamed into Arrow on disk (``Dataset.from_generator``), so a corpus never sits
    in memory; Hugging Face sources are mapped to the same two columns. Both are cached under
    ``cache_dir``, keyed on the files' path, size and modification time. Empty pairs are kept
    here; :func:`filter_pairs` drops and counts them.

    Raises:
        DataError: Any reader error, or a corpus without a single pair.
    """
    cache_dir = Path(cache_dir)
    origins = sorted(origins) if origins else None
    _check_origins(source, origins)
    key = _hash(CACHE_VERSION, source.fingerprint(), src_lang, tgt_lang, origins)
    empty = DataError("no sentence pairs" + (f" with origins {origins}" if origins else ""),
                      source.spec)
    try:
        if source.format in ("text", "tsv", "jsonl"):
            ds = datasets.Dataset.from_generator(
                _generate,
                features=PAIR_FEATURES,
                cache_dir=str(cache_dir / "pairs"),
                gen_kwargs={"source": source, "src_lang": src_lang, "tgt_lang": tgt_lang,
                            "origins": origins},
                fingerprint=key,
            )
        else:
            raw = _load_hf(source, cache_dir)
            _check_columns(raw, src_lang, tgt_lang, source.spec)
            key = _hash(key, raw._fingerprint)
            ds = raw.map(
                _extract_batch,
                batched=True,
                with_indices=True,
                remove_columns=raw.column_names,
                features=PAIR_FEATURES,
                fn_kwargs={"src_lang": src_lang, "tgt_lang": tgt_lang, "where": source.spec},
                cache_file_name=str(cache_dir / f"pairs-{key}.arrow"),
                load_from_cache_file=True,
                new_fingerprint=key,
                desc="Reading pairs",
            )
    except (datasets.exceptions.DatasetGenerationError, RuntimeError) as error:
        unwrapped = _unwrap_data_error(error)
        if unwrapped is error:
            raise
        raise unwrapped from None
    except ValueError as error:  # what from_generator says when nothing was generated
        if "corresponds to no data" not in str(error):
            raise
        raise empty from None
    if len(ds) == 0:
        raise empty
    return ds


def _tokenize_batch(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    src_ids = tokenizer.encode(batch["src_text"])
    tgt_ids = tokenizer.encode(batch["tgt_text"])
    return {
        "src_ids": src_ids,
        "tgt_ids": tgt_ids,
        # Tensor lengths: pieces + eos for src, bos + pieces (or pieces + eos) for tgt.
        "src_len": [len(ids) + 1 for ids in src_ids],
        "tgt_len": [len(ids) + 1 for ids in tgt_ids],
    }


def tokenize_pairs(
    pairs: datasets.Dataset, tokenizer: Tokenizer, cache_dir: str | Path
) -> datasets.Dataset:
    """Add ``src_ids``, ``tgt_ids`` (pieces, no specials) and ``src_len``, ``tgt_len``.

    The lengths are those of the model's tensors (pieces + 1 for ``eos``/``bos``). Cached
    under ``cache_dir``, keyed on the pairs and the tokenizer's bytes: a new tokenizer
    re-tokenises.
    """
    key = _hash(CACHE_VERSION, pairs._fingerprint, tokenizer.fingerprint)
    return pairs.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer},
        features=TOKEN_FEATURES,
        cache_file_name=str(Path(cache_dir) / f"tokens-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc="Tokenizing",
    )


@dataclass
class FilterStats:
    """How many pairs a filter saw, kept and dropped, and why."""

    total: int = 0
    kept: int = 0
    empty: int = 0
    too_long: int = 0
    bad_ratio: int = 0


def filter_pairs(
    tokens: datasets.Dataset,
    max_len: int | None = None,
    max_len_ratio: float | None = None,
    limit: int | None = None,
    name: str = "data",
) -> tuple[datasets.Dataset, FilterStats]:
    """Drop pairs with an empty side, then too long ones, then badly proportioned ones.

    Each count is logged. Lengths are tensor lengths (pieces + 1).

    Args:
        tokens: Output of :func:`tokenize_pairs`.
        max_len: Most tokens on either side, or None for no limit.
        max_len_ratio: Most ``longer / shorter`` side ratio, or None for no limit.
        limit: Keep only the first ``limit`` pairs left (e.g. a smaller validation set).
        name: For the log line.

    Raises:
        DataError: No pair is left.
    """
    lengths = tokens.with_format("numpy", columns=["src_len", "tgt_len"])[:]
    src, tgt = lengths["src_len"].astype(np.int64), lengths["tgt_len"].astype(np.int64)
    stats = FilterStats(total=len(src))
    keep = (src > 1) & (tgt > 1)
    stats.empty = int((~keep).sum())
    if max_len is not None:
        long = keep & ((src > max_len) | (tgt > max_len))
        stats.too_long = int(long.sum())
        keep &= ~long
    if max_len_ratio is not None:
        ratio = np.maximum(src, tgt) / np.minimum(src, tgt)
        bad = keep & (ratio > max_len_ratio)
        stats.bad_ratio = int(bad.sum())
        keep &= ~bad
    indices = np.flatnonzero(keep)
    if limit is not None:
        indices = indices[:limit]
    stats.kept = len(indices)
    dropped = [f"{stats.empty} with an empty side"]
    if max_len is not None:
        dropped.append(f"{stats.too_long} longer than {max_len} tokens")
    if max_len_ratio is not None:
        dropped.append(f"{stats.bad_ratio} with a length ratio above {max_len_ratio}")
    log.info("%s: kept %d of %d pairs; dropped %s", name, stats.kept, stats.total,
             ", ".join(dropped))
    if stats.kept == 0:
        raise DataError(f"{name}: no sentence pairs left after filtering ({stats})")
    if stats.kept == stats.total:
        return tokens, stats
    key = _hash(tokens._fingerprint, max_len, max_len_ratio, limit)
    return tokens.select(indices, new_fingerprint=key, keep_in_memory=True), stats


# ----------------------------------------------------------------------------------------------
# Token-bounded batches


def _greedy_batches(
    order: np.ndarray, src: np.ndarray, tgt: np.ndarray, max_tokens: int
) -> list[np.ndarray]:
    """Cut ``order`` into consecutive batches with ``size * longest <= max_tokens`` per side."""
    batches, start, longest_src, longest_tgt = [], 0, 0, 0
    src_list, tgt_list = src[order].tolist(), tgt[order].tolist()
    for i, (s, t) in enumerate(zip(src_list, tgt_list, strict=True)):
        new_src, new_tgt = max(longest_src, s), max(longest_tgt, t)
        size = i - start + 1
        if size > 1 and (size * new_src > max_tokens or size * new_tgt > max_tokens):
            batches.append(order[start:i])
            start, new_src, new_tgt = i, s, t
        longest_src, longest_tgt = new_src, new_tgt
    if start < len(order):
        batches.append(order[start:])
    return batches


def _by_length(indices: np.ndarray, src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """Sort by the longer side, then target, then source length; stable, so ties keep order.

    The budget binds on the longer side: on the bundled corpus this key needs ~10% fewer
    batches and pads less than sorting by target then source (fairseq's key).
    """
    s, t = src[indices], tgt[indices]
    return indices[np.lexsort((s, t, np.maximum(s, t)))]


class TokenBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches bounded by a token budget, sharded over ranks, resumable.

    **Budget.** On each side, ``batch_size * longest_length <= max_tokens``: padding counts. An
    example longer than ``max_tokens`` on its own forms a one-example batch (logged);
    :class:`TranslationDataModule` filters such examples out before, so there it never happens.

    **Buckets.** Fairseq-style: the examples are shuffled (by ``seed``), cut into pools of
    ``pool_size``, sorted by length (the longer side first) within each pool and cut greedily
    into batches. The batches are made once, so their number is the same every epoch
    (Lightning counts them once per run); each epoch shuffles their order, deterministically
    for ``(seed, epoch)``. With ``shuffle=False`` the whole set is sorted by length and the
    order never changes.

    **Ranks.** Rank ``r`` of ``R`` takes batches ``r, r + R, ...`` of the epoch's order, so the
    ranks' batches are disjoint. When the number of batches does not divide by ``R``, the list
    is padded by wrapping around to its start (the first few batches are seen twice), so every
    rank gets the same number of batches (Lightning hangs otherwise); ``drop_last=True`` drops
    the remainder instead. On one process every example is in exactly one batch per epoch.

    **Resuming.** :meth:`load_state_dict` with ``{"epoch", "consumed"}`` (batches of the epoch
    already consumed, all ranks together) makes the next iteration yield exactly the rest of
    that epoch. :class:`BatchLoader` records the state as the training loop takes batches.

    Args:
        src_lengths: Source tensor length of each example.
        tgt_lengths: Target tensor length of each example.
        max_tokens: Token budget per batch and side, padding included.
        shuffle: Shuffle pools and batch order (training) or sort once (evaluation).
        seed: Seed of the shuffles.
        num_replicas: Number of ranks (world size).
        rank: This process's rank.
        drop_last: Drop the batches that do not divide among the ranks, instead of repeating.
        pool_size: Examples per sorting pool when shuffling.
    """

    def __init__(
        self,
        src_lengths: Sequence[int] | np.ndarray,
        tgt_lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        pool_size: int = 100_000,
    ):
        src = np.asarray(src_lengths, dtype=np.int64)
        tgt = np.asarray(tgt_lengths, dtype=np.int64)
        if src.shape != tgt.shape or src.ndim != 1:
            raise ConfigError(f"src and tgt lengths differ in shape: {src.shape} vs {tgt.shape}")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.pool_size = pool_size
        self.epoch = 0
        self.resume_offset = 0  # global batches of `epoch` to skip on the next iteration
        self.batches = self._make_batches(src, tgt)
        oversized = sum(
            1 for b in self.batches if len(b) == 1 and max(src[b[0]], tgt[b[0]]) > max_tokens
        )
        if oversized:
            log.warning("%d examples are longer than max_tokens=%d; each forms its own batch",
                        oversized, max_tokens)

    def _make_batches(self, src: np.ndarray, tgt: np.ndarray) -> list[np.ndarray]:
        if not self.shuffle:
            return _greedy_batches(_by_length(np.arange(len(src)), src, tgt), src, tgt,
                                   self.max_tokens)
        shuffled = np.random.default_rng(self.seed).permutation(len(src))
        batches = []
        for start in range(0, len(shuffled), self.pool_size):
            pool = _by_length(shuffled[start : start + self.pool_size], src, tgt)
            batches.extend(_greedy_batches(pool, src, tgt, self.max_tokens))
        return batches

    @property
    def batches_per_epoch(self) -> int:
        """Batches of one epoch over all ranks, before padding or dropping."""
        return len(self.batches)

    def _epoch_total(self) -> int:
        """Global batches an epoch really consumes (padded or dropped to a multiple of ranks)."""
        n, r = len(self.batches), self.num_replicas
        return n // r * r if self.drop_last else n

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's batch order; a pending resume offset only holds for its epoch."""
        if epoch != self.epoch:
            self.resume_offset = 0
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into ``self.batches`` in the order of ``epoch`` (all ranks)."""
        if not self.shuffle:
            return np.arange(len(self.batches))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))

    def rank_batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches of ``epoch``, skipping the first ``start`` global batches."""
        order = self.epoch_order(epoch)
        n, r = len(order), self.num_replicas
        rest = order[start:]
        if self.drop_last:
            rest = rest[: len(rest) // r * r]
        elif n and len(rest) % r:
            # Wrap around to the epoch's first batches: the padding is then the same whether
            # the epoch runs in one go or resumes after `start` (start is a multiple of r).
            pad = order[np.arange(r - len(rest) % r) % n]
            rest = np.concatenate([rest, pad])
        return [self.batches[i].tolist() for i in rest[self.rank :: r]]

    def __len__(self) -> int:
        """This rank's batches in a whole epoch (the same on every rank)."""
        n, r = len(self.batches), self.num_replicas
        return n // r if self.drop_last else math.ceil(n / r)

    def __iter__(self) -> Iterator[list[int]]:
        start, self.resume_offset = self.resume_offset, 0
        yield from self.rank_batches(self.epoch, start)

    def state_dict(self) -> dict[str, int]:
        """Where the next iteration starts: ``epoch`` and global batches ``consumed``."""
        return {"epoch": self.epoch, "consumed": self.resume_offset, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["epoch"]`` after ``state["consumed"]`` global batches.

        A finished epoch resumes at the start of the next one. ``consumed`` counts all ranks,
        so a run may even resume on another number of ranks.
        """
        if state.get("seed", self.seed) != self.seed:
            log.warning("resuming with seed %s, the checkpoint used %s: the epoch order differs",
                        self.seed, state["seed"])
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= self._epoch_total():
            epoch, consumed = epoch + 1, 0
        # Round down to whole steps of all ranks, so ranks stay in lockstep.
        self.epoch, self.resume_offset = epoch, consumed // self.num_replicas * self.num_replicas


def collate(
    examples: list[dict[str, Any]],
    pad_id: int = PAD_ID,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    with_text: bool = False,
) -> dict[str, Any]:
    """Build the batch dict of docs/CONTRACTS.md from examples with ``src_ids``/``tgt_ids``.

    ``src`` = pieces + eos, ``tgt_in`` = bos + pieces, ``tgt_out`` = pieces + eos, each
    right-padded with ``pad_id`` to the longest in the batch. ``with_text`` adds the raw
    ``src_text`` and ``ref_text`` (the target sentences) for BLEU.
    """
    src = [list(ex["src_ids"]) + [eos_id] for ex in examples]
    tgt_in = [[bos_id] + list(ex["tgt_ids"]) for ex in examples]
    tgt_out = [list(ex["tgt_ids"]) + [eos_id] for ex in examples]
    batch: dict[str, Any] = {
        "src": _pad(src, pad_id),
        "tgt_in": _pad(tgt_in, pad_id),
        "tgt_out": _pad(tgt_out, pad_id),
    }
    if with_text:
        batch["src_text"] = [ex["src_text"] for ex in examples]
        batch["ref_text"] = [ex["tgt_text"] for ex in examples]
    return batch


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class BatchLoader:
    """Iterates a dataset in the batches of a :class:`TokenBatchSampler`; checkpointable.

    Not a ``DataLoader`` subclass on purpose: Lightning then leaves it alone under DDP (it
    would otherwise try to swap in a ``DistributedSampler``, which cannot express token
    batches). It has ``state_dict``/``load_state_dict``, so Lightning saves its state in
    checkpoints and restores it before iterating (``_Stateful`` in ``combined_loader.py``). The
    count is of batches handed to the training loop, not of those workers have prefetched.
    ``sampler`` is the batch sampler, where Lightning looks for ``set_epoch`` each epoch.

    Args:
        dataset: Anything indexable by the sampler's indices (a ``datasets.Dataset``).
        batch_sampler: The token batch sampler.
        collate_fn: Examples -> batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches for faster copies to the GPU.
    """

    def __init__(
        self,
        dataset: Any,
        batch_sampler: TokenBatchSampler,
        collate_fn: Any = collate,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self._loader = DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        self._epoch = batch_sampler.epoch
        self._consumed = batch_sampler.resume_offset

    @property
    def sampler(self) -> TokenBatchSampler:
        """The batch sampler: Lightning calls ``dataloader.sampler.set_epoch(epoch)``."""
        return self.batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator: this runs at the first next(), after Lightning's set_epoch.
        sampler = self.batch_sampler
        self._epoch, self._consumed = sampler.epoch, sampler.resume_offset
        for batch in self._loader:
            self._consumed += sampler.num_replicas
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``epoch`` and global batches ``consumed`` so far (all ranks in lockstep)."""
        return {"epoch": self._epoch, "consumed": self._consumed, "seed": self.batch_sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration yield the rest of the saved epoch."""
        self.batch_sampler.load_state_dict(state)
        self._epoch = self.batch_sampler.epoch
        self._consumed = self.batch_sampler.resume_offset


# ----------------------------------------------------------------------------------------------
# Lightning data module


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


class TranslationDataModule(L.LightningDataModule):
    """Parallel data for training and validation, with its SentencePiece tokenizer.

    The tokenizer is ready right after construction (``self.tokenizer``, ``self.vocab_size``)
    so that a LightningCLI can link ``data.vocab_size`` into the model config: it is loaded from
    ``tokenizer_path``, or else trained on the training corpus (both sides) and written to
    ``work_dir/spm.model``. A model already there that was trained on the same data and
    settings is reused (``work_dir/spm.train.json`` records them). Under DDP only local rank 0
    trains; the other ranks wait for the file.

    Args:
        train: Training corpus spec (see the module docstring), e.g. ``data/en-ro/train/train``.
        valid: Validation corpus spec, e.g. ``data/en-ro/dev/newsdev2016``.
        test: Optional test corpus spec.
        src_lang: Source language code (a file suffix / JSON key), e.g. ``en``.
        tgt_lang: Target language code; swap the two for the other direction.
        format: Corpus format, ``auto`` to guess from each spec, or one of ``text``, ``tsv``,
            ``jsonl``, ``json``, ``parquet``, ``disk``, ``hf``.
        tokenizer_path: An existing SentencePiece ``.model`` (ids pad=0 unk=1 bos=2 eos=3) to
            use instead of training one.
        vocab_size: Vocabulary size of a trained tokenizer.
        spm_model_type: SentencePiece model type: ``unigram`` or ``bpe`` (or ``char``, ``word``).
        character_coverage: SentencePiece character coverage; Romanian letters always kept.
        normalize_romanian: Map cedilla ş ţ to comma-below ș ț (in the trained tokenizer).
        max_tokens: Training tokens per batch and side, padding included.
        valid_max_tokens: The same for validation/test batches (default ``max_tokens``).
        max_len: Most tokens per side of a training pair (pieces + eos); longer pairs dropped.
        max_len_ratio: Most ``longer / shorter`` length ratio of a training pair.
        valid_size: Use only the first N validation pairs (None: all).
        origins: Keep only training lines whose ``.origin`` tag is listed (None: all).
        seed: Seed of tokenizer training and of batch shuffling.
        num_workers: DataLoader worker processes.
        cache_dir: Where Arrow caches go (default ``~/.cache/seq2seq_diff``).
        work_dir: Where a trained ``spm.model`` is written.
    """

    def __init__(
        self,
        train: str,
        valid: str,
        test: str | None = None,
        src_lang: str = "en",
        tgt_lang: str = "ro",
        format: str = "auto",
        tokenizer_path: str | None = None,
        vocab_size: int = 8000,
        spm_model_type: str = "unigram",
        character_coverage: float = 1.0,
        normalize_romanian: bool = True,
        max_tokens: int = 4096,
        valid_max_tokens: int | None = None,
        max_len: int = 256,
        max_len_ratio: float = 3.0,
        valid_size: int | None = None,
        origins: list[str] | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        work_dir: str = "runs/data",
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_config(self.hparams)
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "seq2seq_diff").expanduser()
        self.work_dir = Path(work_dir)
        self.train_source = resolve_source(train, src_lang, tgt_lang, format)
        self.tokenizer = self._prepare_tokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.datasets: dict[str, datasets.Dataset] = {}
        self.stats: dict[str, FilterStats] = {}

    # -- tokenizer --------------------------------------------------------------------------

    def _tokenizer_settings(self) -> dict[str, Any]:
        h = self.hparams
        return {
            "version": CACHE_VERSION,
            "data": self.train_source.fingerprint(),
            "langs": [h.src_lang, h.tgt_lang],
            "origins": sorted(h.origins) if h.origins else None,
            "vocab_size": h.vocab_size,
            "model_type": h.spm_model_type,
            "character_coverage": h.character_coverage,
            "normalize_romanian": h.normalize_romanian,
            "seed": h.seed,
        }

    def _prepare_tokenizer(self) -> Tokenizer:
        h = self.hparams
        if h.tokenizer_path:
            if not Path(h.tokenizer_path).exists():
                raise ConfigError(f"tokenizer_path {h.tokenizer_path} does not exist")
            tokenizer = Tokenizer.load(h.tokenizer_path)
            if tokenizer.normalize_romanian != h.normalize_romanian:
                log.warning("%s has normalize_romanian=%s (built into the model); the setting "
                            "%s is ignored", h.tokenizer_path, tokenizer.normalize_romanian,
                            h.normalize_romanian)
            if tokenizer.vocab_size != h.vocab_size:
                log.info("tokenizer %s has %d pieces (vocab_size=%d ignored)",
                         h.tokenizer_path, tokenizer.vocab_size, h.vocab_size)
            return tokenizer
        model_path = self.work_dir / "spm.model"
        record_path = self.work_dir / "spm.train.json"
        settings = self._tokenizer_settings()
        if _record_matches(record_path, model_path, settings):
            log.info("reusing %s (trained on the same data and settings)", model_path)
            return Tokenizer.load(model_path)
        if _local_rank() != 0:
            return _wait_for_tokenizer(record_path, model_path, settings)
        if model_path.exists():
            log.warning("%s was trained on other data or settings; training a new one",
                        model_path)
        record_path.unlink(missing_ok=True)
        texts = (
            text
            for pair in iter_pairs(self.train_source, h.src_lang, h.tgt_lang, h.origins,
                                   self.cache_dir)
            for text in pair
        )
        tokenizer = train_tokenizer(
            texts,
            model_path,
            h.vocab_size,
            model_type=h.spm_model_type,
            character_coverage=h.character_coverage,
            normalize_romanian=h.normalize_romanian,
            seed=h.seed,
        )
        # Written after the model: a waiting rank that sees a matching record finds the model.
        _write_json(record_path, settings)
        return tokenizer

    # -- datasets ---------------------------------------------------------------------------

    def _build(self, split: str) -> datasets.Dataset:
        h = self.hparams
        train = split == "train"
        spec = {"train": h.train, "valid": h.valid, "test": h.test}[split]
        source = self.train_source if train else resolve_source(
            spec, h.src_lang, h.tgt_lang, h.format
        )
        pairs = load_pairs(source, h.src_lang, h.tgt_lang, self.cache_dir,
                           h.origins if train else None)
        tokens = tokenize_pairs(pairs, self.tokenizer, self.cache_dir / "tokens")
        ds, stats = filter_pairs(
            tokens,
            max_len=h.max_len if train else None,
            max_len_ratio=h.max_len_ratio if train else None,
            limit=h.valid_size if split == "valid" else None,
            name=f"{split} ({spec})",
        )
        self.stats[split] = stats
        columns = ["src_ids", "tgt_ids"] + ([] if train else ["src_text", "tgt_text"])
        return ds.select_columns(columns + ["src_len", "tgt_len"])

    def _splits(self, stage: str | None) -> list[str]:
        splits = {"fit": ["train", "valid"], "validate": ["valid"], "test": ["test"]}
        wanted = splits.get(stage or "", ["train", "valid", "test"])
        return [s for s in wanted if s != "test" or self.hparams.test]

    def prepare_data(self) -> None:
        """Build the caches once (Lightning calls this on local rank 0 before ``setup``)."""
        for split in self._splits(None):
            self._build(split)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenised, filtered datasets of ``stage`` (from the cache when built)."""
        for split in self._splits(stage):
            if split not in self.datasets:
                self.datasets[split] = self._build(split)

    # -- loaders ----------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, split: str, shuffle: bool) -> BatchLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "valid": "validate", "test": "test"}[split])
        ds = self.datasets[split]
        lengths = ds.with_format("numpy", columns=["src_len", "tgt_len"])[:]
        world, rank = self._world()
        h = self.hparams
        max_tokens = h.max_tokens if split == "train" else (h.valid_max_tokens or h.max_tokens)
        sampler = TokenBatchSampler(
            lengths["src_len"], lengths["tgt_len"], max_tokens, shuffle=shuffle, seed=h.seed,
            num_replicas=world, rank=rank,
        )
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        fn = functools.partial(collate, with_text=split != "train")
        return BatchLoader(ds.with_format(None), sampler, fn, num_workers=h.num_workers,
                           pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> BatchLoader:
        """Shuffled token batches, this rank's share, resumable mid-epoch."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> BatchLoader:
        """Length-sorted validation batches with ``src_text``/``ref_text``; fixed order."""
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> BatchLoader:
        """Like :meth:`val_dataloader`, on ``test``."""
        if not self.hparams.test:
            raise ConfigError("no test corpus: set data.test")
        return self._loader("test", shuffle=False)


def _check_config(h: Any) -> None:
    if h.src_lang == h.tgt_lang:
        raise ConfigError(f"src_lang and tgt_lang are both {h.src_lang!r}")
    if h.format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {h.format!r}")
    if h.max_len < 2:
        raise ConfigError(f"max_len must be at least 2, got {h.max_len}")
    if h.max_tokens < h.max_len:
        raise ConfigError(
            f"max_tokens={h.max_tokens} is below max_len={h.max_len}: a batch must hold the "
            "longest example; raise max_tokens or lower max_len"
        )
    if h.valid_max_tokens is not None and h.valid_max_tokens < 1:
        raise ConfigError(f"valid_max_tokens must be positive, got {h.valid_max_tokens}")
    if h.max_len_ratio < 1:
        raise ConfigError(f"max_len_ratio must be at least 1, got {h.max_len_ratio}")
    if h.valid_size is not None and h.valid_size < 1:
        raise ConfigError(f"valid_size must be positive or null, got {h.valid_size}")
    if h.num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {h.num_workers}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _record_matches(record_path: Path, model_path: Path, settings: dict[str, Any]) -> bool:
    if not (record_path.is_file() and model_path.is_file()):
        return False
    try:
        return json.loads(record_path.read_text()) == settings
    except (OSError, json.JSONDecodeError):
        return False


def _wait_for_tokenizer(
    record_path: Path, model_path: Path, settings: dict[str, Any], timeout_s: float = 3600.0
) -> Tokenizer:
    log.info("waiting for local rank 0 to train %s", model_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _record_matches(record_path, model_path, settings):
            return Tokenizer.load(model_path)
        time.sleep(2.0)
    raise ModelDirError(f"timed out waiting for rank 0 to write {model_path}")
