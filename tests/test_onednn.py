"""Float32 training products through oneDNN: the function and gradients of F.linear, the same
model, a plain state dict, plain inference copies, torch's own products where it does not apply,
and the trainer's switch (model.cpu_gemm)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq_diff import onednn
from seq2seq_diff.errors import ConfigError
from seq2seq_diff.lit_module import TranslationModule
from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer
from seq2seq_diff.onednn import OneDNNLinear, onednn_linear, use_onednn

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not onednn.available(),
                                 reason="this PyTorch build has no oneDNN float32 linear")]


def config(**kw) -> ModelConfig:
    options = dict(vocab_size=120, d_model=32, num_heads=2, num_encoder_layers=2,
                   num_decoder_layers=2, ffn_dim=48, dropout=0.0)
    options.update(kw)
    return ModelConfig(**options)


def onednn_layers(model: nn.Module) -> int:
    return sum(isinstance(m, OneDNNLinear) for m in model.modules())


@pytest.mark.parametrize("strided", [False, True])
def test_op_equals_f_linear_with_gradients(strided):
    x = torch.randn(3, 40, 7, dtype=torch.float64).float()
    weight = torch.randn(24, 40).float()
    if strided:  # a transposed input and a weight stored column-major
        x = x.transpose(1, 2)
        weight = weight.t().contiguous().t()
    else:
        x = x.transpose(1, 2).contiguous()
    grad = torch.randn(3, 7, 24)
    results = []
    for fn in (F.linear, onednn_linear, onednn.linear):  # (linear: the eager autograd.Function)
        a, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(a, w)
        out.backward(grad)
        results.append((out.detach(), a.grad, w.grad))
    for result in results[1:]:
        for ours, torch_ in zip(result, results[0], strict=True):
            assert ours.shape == torch_.shape
            torch.testing.assert_close(ours, torch_, rtol=1e-5, atol=1e-5)


def test_eager_layer_has_a_double_backward():
    x, weight = torch.randn(5, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    results = []
    for fn in (F.linear, onednn.linear):
        grads = torch.autograd.grad((fn(x, weight) ** 2).sum(), (x, weight), create_graph=True)
        results.append(torch.autograd.grad(sum(g.square().sum() for g in grads), (x, weight)))
    for ours, torch_ in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, torch_, rtol=1e-4, atol=1e-4)


def test_op_passes_torch_library_checks():
    x, weight = torch.randn(5, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(onednn_linear, (x, weight))


@pytest.mark.parametrize("kind", ["diff", "standard"])
@pytest.mark.parametrize("tie", [True, False])
def test_model_through_onednn_gives_the_same_logits_and_gradients(kind, tie):
    plain = Seq2SeqTransformer(config(attention=kind, tie_embeddings=tie))
    ours = use_onednn(copy.deepcopy(plain))
    assert onednn_layers(ours) > 0 and ours.onednn and onednn_layers(plain) == 0
    assert ours.state_dict().keys() == plain.state_dict().keys()
    src, tgt = torch.randint(4, 120, (3, 11)), torch.randint(4, 120, (3, 9))
    src[0, 7:] = 0  # padding
    outs = [model(src, tgt) for model in (plain, ours)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(outs[0])
    for out in outs:
        (out * weights).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_without_autograd_the_layer_calls_onednn_directly(monkeypatch):
    """No grad (validation, decoding, a graph being exported): oneDNN's own op, the bias fused,
    not the custom op with its autograd; the same values."""
    layer = use_onednn(nn.Linear(16, 8, bias=True))
    x = torch.randn(2, 5, 16)
    want = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want)
    monkeypatch.setattr(onednn, "onednn_linear", None)  # would fail if called
    monkeypatch.setattr(onednn, "_EagerLinear", None)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    with pytest.raises(AttributeError):
        layer(x)


def test_switching_back_and_inference_copies_are_plain():
    model = use_onednn(Seq2SeqTransformer(config()))
    copy_ = model.inference_copy()
    assert onednn_layers(copy_) == 0 and not copy_.onednn
    assert onednn_layers(model) > 0  # the training model keeps its setting
    use_onednn(model, False)
    assert onednn_layers(model) == 0 and not model.onednn
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_bf16_autocast_and_other_dtypes_use_torch_products():
    layer = use_onednn(nn.Linear(16, 8, bias=True))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's F.linear, not the float32 op
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_trainer_switch():
    assert onednn_layers(TranslationModule(config(), cpu_gemm="onednn").model) > 0
    assert onednn_layers(TranslationModule(config(), cpu_gemm="mkl").model) == 0
    auto = TranslationModule(config()).model
    assert (onednn_layers(auto) > 0) == onednn.pays() == auto.onednn
    with pytest.raises(ConfigError, match="cpu_gemm must be 'auto', 'mkl' or 'onednn'"):
        TranslationModule(config(), cpu_gemm="blas")


def test_pays_except_where_mkl_takes_its_avx512_path(monkeypatch):
    for vendor, pays in (("GenuineIntel", False), ("AuthenticAMD", True), ("", True)):
        monkeypatch.setattr(onednn, "cpu_vendor", lambda vendor=vendor: vendor)
        assert onednn.pays() is pays
