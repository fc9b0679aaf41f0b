"""Shared test setup: offline hub, deterministic seeds, few threads."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_PACKAGE_LOGGER = logging.getLogger("seq2seq_diff")
_PRISTINE_LOGGER = (list(_PACKAGE_LOGGER.handlers), _PACKAGE_LOGGER.propagate,
                    _PACKAGE_LOGGER.level)


@pytest.fixture(autouse=True)
def _package_logger():
    """Undo what an in-process `cli.main` call (in a test or a module fixture) does to the
    package logger (its own handler, propagate=False), so later tests' caplog sees our records."""
    yield
    _PACKAGE_LOGGER.handlers[:], _PACKAGE_LOGGER.propagate, _PACKAGE_LOGGER.level = (
        list(_PRISTINE_LOGGER[0]), *_PRISTINE_LOGGER[1:])


DATA = Path(__file__).resolve().parents[1] / "data" / "en-ro"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: thread hand-offs cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a tiny mixed corpus (data tests) ------------------------------------------------------------


@pytest.fixture(scope="session")
def lines() -> dict[str, list[str]]:
    """200 pairs: every 140th line, since the bundled corpus is grouped by origin."""
    return {lang: (DATA / "train" / f"train.{lang}").read_text(encoding="utf-8").splitlines()
            [::140][:200] for lang in ("en", "ro", "origin")}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, lines) -> Path:
    """A tiny plain-text corpus prefix: corpus.en, corpus.ro, corpus.origin."""
    root = tmp_path_factory.mktemp("corpus")
    for lang, text in lines.items():
        (root / f"corpus.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
    return root / "corpus"


@pytest.fixture(scope="session")
def tok(tmp_path_factory, lines):
    """A SentencePiece model (vocab 300) on the tiny mixed corpus."""
    from seq2seq_diff.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("spm") / "spm.model"
    return train_tokenizer(lines["en"] + lines["ro"], path, vocab_size=300)


# --- a tiny translator (search / translate tests) ------------------------------------------------


def _first_lines(lang: str, n: int = 300) -> list[str]:
    with open(DATA / "train" / f"train.{lang}", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="session")
def english() -> list[str]:
    return _first_lines("en")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, english):
    """A SentencePiece model (vocab 250) on the first 300 pairs."""
    from seq2seq_diff.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("spm250") / "spm.model"
    return train_tokenizer(english + _first_lines("ro"), path, vocab_size=250, num_threads=1)


@pytest.fixture(scope="session")
def model(tokenizer):
    """An untrained tiny model: gibberish output, but structure must hold."""
    from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, num_heads=2,
                      num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, dropout=0.0,
                      tie_embeddings=False)
    return Seq2SeqTransformer(cfg).eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, model, tokenizer) -> Path:
    from seq2seq_diff.model_dir import save_model_dir

    return save_model_dir(tmp_path_factory.mktemp("models") / "tiny", model, tokenizer)
