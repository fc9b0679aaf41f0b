"""The Lightning data module: parallel data for training and validation, and its tokenizer.

``TranslationDataModule`` wires up the pieces for Lightning: corpus specs and readers
(:mod:`seq2seq_diff.corpus`), cached, tokenised and filtered Arrow datasets
(:mod:`seq2seq_diff.arrow`) and token-bounded, resumable batches (:mod:`seq2seq_diff.batching`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch

from seq2seq_diff.arrow import (
    CACHE_VERSION,
    FilterStats,
    add_context,
    filter_pairs,
    load_pairs,
    tokenize_pairs,
)
from seq2seq_diff.batching import BatchLoader, TokenBatchSampler, collate
from seq2seq_diff.corpus import FORMATS, iter_pairs, resolve_source
from seq2seq_diff.errors import ConfigError, ModelDirError
from seq2seq_diff.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)


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
        train: Training corpus spec (see :mod:`seq2seq_diff.corpus`), e.g.
            ``data/en-ro/train/train``.
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
        context: Document-context training: each source gets the previous ``context``
            segments of its corpus (file order), each closed by eos
            (:func:`seq2seq_diff.arrow.add_context`); 0 = sentence-level.
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
        context: int = 0,
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
        # After the per-pair filters: max_len and the length ratio are about the pair itself.
        ds = add_context(ds, h.context, self.tokenizer.eos_id, self.cache_dir / "tokens")
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
    if h.context < 0:
        raise ConfigError(f"context must be >= 0 segments, got {h.context}")


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
