"""Linear weights stored input-major (``packed.store_input_major``): the same function and the
same searches, kept by copies; and ``translator.inference_model``, the model each translate
setting decodes with."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import PAD, random_batch, random_model
from torch import nn

from seq2seq_diff import packed as packed_module
from seq2seq_diff.errors import ConfigError
from seq2seq_diff.packed import PackedLinear, store_input_major
from seq2seq_diff.search import beam_search, greedy_search
from seq2seq_diff.translator import Translator, inference_model

pytestmark = pytest.mark.usefixtures("one_thread")


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def input_major(model: nn.Module) -> bool:
    """Every linear weight (out, in) stored column-major: its transpose row-major."""
    weights = [m.weight for m in linears(model)]
    return bool(weights) and all(w.t().is_contiguous() and not w.is_contiguous()
                                 for w in weights)


@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_input_major_weights_compute_the_same_function_and_searches(attention):
    model = random_model(attention)
    fused = model.inference_copy()
    stored = store_input_major(model.inference_copy())
    assert input_major(stored) and not input_major(fused) and not input_major(model)
    for a, b in zip(linears(fused), linears(stored), strict=True):
        assert torch.equal(a.weight, b.weight)
    weights = [m.weight for m in linears(stored)]
    assert store_input_major(stored) is stored  # stored already: the same tensors are kept
    assert all(a is b for a, b in zip(weights, [m.weight for m in linears(stored)], strict=True))
    assert input_major(copy.deepcopy(stored).to(torch.bfloat16))  # copies keep the layout
    src = random_batch(6)
    mask = src != PAD
    tgt = torch.randint(4, 40, (6, 5))
    with torch.inference_mode():
        torch.testing.assert_close(stored(src, tgt), model(src, tgt), rtol=1e-9, atol=1e-9)
    assert greedy_search(stored, src, mask) == greedy_search(model, src, mask)
    got = beam_search(stored, src, mask, beam_size=3, n_best=2)
    want = beam_search(model, src, mask, beam_size=3, n_best=2)
    assert [[h.tokens for h in hyps] for hyps in got] == [[h.tokens for h in hyps] for hyps in want]


def test_inference_model_for_each_setting(model, monkeypatch):
    """float32 on a CPU: packed where packing pays, else input-major; bf16 unpacked input-major
    too; int8 quantised; the caller's model untouched; --pack beside --compile, --aot or int8
    is an error, not silently ignored."""
    before = {name: p.clone() for name, p in model.state_dict().items()}
    for pays in (False, True):
        monkeypatch.setattr(packed_module, "packing_pays", lambda pays=pays: pays)
        monkeypatch.setattr("seq2seq_diff.translator.packing_pays", lambda pays=pays: pays)
        default = inference_model(model, "cpu")
        packed = any(isinstance(m, PackedLinear) for m in default.modules())
        assert packed == (pays and packed_module.packing_available())
        assert packed or input_major(default)
    plain = inference_model(model, "cpu", pack=False)
    assert input_major(plain) and plain.decoder_layers[0].self_attn.qkv_proj is not None
    bf16 = inference_model(model, "cpu", quantize="bf16", pack=False)
    assert input_major(bf16) and {m.weight.dtype for m in linears(bf16)} == {torch.bfloat16}
    int8 = inference_model(model, "cpu", quantize="int8")
    assert not linears(int8)  # every linear layer quantised
    assert all(not m.training for m in (default, plain, bf16, int8))
    for options, drop in ((dict(compile=True), "--compile"), (dict(aot=True), "--aot"),
                          (dict(quantize="int8"), "--int8")):
        with pytest.raises(ConfigError, match=f"drop --pack, or drop {drop}"):
            inference_model(model, "cpu", pack=True, **options)
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    assert model.decoder_layers[0].self_attn.qkv_proj is None  # not fused either


def test_translator_on_input_major_weights_gives_the_lines_of_the_model(model, tokenizer,
                                                                        english):
    translator = Translator(model, tokenizer, beam_size=2, pack=False)
    assert input_major(translator.model)
    lines = english[:10] + [""]
    reference = Translator(model, tokenizer, beam_size=2, pack=False)
    reference.model = model.eval()  # the training model as it is: unfused, row-major
    assert translator.translate(lines) == reference.translate(lines)
