"""oneDNN-packed linear layers: the same function as nn.Linear, the same searches, the default of
float32 CPU translation, and copies that come back plain (so int8/bf16 still find nn.Linear)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from seq2seq_diff import onednn
from seq2seq_diff import packed as packed_module
from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer
from seq2seq_diff.packed import PackedLinear, pack_linears, packing_available, packing_pays
from seq2seq_diff.quantize import precision_context, quantize_int8, to_bf16
from seq2seq_diff.search import beam_search, greedy_search
from seq2seq_diff.translator import Translator

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not packing_available(),
                                 reason="this PyTorch build has no oneDNN linear packing")]


def random_model(attention: str, tie: bool = True) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=64, num_heads=2, num_encoder_layers=2,
                      num_decoder_layers=2, ffn_dim=96, dropout=0.0, attention=attention,
                      tie_embeddings=tie)
    return Seq2SeqTransformer(cfg).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_nn_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear)
    for x in (torch.randn(5, 48), torch.randn(3, 7, 48), torch.randn(9, 96)[:, ::2]):
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    plain = packed.unpacked()
    assert torch.equal(plain.weight, linear.weight)
    assert bias == (plain.bias is not None) and (not bias or torch.equal(plain.bias, linear.bias))
    with pytest.raises(ValueError, match="float32 or bfloat16 CPU"):
        PackedLinear(nn.Linear(4, 4).double())


@pytest.mark.parametrize("attention", ["diff", "standard"])
@pytest.mark.parametrize("tie", [True, False])
def test_packed_model_computes_the_same_logits_and_leaves_the_original(attention, tie):
    model = random_model(attention, tie)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    packed = pack_linears(model)
    assert not any(isinstance(m, nn.Linear) for m in packed.modules())
    # fused: qkv, out, w13, w2 per encoder layer; + cross q, k, v, out per decoder layer; output
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 4 + 2 * 8 + 1
    assert model.output_proj is None if tie else isinstance(model.output_proj, nn.Linear)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    src = torch.randint(4, 300, (3, 9))
    tgt = torch.randint(4, 300, (3, 6))
    with torch.inference_mode():
        torch.testing.assert_close(packed(src, tgt), model(src, tgt), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_searches_on_the_packed_model_find_the_same_translations(attention):
    model = random_model(attention)
    packed = pack_linears(model)
    src = torch.randint(4, 300, (6, 11))
    src[:, -1] = 3
    mask = torch.ones_like(src, dtype=torch.bool)
    assert greedy_search(packed, src, mask) == greedy_search(model, src, mask)
    got = beam_search(packed, src, mask, beam_size=4, n_best=2)
    want = beam_search(model, src, mask, beam_size=4, n_best=2)
    assert [[h.tokens for h in hyps] for hyps in got] == [[h.tokens for h in hyps] for hyps in want]
    assert [h.score for hyps in got for h in hyps] == pytest.approx(
        [h.score for hyps in want for h in hyps], abs=1e-4)


def test_a_copy_of_a_packed_model_is_plain_so_int8_still_quantises_it():
    model = random_model("diff")
    packed = pack_linears(model)
    plain = copy.deepcopy(packed)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    torch.testing.assert_close(plain.decoder_layers[1].ffn.w2.weight,
                               model.decoder_layers[1].ffn.w2.weight, rtol=0, atol=0)
    torch.testing.assert_close(plain.encoder_layers[0].self_attn.qkv_proj.weight[:64],
                               model.encoder_layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    quantized = quantize_int8(packed)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic) for m in quantized.modules()) == 2 * 4 + 2 * 8 + 1


bf16_packing = pytest.mark.skipif(not packing_available(torch.bfloat16),
                                  reason="no oneDNN bfloat16 linear packing on this CPU")


@bf16_packing
def test_packed_bf16_linear_is_f_linear_under_bf16_autocast():
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=False).to(torch.bfloat16)
    packed = PackedLinear(linear)
    for x in (torch.randn(5, 48), torch.randn(3, 7, 48).bfloat16()):  # cast in, bf16 out
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = linear(x)
        got = packed(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    plain = packed.unpacked()
    assert plain.weight.dtype == torch.bfloat16 and torch.equal(plain.weight, linear.weight)


@bf16_packing
@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_packed_bf16_model_computes_the_bf16_logits(attention):
    model = random_model(attention)
    bf16 = to_bf16(model)
    packed = pack_linears(bf16)
    assert sum(isinstance(m, PackedLinear) and m.dtype == torch.bfloat16
               for m in packed.modules()) == 2 * 4 + 2 * 8 + 1
    src, tgt = torch.randint(4, 300, (3, 9)), torch.randint(4, 300, (3, 6))
    with torch.inference_mode(), precision_context("bf16", torch.device("cpu")):
        got, want = packed(src, tgt), bf16(src, tgt)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def packed_layers(translator: Translator) -> int:
    return sum(isinstance(m, PackedLinear) for m in translator.model.modules())


def test_translator_packs_cpu_models_when_told_or_where_it_pays(model_dir, english):
    packed = Translator.from_pretrained(model_dir, beam_size=2, pack=True)
    plain = Translator.from_pretrained(model_dir, beam_size=2, pack=False)
    int8 = Translator.from_pretrained(model_dir, beam_size=2, quantize="int8")
    default = Translator.from_pretrained(model_dir, beam_size=2)
    assert packed_layers(packed) > 0 and packed_layers(plain) == packed_layers(int8) == 0
    assert (packed_layers(default) > 0) == packing_pays()
    lines = english[:10] + [""]
    assert packed.translate(lines) == plain.translate(lines)
    if packing_available(torch.bfloat16):  # bf16: packed where float32 is, or when told
        bf16 = Translator.from_pretrained(model_dir, beam_size=2, quantize="bf16", pack=True)
        assert packed_layers(bf16) > 0
        default = Translator.from_pretrained(model_dir, beam_size=2, quantize="bf16")
        assert (packed_layers(default) > 0) == packing_pays()
        assert len(bf16.translate(lines)) == len(lines)


def test_packing_pays_except_where_mkl_takes_its_avx512_path(monkeypatch):
    for vendor, pays in (("GenuineIntel", False), ("AuthenticAMD", True), ("", True)):
        monkeypatch.setattr(onednn, "cpu_vendor", lambda vendor=vendor: vendor)
        packed_module.packing_pays.cache_clear()
        assert packed_module.packing_pays() is pays
    packed_module.packing_pays.cache_clear()


def test_translate_cli_no_pack_gives_the_same_lines(model_dir, tmp_path, english):
    from seq2seq_diff.cli import main

    src = tmp_path / "in.en"
    src.write_text("\n".join(english[:6]) + "\n", encoding="utf-8")
    outputs = []
    for flags in (["--pack"], ["--no-pack"]):
        out = tmp_path / f"out{len(flags)}.ro"
        assert main(["translate", "--model", str(model_dir), "--input", str(src), "--output",
                     str(out), "--beam-size", "2", "--quiet", *flags]) == 0
        outputs.append(out.read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 6
    assert main(["translate", "--model", str(model_dir), "--input", str(src), "--pack",
                 "--int8"]) == 2  # int8 layers are not packed: one clear error
