"""Attention recording, copy focus, outliers, quantisation, and the analyze/plot-attention CLIs."""

from __future__ import annotations

import pytest
import torch

from seq2seq_diff.analysis import (
    _copy_pairs,
    activation_outliers,
    copy_focus,
    record_attention,
)
from seq2seq_diff.attention import MultiheadAttention, MultiheadDiffAttention, RotaryEmbedding
from seq2seq_diff.cli import main
from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer
from seq2seq_diff.quantize import (
    fake_quantize_weights,
    precision_context,
    quantize_int8,
    to_bf16,
)
from seq2seq_diff.translator import Translator


def _module_output_from_record(module, record, x_source):
    """Rebuild the module's output from the recorded map alone."""
    b, s, _ = x_source.shape
    v = module._split_v(module.v_proj(x_source))
    if isinstance(module, MultiheadDiffAttention):
        o = record.diff.to(v.dtype) @ v  # (B, H, T, 2D)
        o = module.subln(o) * (1.0 - module.lambda_init)
    else:
        o = record.probs.to(v.dtype) @ v  # (B, 2H, T, D)
    return module.out_proj(o.transpose(1, 2).reshape(b, -1, module.d_model))


@pytest.mark.parametrize("kind", [MultiheadDiffAttention, MultiheadAttention])
@pytest.mark.parametrize("setting", ["padded-self", "causal-self", "cross"])
def test_recorded_maps_reproduce_the_attention_output(kind, setting):
    torch.manual_seed(0)
    module = kind(32, 2, layer_index=2).eval()
    x = torch.randn(3, 7, 32)
    source = torch.randn(3, 5, 32) if setting == "cross" else None
    keys = 5 if setting == "cross" else 7
    lengths = torch.tensor([keys, keys - 1, 2])
    mask = (torch.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]
    rotary = None if setting == "cross" else RotaryEmbedding(module.head_dim)
    causal = setting == "causal-self"
    records = []
    module.recorder = lambda m, q, k, msk, c: records.append((q, k, msk, c))
    expected = module(x, source, mask=mask, causal=causal, rotary=rotary)
    module.recorder = None
    from seq2seq_diff.analysis import AttentionRecord, attention_maps

    logits, probs, diff, lam, allowed = attention_maps(module, *records[0])
    record = AttentionRecord("m", logits, probs, diff, lam, allowed)
    rebuilt = _module_output_from_record(module, record, x if source is None else source)
    torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(probs[~allowed] == 0)
    if kind is MultiheadDiffAttention:  # rows of A1 − λA2 sum to 1 − λ
        sums = diff.sum(-1)[allowed[:, ::2].any(-1)]
        torch.testing.assert_close(sums, torch.full_like(sums, 1 - lam), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_record_attention_sees_every_attention_and_changes_nothing(attention, tokenizer):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32,
                                           num_heads=2, num_encoder_layers=2,
                                           num_decoder_layers=2, ffn_dim=64, dropout=0.0,
                                           attention=attention)).eval()
    src = torch.randint(4, 200, (2, 6))
    tgt = torch.randint(4, 200, (2, 4))
    before = model(src, tgt)
    with record_attention(model) as records:
        during = model(src, tgt)
    names = [r.name for r in records]
    assert len(names) == 2 + 2 * 2 and sum(n.endswith("cross_attn") for n in names) == 2
    assert all(m.recorder is None for m in model.modules() if hasattr(m, "recorder"))
    torch.testing.assert_close(before, during)


def test_copy_pairs_take_unique_numbers_and_names(tokenizer):
    src = tokenizer.encode(["In 1999 Paris had 7 bridges"])[0]
    tgt = tokenizer.encode(["În 1999 Paris avea 7 poduri"])[0]
    pairs = _copy_pairs(tokenizer, src, tgt)
    copied = {tokenizer.id_to_piece(tgt[t]) for t, _ in pairs}
    assert copied and all(any(c.isdigit() for c in p) or p.lstrip("▁")[:1].isupper()
                          for p in copied)
    for t, s in pairs:
        assert src[s] == tgt[t]


def test_copy_focus_and_outliers_on_a_model(model, tokenizer, english):
    sources = ["In 2016 Bucharest had 9 new parks.", "The year 1848 changed Europe."]
    references = ["În 2016 Bucharest avea 9 parcuri noi.", "Anul 1848 a schimbat Europe."]
    report = copy_focus(model, tokenizer, sources, references)
    expected = sum(len(_copy_pairs(tokenizer, s + [3], t)) for s, t in
                   zip(tokenizer.encode(sources), tokenizer.encode(references), strict=True))
    assert report["pairs"] == expected > 0
    assert len(report["layers"]) == len(model.decoder_layers)
    assert all(torch.isfinite(torch.tensor(layer["focus"])) for layer in report["layers"])
    outliers = activation_outliers(model, tokenizer, english[:8], english[:8])
    for group in outliers.values():
        assert group["top1"] >= group["top10"] >= group["top100"] >= group["median"] > 0


