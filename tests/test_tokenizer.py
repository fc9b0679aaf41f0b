"""Tokenizer: fixed special ids, Romanian round trips, ş/ţ normalisation, determinism, errors."""

import io
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm

from seq2seq_diff.errors import ConfigError, ModelDirError
from seq2seq_diff.tokenizer import Tokenizer, normalize_romanian_text, train_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "en-ro"
ROMANIAN = [
    "Știința și țara în această încăpere.",
    "ÎNCĂPEREA ȘI ȚARA ÂNCĂ",
    "Mâine vom învăța să ștergem fișierul.",
]


def _corpus(n: int = 300) -> list[str]:
    en = (DATA / "train" / "train.en").read_text(encoding="utf-8").splitlines()[:n]
    ro = (DATA / "train" / "train.ro").read_text(encoding="utf-8").splitlines()[:n]
    return en + ro + ROMANIAN


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


@pytest.fixture(scope="module")
def tok(tmp_path_factory, corpus) -> Tokenizer:
    return train_tokenizer(corpus, tmp_path_factory.mktemp("spm") / "spm.model", vocab_size=300)


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 300
    assert [tok._sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = tok.encode(["A man is dancing.", "Un bărbat dansează."])
    assert all(i not in (0, 2, 3) for row in ids for i in row)  # no specials added by encode


def test_romanian_round_trip_keeps_diacritics(tok):
    ids = tok.encode(ROMANIAN)
    assert all(tok.unk_id not in row for row in ids)
    assert tok.decode(ids) == ROMANIAN


def test_decode_drops_pad_bos_eos_anywhere(tok):
    ids = tok.encode(["Un bărbat cântă la chitară."])[0]
    noisy = [2, *ids[:2], 0, *ids[2:], 3, 0, 0]
    assert tok.decode([noisy]) == tok.decode([ids]) == ["Un bărbat cântă la chitară."]


def test_cedilla_maps_to_comma_below(tok, tmp_path):
    cedilla, comma = "Ştiinţa şi ţara", "Știința și țara"
    assert normalize_romanian_text(cedilla) == comma
    assert tok.normalize_romanian
    assert tok.encode([cedilla]) == tok.encode([comma])
    assert tok.decode(tok.encode([cedilla])) == [comma]
    # The rule lives in the .model file itself: a reloaded copy behaves the same.
    loaded = Tokenizer.load(tok.save(tmp_path / "copy.model"))
    assert loaded.normalize_romanian and loaded.encode([cedilla]) == tok.encode([comma])


def test_normalisation_can_be_switched_off(tmp_path, corpus):
    plain = train_tokenizer(
        corpus + ["şi ţara"], tmp_path / "p.model", vocab_size=300, normalize_romanian=False
    )
    assert not plain.normalize_romanian
    assert plain.encode(["şi"]) != plain.encode(["și"])


def test_training_is_deterministic(tmp_path, corpus, tok):
    again = train_tokenizer(corpus, tmp_path / "again.model", vocab_size=300)
    assert again.fingerprint == tok.fingerprint
    assert (tmp_path / "again.model").read_bytes() == tok._proto


def test_files_and_texts_give_the_same_model(tmp_path, corpus, tok):
    path = tmp_path / "corpus.txt"
    path.write_text("\ufeff" + "\n".join(corpus) + "\n", encoding="utf-8")
    from_files = train_tokenizer(None, tmp_path / "f.model", vocab_size=300, files=[path])
    assert from_files.fingerprint == tok.fingerprint


def test_training_is_quiet(tmp_path, corpus, capfd):
    train_tokenizer(corpus[:200], tmp_path / "q.model", vocab_size=200, model_type="bpe")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_too_large_vocab_is_a_config_error(tmp_path, corpus):
    with pytest.raises(ConfigError, match="too large.*use a smaller vocab_size") as info:
        train_tokenizer(corpus[:50], tmp_path / "big.model", vocab_size=5000)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(corpus[:50], tmp_path / "small.model", vocab_size=20)
    with pytest.raises(ConfigError, match="model_type"):
        train_tokenizer(corpus, tmp_path / "x.model", vocab_size=300, model_type="wordpiece")


def test_load_errors(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a model at all")
    with pytest.raises(ModelDirError, match="not a valid SentencePiece model"):
        Tokenizer.load(corrupt)
    # A SentencePiece model with the library's default ids (unk=0, bos=1, eos=2, no pad).
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(100)), model_writer=writer, vocab_size=150, minloglevel=2
    )
    (tmp_path / "foreign.model").write_bytes(writer.getvalue())
    with pytest.raises(ModelDirError, match="special ids"):
        Tokenizer.load(tmp_path / "foreign.model")


def test_load_directory_pickle_and_encode_type(tok, tmp_path):
    tok.save(tmp_path / "spm.model")
    assert Tokenizer.load(tmp_path).fingerprint == tok.fingerprint
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(ROMANIAN) == tok.encode(ROMANIAN)
    with pytest.raises(TypeError):
        tok.encode("a single string")
