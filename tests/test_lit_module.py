"""TranslationModule: schedule, weight decay, loss, validation BLEU, learning, checkpoints."""

import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import write_corpus

from seq2seq_diff.data import TranslationDataModule
from seq2seq_diff.errors import ConfigError
from seq2seq_diff.lit_module import (
    TranslationModule,
    inverse_sqrt_factor,
    parameter_groups,
)
from seq2seq_diff.model import ModelConfig
from seq2seq_diff.model_dir import CHECKPOINT_KEY

# Tiny models: one thread is faster, and much faster beside a busy neighbour (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(tmp: Path, n_train: int = 300, max_tokens: int = 400) -> TranslationDataModule:
    corpus = write_corpus(tmp / "corpus", n_train)
    return TranslationDataModule(
        train=str(corpus / "train"), valid=str(corpus / "dev"), vocab_size=300,
        max_tokens=max_tokens, max_len=128, cache_dir=str(tmp / "cache"),
        work_dir=str(tmp / "work"))


def tiny_config(vocab_size: int, dropout: float = 0.0, d_model: int = 32) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, num_heads=2, num_encoder_layers=1,
                       num_decoder_layers=1, ffn_dim=2 * d_model, dropout=dropout)


def make_trainer(tmp: Path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, use_distributed_sampler=False,
                   default_root_dir=str(tmp))
    options.update(kwargs)
    return L.Trainer(**options)


# -- pure functions ---------------------------------------------------------------------------


def test_inverse_sqrt_schedule():
    warmup = 100
    factors = [inverse_sqrt_factor(step, warmup) for step in range(400)]
    assert factors[0] == pytest.approx(1 / warmup)
    assert factors[49] == pytest.approx(0.5)  # linear warmup
    assert max(factors) == pytest.approx(1.0) == factors[warmup - 1]
    assert factors[4 * warmup - 1] == pytest.approx(0.5)  # 1/sqrt decay: 4x steps, half the LR
    assert all(a < b for a, b in zip(factors[: warmup - 1], factors[1:warmup], strict=True))
    assert all(a > b for a, b in zip(factors[warmup:-1], factors[warmup + 1 :], strict=True))