def test_fake_quantization_keeps_16_bits_and_rounds_4_bits(model):
    src = torch.randint(4, 200, (2, 6))
    tgt = torch.randint(4, 200, (2, 4))
    torch.testing.assert_close(fake_quantize_weights(model, 16)(src, tgt), model(src, tgt),
                               rtol=1e-3, atol=1e-3)
    q4 = fake_quantize_weights(model, 4, group_size=16)
    w = q4.decoder_layers[0].ffn.w1.weight.view(-1, 16)
    for group in w[:10]:
        assert len(torch.unique(group)) <= 15  # symmetric 4-bit: -7..7 times a group scale
    assert model.output_proj is None or model.output_proj.weight.data_ptr() != \
        q4.output_proj.weight.data_ptr()


def test_int8_translation_is_close_to_float_and_keeps_every_line(model_dir, english):
    translator = Translator.from_pretrained(model_dir, beam_size=1)
    quantized = quantize_int8(translator.model)
    src = torch.randint(4, 200, (2, 6))
    tgt = torch.randint(4, 200, (2, 4))
    reference = translator.model(src, tgt)
    error = (quantized(src, tgt) - reference).abs().max() / reference.abs().max()
    assert error < 0.1
    int8 = Translator.from_pretrained(model_dir, beam_size=2, quantize="int8")
    lines = english[:5] + ["", "   "]
    out = int8.translate(lines)
    assert len(out) == len(lines) and out[-2:] == ["", ""]


def test_translate_cli_int8(model_dir, tmp_path, english):
    src = tmp_path / "in.en"
    src.write_text("\n".join(english[:4]) + "\n", encoding="utf-8")
    out = tmp_path / "out.ro"
    assert main(["translate", "--model", str(model_dir), "--input", str(src), "--output",
                 str(out), "--int8", "--beam-size", "2", "--quiet"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4


def test_bf16_inference_is_close_to_float_and_keeps_every_line(model_dir, english):
    translator = Translator.from_pretrained(model_dir, beam_size=1, pack=False)
    model = translator.model
    fast = to_bf16(model)
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert fast.output_proj is not None and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert fast.embed.weight.dtype == torch.float32
    assert model.decoder_layers[0].ffn.w13.weight.dtype == torch.float32  # the original is kept
    src = torch.randint(4, 200, (2, 6))
    tgt = torch.randint(4, 200, (2, 4))
    with torch.no_grad():
        reference = model(src, tgt)
        with precision_context("bf16", torch.device("cpu")):
            logits = fast(src, tgt).float()
    assert (logits - reference).abs().max() / reference.abs().max() < 0.05
    bf16 = Translator.from_pretrained(model_dir, beam_size=1, quantize="bf16")
    lines = english[:12] + ["", "   "]
    out = bf16.translate(lines)
    assert len(out) == len(lines) and out[-2:] == ["", ""]
    same = sum(a == b for a, b in zip(out, translator.translate(lines), strict=True))
    assert same >= 9  # bf16 rounding may flip a close call in a few sentences


def test_translate_cli_bf16_and_its_warning_on_cpus_without_bf16(model_dir, tmp_path, english,
                                                                 monkeypatch, capsys):
    import seq2seq_diff.quantize

    src = tmp_path / "in.en"
    src.write_text("\n".join(english[:4]) + "\n", encoding="utf-8")
    out = tmp_path / "out.ro"
    args = ["translate", "--model", str(model_dir), "--input", str(src), "--output", str(out),
            "--bf16", "--beam-size", "2", "--quiet"]
    for native in (True, False):
        monkeypatch.setattr(seq2seq_diff.quantize, "cpu_bf16_native", lambda native=native: native)
        assert main(args) == 0
        assert len(out.read_text(encoding="utf-8").splitlines()) == 4
        assert ("emulated" in capsys.readouterr().err) == (not native)
    assert main(args + ["--int8"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_analyze_and_plot_attention_cli(model_dir, tmp_path, english, capsys):
    pytest.importorskip("matplotlib")
    src = tmp_path / "in.en"
    src.write_text("\n".join(english[:6]) + "\n", encoding="utf-8")
    json_path = tmp_path / "report.json"
    assert main(["analyze", "--model", str(model_dir), str(model_dir), "--src", str(src),
                 "--ref", str(src), "--lines", "6", "--json", str(json_path)]) == 0
    text = capsys.readouterr().out
    for section in ("(a) cross-attention focus", "(b) activation magnitudes",
                    "(c) BLEU by weight precision", "int8", "4-bit"):
        assert section in text
    assert json_path.is_file()
    prefix = tmp_path / "plots" / "s"
    assert main(["plot-attention", "--model", str(model_dir), "--src", english[0], "--out",
                 str(prefix)]) == 0
    for kind in ("encoder", "decoder", "cross"):
        assert (tmp_path / "plots" / f"s-{kind}.png").stat().st_size > 1000


def test_plot_attention_rejects_an_empty_sentence(model_dir, capsys):
    pytest.importorskip("matplotlib")
    assert main(["plot-attention", "--model", str(model_dir), "--src", "  ", "--out",
                 "/tmp/x"]) == 2
    assert "non-empty" in capsys.readouterr().err
