"""A joint SentencePiece vocabulary shared by source and target.

Special ids are fixed for the whole package (docs/CONTRACTS.md): ``pad=0, unk=1, bos=2, eos=3``.
``encode`` returns bare pieces; the data pipeline adds ``eos``/``bos``.

Romanian is written with comma-below ș ț, but much text still uses the older cedilla forms ş ţ
(Unicode treats them as different letters, so NFKC leaves them alone). With
``normalize_romanian=True`` the mapping ş→ș, ţ→ț (and capitals) is compiled into the model's own
SentencePiece normalisation rules, on top of the default ``nmt_nfkc`` rules. It therefore applies
to the training text and to every later ``encode``, and the ``.model`` file alone carries it: no
sidecar file, and any SentencePiece runtime loading ``spm.model`` normalises the same way.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from seq2seq_diff.errors import ConfigError, DataError, ModelDirError

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe", "char", "word")
# Always in the character set, whatever character_coverage drops.
ROMANIAN_CHARS = "ăâîșțĂÂÎȘȚ"
_CEDILLA_TO_COMMA = str.maketrans("şţŞŢ", "șțȘȚ")
# SentencePiece's own message when the corpus has fewer distinct pieces than asked for.
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def normalize_romanian_text(text: str) -> str:
    """Map cedilla ş ţ Ş Ţ to comma-below ș ț Ș Ț (the correct Romanian letters)."""
    return text.translate(_CEDILLA_TO_COMMA)


class Tokenizer:
    """A trained SentencePiece model with the package's fixed special ids.

    Build one with :func:`train_tokenizer` or :meth:`Tokenizer.load`.

    Args:
        model_proto: The serialised SentencePiece model (the bytes of a ``.model`` file).
        source: Where it came from, for error messages.

    Raises:
        ModelDirError: The bytes are not a SentencePiece model, or its special ids differ from
            ``pad=0, unk=1, bos=2, eos=3``.
    """

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self._proto = bytes(model_proto)
        self._source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except (RuntimeError, OSError) as error:
            raise ModelDirError(
                f"{source} is not a valid SentencePiece model ({error}); retrain it with "
                "train_tokenizer or point to the spm.model of a model directory"
            ) from None
        self._check_special_ids()

    def _check_special_ids(self) -> None:
        found = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ModelDirError(
                f"{self._source} has special ids pad/unk/bos/eos={found}, expected "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train it with seq2seq_diff's train_tokenizer"
            )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``.model`` file (or the ``spm.model`` inside a directory).

        Raises:
            ModelDirError: The file is missing or is not a usable SentencePiece model.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "spm.model"
        if not path.is_file():
            raise ModelDirError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the model to ``path`` atomically (a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, self._proto)
        return path

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def normalize_romanian(self) -> bool:
        """Whether the model's normalisation maps cedilla ş ţ to comma-below ș ț."""
        return "ș" in self._sp.normalize("ş")

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model bytes: a cache key that changes whenever the model does."""
        return hashlib.sha256(self._proto).hexdigest()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode a batch of sentences to piece ids, without bos/eos."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of sentences; wrap a single one as [text]")
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Decode a batch of id sequences; pad, bos and eos are dropped wherever they occur."""
        drop = {PAD_ID, BOS_ID, EOS_ID}
        size = self.vocab_size
        rows = []
        for row in ids:
            kept = [int(i) for i in row if int(i) not in drop]
            bad = [i for i in kept if not 0 <= i < size]
            if bad:
                raise ValueError(f"id {bad[0]} is outside the vocabulary (size {size})")
            rows.append(kept)
        return self._sp.decode(rows)

    def id_to_piece(self, piece_id: int) -> str:
        """The piece string of an id, for inspection."""
        return self._sp.id_to_piece(int(piece_id))

    def pieces(self, text: str) -> list[str]:
        """The pieces of one sentence, for inspection."""
        return self._sp.encode(text, out_type=str)

    def __getstate__(self) -> dict:
        return {"model_proto": self._proto, "source": self._source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer({self._source!r}, vocab_size={self.vocab_size})"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_text_files(files: Sequence[str | Path]) -> Iterator[str]:
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise DataError("file not found", path)
        try:
            with path.open(encoding="utf-8-sig") as f:
                yield from f
        except UnicodeDecodeError as error:
            raise DataError(f"not valid UTF-8 ({error.reason})", path) from None


def _training_sentences(texts: Iterable[str], normalize: bool, counter: list[int]) -> Iterator[str]:
    for text in texts:
        text = text.strip()
        if not text:
            continue
        counter[0] += 1
        # The compiled rules normalise too; doing it here as well keeps the text SentencePiece
        # samples and counts characters on identical to what encode will see.
        yield normalize_romanian_text(text) if normalize else text


@functools.cache  # compiling the 225k rules takes a second or two
def _romanian_normalizer() -> spm.SentencePieceNormalizer:
    """``nmt_nfkc`` rules plus cedilla → comma-below, compiled for the trainer."""
    if not hasattr(spm.SentencePieceNormalizer, "Decompile"):
        raise ConfigError(
            "normalize_romanian needs sentencepiece>=0.2.3 (normalisation rules from a map); "
            "upgrade it or set normalize_romanian=False"
        )
    rules = dict(spm.SentencePieceNormalizer(rule_name="nmt_nfkc").Decompile())
    # Rewrite every output (e.g. NFKC composes "s" + U+0327 into "ş") and add the bare letters.
    rules = {src: normalize_romanian_text(dst) for src, dst in rules.items()}
    for char in "şţŞŢ":
        rules[char] = normalize_romanian_text(char)
    return spm.SentencePieceNormalizer(norm_map=sorted(rules.items()))


def _vocab_error(error: RuntimeError, vocab_size: int) -> ConfigError | None:
    message = str(error)
    if match := _TOO_HIGH.search(message):
        limit = int(match.group(2))
        return ConfigError(
            f"vocab_size={vocab_size} is too large for this training text (at most {limit}); "
            f"use a smaller vocab_size such as {max(limit // 100 * 100, 100)}, or more text"
        )
    if match := _TOO_LOW.search(message):
        return ConfigError(
            f"vocab_size={vocab_size} is too small: the characters and special pieces alone "
            f"need {match.group(2)}; use a larger vocab_size or a lower character_coverage"
        )
    return None


def train_tokenizer(
    texts: Iterable[str] | None,
    model_path: str | Path,
    vocab_size: int,
    *,
    files: Sequence[str | Path] = (),
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    normalize_romanian: bool = True,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 4,
) -> Tokenizer:
    """Train a joint SentencePiece model on source and target text and save it.

    Sentences stream to SentencePiece (``sentence_iterator``), which keeps a random sample of
    at most ``input_sentence_size`` of them, so a large corpus never has to fit in memory first.
    Empty lines are skipped. SentencePiece's own logging is silenced; progress goes to ``logging``.

    Args:
        texts: Sentences of both languages, in any order (or None when ``files`` are given).
        model_path: Where to write the ``.model`` file (written atomically).
        vocab_size: Number of pieces, the 4 special ids included.
        files: UTF-8 text files, one sentence per line, read after ``texts``.
        model_type: ``unigram`` (default), ``bpe``, ``char`` or ``word``.
        character_coverage: Share of characters to cover; Romanian letters are always kept.
        normalize_romanian: Map cedilla ş ţ to comma-below ș ț, in training and in ``encode``.
        input_sentence_size: Most sentences SentencePiece samples for training.
        seed: Seed of SentencePiece's sampling. The same text, seed and ``num_threads`` give
            the same model, byte for byte.
        num_threads: Trainer threads. The unigram trainer's result depends on it (its EM sums
            run per thread), so it is a fixed number rather than the machine's core count.

    Returns:
        The trained tokenizer, already saved at ``model_path``.

    Raises:
        ConfigError: A bad option, or a vocab_size the text cannot support (with a suggestion).
        DataError: A file in ``files`` is missing or not UTF-8.
    """
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"spm model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if not 0.9 <= character_coverage <= 1.0:
        raise ConfigError(f"character_coverage must be in [0.9, 1], got {character_coverage}")
    if vocab_size < 8:
        raise ConfigError(f"vocab_size must be at least 8, got {vocab_size}")
    counter = [0]
    stream = _chain(texts or (), _read_text_files(files))
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        required_chars=ROMANIAN_CHARS,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=num_threads,
        minloglevel=2,
    )
    spm.set_min_log_level(2)  # SentencePiece's INFO lines go straight to stderr otherwise
    if normalize_romanian:
        options["normalizer"] = _romanian_normalizer()
    log.info("training a %s SentencePiece model, vocab_size=%d", model_type, vocab_size)
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    sentences = _Guarded(_training_sentences(stream, normalize_romanian, counter))
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=writer, **options)
    except RuntimeError as error:
        if sentences.error is not None:  # SentencePiece wraps our DataError in a RuntimeError
            raise sentences.error from None
        if counter[0] == 0:
            raise ConfigError("no text to train the tokenizer on (all lines empty)") from None
        friendly = _vocab_error(error, vocab_size)
        if friendly is not None:
            raise friendly from None
        raise
    log.info("trained the tokenizer on %d sentences", counter[0])
    tokenizer = Tokenizer(writer.getvalue(), source=str(model_path))
    tokenizer.save(model_path)
    return tokenizer


class _Guarded:
    """An iterator that keeps the exception it raised, which SentencePiece would flatten."""

    def __init__(self, iterator: Iterator[str]):
        self._iterator = iterator
        self.error: BaseException | None = None

    def __iter__(self) -> _Guarded:
        return self

    def __next__(self) -> str:
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except Exception as error:
            self.error = error
            raise


def _chain(*iterables: Iterable[str]) -> Iterator[str]:
    for iterable in iterables:
        yield from iterable
