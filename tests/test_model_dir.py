"""Model directories: round trip, atomic replace, clear errors, checkpoint export and averaging."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from seq2seq_diff.errors import ModelDirError
from seq2seq_diff.lit_module import TranslationModule
from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer
from seq2seq_diff.model_dir import (
    average_checkpoints,
    export_checkpoint,
    find_checkpoints,
    load_model_dir,
    save_model_dir,
)
from seq2seq_diff.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "en-ro" / "train" / "train"


def _lines(suffix: str, n: int) -> list[str]:
    with open(f"{DATA}.{suffix}", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two SentencePiece models of different sizes, trained on 300 bundled pairs."""
    root = tmp_path_factory.mktemp("spm")
    texts = _lines("en", 300) + _lines("ro", 300)
    return (train_tokenizer(texts, root / "a.model", 300),
            train_tokenizer(texts, root / "b.model", 200))


@pytest.fixture
def tokenizer(tokenizers):
    return tokenizers[0]


def tiny_config(vocab_size: int, attention: str = "diff") -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=32, num_heads=2, num_encoder_layers=1,
                       num_decoder_layers=1, ffn_dim=64, dropout=0.0, attention=attention)


def logits(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    src = torch.randint(4, vocab, (3, 7), generator=g)
    src[0, 5:] = 0  # padding
    tgt = torch.randint(4, vocab, (3, 5), generator=g)
    model.eval()
    with torch.no_grad():
        return model(src, tgt)


def write_checkpoint(path: Path, tokenizer, step: int, seed: int, attention="diff") -> Path:
    """A checkpoint as TranslationModule writes it (its on_save_checkpoint adds our extras)."""
    torch.manual_seed(seed)
    module = TranslationModule(tiny_config(tokenizer.vocab_size, attention), warmup_steps=1)
    module.tokenizer = tokenizer
    checkpoint = {"state_dict": module.state_dict(), "global_step": step, "epoch": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "model.pt", weights_only=True)


def test_round_trip_gives_identical_logits(tmp_path, tokenizer):
    model = Seq2SeqTransformer(tiny_config(tokenizer.vocab_size))
    out = save_model_dir(tmp_path / "m", model, tokenizer, {"lr": 0.001, "path": tmp_path})
    assert sorted(p.name for p in out.iterdir()) == [
        "metadata.json", "model.pt", "model_config.json", "spm.model", "training_config.yaml"]
    loaded, tok = load_model_dir(out)
    assert torch.equal(logits(model), logits(loaded))
    assert not loaded.training
    assert tok.vocab_size == tokenizer.vocab_size
    assert tok.encode(["Hello world"]) == tokenizer.encode(["Hello world"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["attention"] == "diff"
    assert meta["parameters"] == model.num_parameters()
    assert meta["version"] and meta["date"]
    assert yaml.safe_load((out / "training_config.yaml").read_text())["path"] == str(tmp_path)


def test_weights_are_float32(tmp_path, tokenizer):
    model = Seq2SeqTransformer(tiny_config(tokenizer.vocab_size)).to(torch.bfloat16)
    out = save_model_dir(tmp_path / "m", model, tokenizer)
    assert all(v.dtype == torch.float32 for v in model_state(out).values())
    assert not (out / "training_config.yaml").exists()


def test_save_replaces_an_existing_dir_and_leaves_no_temp(tmp_path, tokenizer):
    first = Seq2SeqTransformer(tiny_config(tokenizer.vocab_size))
    second = Seq2SeqTransformer(tiny_config(tokenizer.vocab_size))
    save_model_dir(tmp_path / "m", first, tokenizer)
    (tmp_path / "m" / "stale.txt").write_text("from the old directory")
    save_model_dir(tmp_path / "m", second, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old dirs left
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert torch.equal(logits(load_model_dir(tmp_path / "m")[0]), logits(second))


def test_failed_save_keeps_the_old_dir(tmp_path, tokenizer):
    model = Seq2SeqTransformer(tiny_config(tokenizer.vocab_size))
    save_model_dir(tmp_path / "m", model, tokenizer)

    class Broken:
        def save(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model_dir(tmp_path / "m", model, Broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    load_model_dir(tmp_path / "m")


def test_missing_directory_and_files(tmp_path, tokenizer):
    with pytest.raises(ModelDirError, match="no such model directory"):
        load_model_dir(tmp_path / "nope")
    out = save_model_dir(tmp_path / "m", Seq2SeqTransformer(tiny_config(tokenizer.vocab_size)),
                         tokenizer)
    (out / "spm.model").unlink()
    with pytest.raises(ModelDirError, match="missing spm.model"):
        load_model_dir(out)


def test_tokenizer_size_must_match_the_embedding(tmp_path, tokenizers):
    big, small = tokenizers
    out = save_model_dir(tmp_path / "m", Seq2SeqTransformer(tiny_config(big.vocab_size)), big)
    small.save(out / "spm.model")
    with pytest.raises(ModelDirError, match="SentencePiece model has 200 pieces.*300 rows"):
        load_model_dir(out)


@pytest.mark.parametrize("saved, claimed", [("diff", "standard"), ("standard", "diff")])
def test_attention_kind_must_match_the_weights(tmp_path, tokenizer, saved, claimed):
    model = Seq2SeqTransformer(tiny_config(tokenizer.vocab_size, saved))
    out = save_model_dir(tmp_path / "m", model, tokenizer)
    values = json.loads((out / "model_config.json").read_text())
    values["attention"] = claimed
    (out / "model_config.json").write_text(json.dumps(values))
    kind = {"diff": "differential-attention", "standard": "standard-attention"}[saved]
    with pytest.raises(ModelDirError, match=f"holds a {kind} model but its config says "
                                            f"attention: {claimed}"):
        load_model_dir(out)


def test_unknown_config_key(tmp_path, tokenizer):
    out = save_model_dir(tmp_path / "m", Seq2SeqTransformer(tiny_config(tokenizer.vocab_size)),
                         tokenizer)
    values = json.loads((out / "model_config.json").read_text())
    values["num_layers_typo"] = 3
    (out / "model_config.json").write_text(json.dumps(values))
    with pytest.raises(ModelDirError, match="num_layers_typo"):
        load_model_dir(out)


def test_shape_mismatch_is_a_model_dir_error(tmp_path, tokenizer):
    out = save_model_dir(tmp_path / "m", Seq2SeqTransformer(tiny_config(tokenizer.vocab_size)),
                         tokenizer)
    values = json.loads((out / "model_config.json").read_text())
    values["ffn_dim"] = 96
    (out / "model_config.json").write_text(json.dumps(values))
    with pytest.raises(ModelDirError, match="do not match the model config"):
        load_model_dir(out)


def test_export_checkpoint(tmp_path, tokenizer):
    ckpt = write_checkpoint(tmp_path / "a.ckpt", tokenizer, step=10, seed=1)
    out = export_checkpoint(ckpt, tmp_path / "m")
    module_state = torch.load(ckpt, weights_only=False)["state_dict"]
    for key, value in model_state(out).items():
        assert torch.equal(value, module_state["model." + key])
    model, tok = load_model_dir(out)
    assert tok.vocab_size == tokenizer.vocab_size
    assert json.loads((out / "metadata.json").read_text())["global_step"] == 10


def test_export_errors(tmp_path, tokenizer):
    with pytest.raises(ModelDirError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "m")
    ckpt = write_checkpoint(tmp_path / "a.ckpt", tokenizer, step=1, seed=1)
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["seq2seq_diff"]["spm_model"] = None
    torch.save(checkpoint, ckpt)
    with pytest.raises(ModelDirError, match="no SentencePiece model"):
        export_checkpoint(ckpt, tmp_path / "m")
    tokenizer.save(tmp_path / "spm.model")
    export_checkpoint(ckpt, tmp_path / "m", tokenizer=tmp_path / "spm.model")


def test_average_of_two_is_the_mean(tmp_path, tokenizer):
    a = write_checkpoint(tmp_path / "a.ckpt", tokenizer, step=10, seed=1)
    b = write_checkpoint(tmp_path / "b.ckpt", tokenizer, step=20, seed=2)
    out = average_checkpoints([a, b], tmp_path / "avg")
    wa, wb = model_state(export_checkpoint(a, tmp_path / "ea")), model_state(
        export_checkpoint(b, tmp_path / "eb"))
    averaged = model_state(out)
    assert averaged.keys() == wa.keys()
    assert not torch.equal(wa["embed.weight"], wb["embed.weight"])  # two different models
    for key in wa:
        assert torch.allclose(averaged[key], (wa[key] + wb[key]) / 2, atol=1e-7)
    load_model_dir(out)


def test_average_of_one_equals_export(tmp_path, tokenizer):
    a = write_checkpoint(tmp_path / "a.ckpt", tokenizer, step=10, seed=1)
    exported = model_state(export_checkpoint(a, tmp_path / "e"))
    averaged = model_state(average_checkpoints([a], tmp_path / "avg"))
    assert all(torch.equal(exported[k], averaged[k]) for k in exported)


def test_average_refuses_different_models(tmp_path, tokenizer):
    a = write_checkpoint(tmp_path / "a.ckpt", tokenizer, step=10, seed=1)
    b = write_checkpoint(tmp_path / "b.ckpt", tokenizer, step=20, seed=2, attention="standard")
    with pytest.raises(ModelDirError, match="different model"):
        average_checkpoints([a, b], tmp_path / "avg")


def test_run_dir_takes_the_last_n_distinct_steps(tmp_path, tokenizer):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    for step in (10, 20, 30):
        write_checkpoint(run / f"step{step}.ckpt", tokenizer, step=step, seed=step)
    shutil.copy(run / "step30.ckpt", run / "last.ckpt")  # last.ckpt repeats the newest step
    assert find_checkpoints(tmp_path / "run", 2) == [run / "step20.ckpt", run / "step30.ckpt"]
    with pytest.raises(ModelDirError, match="found only 3 distinct steps"):
        find_checkpoints(tmp_path / "run", 4)
    out = average_checkpoints(tmp_path / "run", tmp_path / "avg", last=2)
    meta = json.loads((out / "metadata.json").read_text())
    assert [Path(p).name for p in meta["averaged_checkpoints"]] == ["step20.ckpt", "step30.ckpt"]
