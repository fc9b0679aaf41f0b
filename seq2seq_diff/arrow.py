"""Arrow datasets: pairs -> cached, tokenised, filtered.

``load_pairs`` puts the pairs of a :class:`~seq2seq_diff.corpus.Source` in an Arrow-backed
``datasets.Dataset`` on disk, ``tokenize_pairs`` adds piece ids (cached, keyed on the data and the
tokenizer), ``filter_pairs`` drops empty, too long and badly proportioned pairs (counted and
logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from seq2seq_diff.corpus import (
    Source,
    _check_columns,
    _check_origins,
    _hash,
    _load_hf,
    iter_pairs,
    pair_from_record,
)
from seq2seq_diff.errors import ConfigError, DataError
from seq2seq_diff.tokenizer import Tokenizer

log = logging.getLogger(__name__)

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


def _context_batch(batch: dict[str, list], indices: list[int], tokens: datasets.Dataset,
                   context: int, sep_id: int) -> dict[str, list]:
    start = max(0, indices[0] - context)
    window = tokens[start : indices[0]]["src_ids"] + batch["src_ids"]  # rows before + this batch
    offset = indices[0] - start
    src_ids = []
    for n, ids in enumerate(batch["src_ids"]):
        position = offset + n
        previous = window[max(0, position - context) : position]
        src_ids.append([t for prev in previous for t in (*prev, sep_id)] + list(ids))
    return {"src_ids": src_ids, "src_len": [len(ids) + 1 for ids in src_ids]}


def add_context(tokens: datasets.Dataset, context: int, sep_id: int, cache_dir: str | Path,
                ) -> datasets.Dataset:
    """Prepend to each source the ``context`` previous sources, each closed by ``sep_id``.

    Document-context training (concatenation, Tiedemann & Scherrer 2017, "2-to-1"): the corpus
    is read as consecutive segments of documents in file order (the bundled GIMP lines are in
    page order), so segment i is translated with segments i-k..i-1 before it; the target is
    unchanged. Rows near the start get fewer. Run before :func:`filter_pairs`, so ``max_len``
    bounds the source with its context. Cached under ``cache_dir``.
    """
    if context <= 0:
        return tokens
    key = _hash(CACHE_VERSION, tokens._fingerprint, "context", context, sep_id)
    return tokens.map(
        _context_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"tokens": tokens, "context": context, "sep_id": sep_id},
        features=tokens.features,
        cache_file_name=str(Path(cache_dir) / f"context-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc="Adding context",
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