def test_weight_decay_only_on_weight_matrices():
    module = TranslationModule(tiny_config(300), warmup_steps=1)
    decay, no_decay = parameter_groups(module.model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(undecayed)
    assert decayed | undecayed == set(names.values())
    assert "embed.weight" in undecayed
    assert any("lambda_q1" in n for n in undecayed)
    assert any(n.endswith("norm.weight") for n in undecayed)
    assert all(n.endswith("proj.weight") or ".ffn.w" in n for n in decayed)


def test_optimizer_is_fused_adamw_and_steps_as_the_default_one():
    """configure_optimizers: AdamW's fused kernel on the CPU, the same update as the default."""
    module = TranslationModule(tiny_config(300), warmup_steps=1, lr=0.01)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    reference = TranslationModule(tiny_config(300), warmup_steps=1, lr=0.01)
    reference.load_state_dict(module.state_dict())
    plain = torch.optim.AdamW(parameter_groups(reference.model, 0.01), lr=0.01, betas=(0.9, 0.98))
    before = module.model.embed.weight.detach().clone()
    for _ in range(3):
        for m, opt in ((module, optimizer), (reference, plain)):
            m._loss(_batch())[0].backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(module.model.embed.weight, before, atol=1e-3)  # it did step


def test_bad_hyperparameters_raise_config_errors():
    with pytest.raises(ConfigError, match="warmup_steps"):
        TranslationModule(tiny_config(300), warmup_steps=0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        TranslationModule(tiny_config(300), label_smoothing=1.0)


def _batch(extra_pad: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 300, (2, 6), generator=g)
    tgt = torch.randint(4, 300, (2, 5), generator=g)
    src[1, 4:] = 0
    tgt[1, 3:] = 0
    pad = torch.zeros(2, extra_pad, dtype=torch.long)
    tgt_in = torch.cat([torch.full((2, 1), 2), tgt[:, :-1], pad], dim=1)
    tgt_out = torch.cat([tgt, pad], dim=1)
    return {"src": torch.cat([src, pad], dim=1), "tgt_in": tgt_in, "tgt_out": tgt_out}


def test_loss_ignores_padding_and_counts_tokens():
    module = TranslationModule(tiny_config(300), label_smoothing=0.1, warmup_steps=1).eval()
    loss, nll, ntokens = module._loss(_batch())
    loss_padded, nll_padded, ntokens_padded = module._loss(_batch(extra_pad=3))
    assert ntokens == ntokens_padded == 5 + 3
    assert torch.allclose(loss, loss_padded, atol=1e-5)
    assert torch.allclose(nll, nll_padded, atol=1e-5)
    assert loss > nll  # smoothing adds the cross-entropy to the uniform distribution
    plain = TranslationModule(tiny_config(300), label_smoothing=0.0, warmup_steps=1).eval()
    plain.load_state_dict(module.state_dict())
    loss0, nll0, _ = plain._loss(_batch())
    assert torch.allclose(loss0, nll0)
    assert math.isclose(nll0.item() / 8, nll.item() / 8, rel_tol=1e-6)
    # The one-log-softmax loss equals torch's label-smoothed cross-entropy.
    batch = _batch(extra_pad=3)
    logits = module.model(batch["src"], batch["tgt_in"]).flatten(0, 1)
    reference = torch.nn.functional.cross_entropy(
        logits, batch["tgt_out"].flatten(), ignore_index=0, label_smoothing=0.1, reduction="sum")
    assert torch.allclose(loss_padded, reference, rtol=1e-5)


# -- with a Trainer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_trains_with_gradient_clipping(tmp_path, data, precision):
    """Lightning refuses clipping beside a fused optimizer under its AMP plugin (a check made
    for fp16's gradient scaler): bf16-mixed, which scales nothing, clips anyway, by norm."""
    module = TranslationModule(tiny_config(data.vocab_size), warmup_steps=1, lr=0.01)
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0, precision=precision,
                           gradient_clip_val=0.5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
        trainer.fit(module, datamodule=data)
    assert trainer.optimizers[0].defaults["fused"] and trainer.global_step == 2
    assert norms == [0.5, 0.5]


def test_validation_logs_bleu_chrf_and_signature(tmp_path, data, caplog):
    module = TranslationModule(tiny_config(data.vocab_size), warmup_steps=2, valid_bleu_size=12)
    trainer = make_trainer(tmp_path, max_steps=3, val_check_interval=3,
                           check_val_every_n_epoch=None, log_every_n_steps=1)
    package = logging.getLogger("seq2seq_diff")  # the CLI may have stopped its propagation
    package.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="seq2seq_diff.lit_module"):
            trainer.fit(module, datamodule=data)
    finally:
        package.removeHandler(caplog.handler)
    metrics = trainer.callback_metrics
    for name in ("val_loss", "val_nll", "val_ppl", "val_bleu", "val_chrf", "train_loss", "tok_s"):
        assert name in metrics, name
    assert 0.0 <= metrics["val_bleu"] <= 100.0
    assert metrics["tok_s"] > 0
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_nll"]), rel=1e-4)
    assert module.bleu_signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "sacreBLEU signatures" in caplog.text and "12 dev sentences" in caplog.text
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_checkpoint_carries_config_tokenizer_and_loads(tmp_path, data):
    module = TranslationModule(tiny_config(data.vocab_size), warmup_steps=2, valid_bleu_size=0)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # as Lightning itself loads it
    extra = checkpoint[CHECKPOINT_KEY]
    assert extra["model_config"] == module.config.to_dict()
    data.tokenizer.save(tmp_path / "spm.model")
    assert extra["spm_model"] == (tmp_path / "spm.model").read_bytes()
    loaded = TranslationModule.load_from_checkpoint(path)
    assert loaded.config == module.config
    for key, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_learning_rate_follows_the_schedule(tmp_path, data):
    module = TranslationModule(tiny_config(data.vocab_size), lr=1e-3, warmup_steps=4,
                               valid_bleu_size=0)
    trainer = make_trainer(tmp_path, max_steps=6, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * inverse_sqrt_factor(6, 4))


def test_training_loss_falls(tmp_path):
    """1000 real pairs, 60 steps: the per-token loss drops well below its start."""
    data = make_data(tmp_path, n_train=1000, max_tokens=600)
    module = TranslationModule(tiny_config(data.vocab_size, d_model=48), lr=5e-3,
                               warmup_steps=10, label_smoothing=0.0, valid_bleu_size=0)

    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = make_trainer(tmp_path, max_steps=60, limit_val_batches=0, callbacks=[Record()],
                           gradient_clip_val=1.0)
    trainer.fit(module, datamodule=data)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > math.log(data.vocab_size) - 1.0  # starts near uniform
    assert last < first - 1.5, (first, last)


# -- non-finite losses ------------------------------------------------------------------------


def _nan_loss_at(module, calls: set[int]) -> dict[str, int]:
    """Make ``module._loss`` return NaN on the given (0-based) training calls; count calls."""
    original = module._loss
    count = {"n": 0}

    def loss(batch):
        loss_sum, nll_sum, ntokens = original(batch)
        if module.training:
            count["n"] += 1
            if count["n"] - 1 in calls:
                loss_sum = loss_sum * float("nan")
        return loss_sum, nll_sum, ntokens
    module._loss = loss
    return count


def _module(data, **kwargs) -> TranslationModule:
    return TranslationModule(tiny_config(data.vocab_size), lr=1e-3, warmup_steps=2,
                             valid_bleu_size=0, **kwargs)


def test_a_nan_loss_skips_the_step_and_training_goes_on(tmp_path, data):
    module = _module(data)
    calls = _nan_loss_at(module, {1, 2})
    trainer = make_trainer(tmp_path, max_steps=5, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert module.nonfinite_skipped == 2 and calls["n"] == trainer.global_step == 5
    assert all(p.isfinite().all() for p in module.parameters())
    # a skipped step leaves the weights exactly as they were (no update, no weight decay)
    module = _module(data, max_nonfinite_steps=10)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _nan_loss_at(module, set(range(3)))
    make_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, datamodule=data)
    assert module.nonfinite_skipped == 3
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_nonfinite_loss_stop_or_too_many_in_a_row_is_one_clear_error(tmp_path, data):
    from seq2seq_diff.errors import TrainingError

    module = _module(data, nonfinite_loss="stop")
    _nan_loss_at(module, {2})
    with pytest.raises(TrainingError, match="at step 2 .*nonfinite_loss: stop"):
        make_trainer(tmp_path, max_steps=5, limit_val_batches=0).fit(module, datamodule=data)
    module = _module(data, max_nonfinite_steps=2)
    _nan_loss_at(module, {0, 1, 2, 3})
    with pytest.raises(TrainingError, match="3 steps in a row"):
        make_trainer(tmp_path, max_steps=5, limit_val_batches=0).fit(module, datamodule=data)


def test_a_model_with_nan_weights_is_never_written(tmp_path, data):
    from seq2seq_diff.errors import ModelDirError
    from seq2seq_diff.model import Seq2SeqTransformer
    from seq2seq_diff.model_dir import save_model_dir

    model = Seq2SeqTransformer(tiny_config(data.vocab_size))
    with torch.no_grad():
        model.decoder_layers[0].ffn.w2.weight[0, 0] = float("nan")
    with pytest.raises(ModelDirError, match="NaN/Inf"):
        save_model_dir(tmp_path / "m", model, data.tokenizer)
    assert not (tmp_path / "m").exists()


# The rotary embedding's complex product is eager-only: compiled graphs must use its real form.
@pytest.mark.filterwarnings("error:Torchinductor does not support code generation for complex")
def test_compiled_loss_equals_eager_loss_and_gradients():
    """model.compile: the torch.compile'd encoder/decoder gives the eager loss and gradients,
    dropout included: one graph (the CPU dropout mask is an op the graph calls, not a break),
    and the same seed draws the same masks in the same order. Eager on torch's products, the
    compiled graph calling oneDNN's (seq2seq_diff.onednn) where this build has it."""
    from torch._dynamo.utils import counters

    from seq2seq_diff import onednn

    eager = TranslationModule(tiny_config(300, dropout=0.3), warmup_steps=1, cpu_gemm="mkl")
    compiled = TranslationModule(tiny_config(300, dropout=0.3), warmup_steps=1, compile=True,
                                 cpu_gemm="onednn" if onednn.available() else "mkl")
    compiled.load_state_dict(eager.state_dict())
    batch = _batch(extra_pad=2)
    breaks = sum(counters["graph_break"].values())
    results = []
    for module in (eager, compiled):
        torch.manual_seed(7)
        loss, nll, ntokens = module._loss(batch)
        loss.backward()
        results.append((loss.detach(), nll, ntokens,
                        [p.grad.clone() for p in module.parameters() if p.grad is not None]))
    assert sum(counters["graph_break"].values()) == breaks
    (l0, n0, t0, g0), (l1, n1, t1, g1) = results
    torch.manual_seed(8)
    assert not torch.allclose(eager._loss(batch)[0], l0)  # dropout is on: another seed differs
    assert t0 == t1 and torch.allclose(l0, l1, rtol=1e-5) and torch.allclose(n0, n1, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1, strict=True))


def test_failed_training_compile_warns_once_and_runs_eagerly(caplog):
    """model.compile where compiling fails (no C++ compiler): one warning, the eager loss."""
    eager = TranslationModule(tiny_config(300), warmup_steps=1).eval()
    compiled = TranslationModule(tiny_config(300), warmup_steps=1, compile=True).eval()
    compiled.load_state_dict(eager.state_dict())
    calls = []

    def broken(*args):
        calls.append(1)
        raise torch._dynamo.exc.TorchDynamoException("no working C++ compiler")

    compiled._states.compiled = broken
    batch = _batch()
    with caplog.at_level(logging.WARNING, logger="seq2seq_diff"):
        for _ in range(2):
            assert torch.equal(compiled._loss(batch)[0], eager._loss(batch)[0])
    assert len(calls) == 1 and compiled._states.failed == "no working C++ compiler"
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the training loss failed (no working C++ compiler); running it eagerly"]
