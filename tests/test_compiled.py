"""Compiled decoding steps (seq2seq_diff.compiled): the same searches as eager, one graph each.

Each search kind compiles once (about 15 s for these tiny models on 2 CPU cores), so the
equivalence tests share one compiled model per attention kind.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import VOCAB, cli_translations, random_batch, random_model
from torch._dynamo.utils import counters

from seq2seq_diff.compiled import CompiledDecode, compile_decoding
from seq2seq_diff.errors import ConfigError
from seq2seq_diff.quantize import cpu_bf16_native, precision_context, quantize_int8, to_bf16
from seq2seq_diff.search import beam_search, greedy_search
from seq2seq_diff.translator import Translator

pytestmark = pytest.mark.usefixtures("one_thread")

# Batches of every shape a translation meets: mixed lengths (sentences finish and leave at
# different steps), one sentence, sources of one token, a wider batch than the first.
BATCHES = [dict(batch=6, seed=1), dict(batch=1, seed=2),
           dict(batch=3, seed=3, min_len=0, max_len=1), dict(batch=11, seed=4, max_len=14)]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def greedy(model, src, mask) -> tuple[list, None]:
    return greedy_search(model, src, mask, max_len_a=1.0, max_len_b=4), None


def beam(model, src, mask) -> tuple[list, list]:
    """Tokens and scores of a beam search's 3-best lists."""
    hyps = beam_search(model, src, mask, beam_size=3, n_best=3, max_len_a=1.0, max_len_b=4)
    return ([[h.tokens for h in sent] for sent in hyps],
            [h.score for sent in hyps for h in sent])


@pytest.fixture(scope="module")
def models():
    """(eager float32 random model, its compiled copy) per attention kind."""
    torch._dynamo.reset()
    built = {}
    for kind in ("diff", "standard"):
        eager = random_model(kind).float()
        built[kind] = eager, compile_decoding(eager)
    return built


@pytest.mark.parametrize("kind", ["diff", "standard"])
def test_compiled_searches_equal_eager_with_one_graph_per_search(models, kind):
    eager, compiled = models[kind]
    assert isinstance(compiled.decode, CompiledDecode)
    for search in (greedy, beam):
        before = graphs()
        for shape in BATCHES:
            src = random_batch(**shape)
            mask = src != 0
            (got, got_scores), (want, want_scores) = (search(compiled, src, mask),
                                                      search(eager, src, mask))
            assert got == want
            if want_scores is not None:
                assert got_scores == pytest.approx(want_scores, abs=1e-4)
        assert compiled.decode.failed is None
        assert graphs() - before == 1, "one graph for every batch shape of a search kind"


def step_logits(model, src, mask, tokens, precision="none") -> list[torch.Tensor]:
    """Each cached step's logits over ``tokens``, one column at a time."""
    with torch.inference_mode(), precision_context(precision, torch.device("cpu")):
        cache = model.new_cache(model.encode(src, mask))
        return [model.decode(tokens[:, t:t + 1], None, mask, cache).float()
                for t in range(tokens.shape[1])]


def test_compiled_step_logits_match_eager(models):
    """Cached steps, compiled against eager, from the same cache state: float32 rounding only."""
    eager, compiled = models["diff"]
    src = random_batch(batch=5, seed=7)
    mask = src != 0
    tokens = torch.randint(4, VOCAB, (5, 6), generator=torch.Generator().manual_seed(0))
    for got, want in zip(step_logits(compiled, src, mask, tokens),
                         step_logits(eager, src, mask, tokens), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_bf16_native(), reason="bf16 products need AVX512-BF16 or AMX")
def test_bf16_graphs_are_frozen_per_model():
    """bf16 weights become constants of the graph (frozen, then inductor's own GEMM kernels):
    a second model of the same shape gets graphs of its own, not the first one's weights."""
    src = random_batch(batch=5, seed=7)
    mask = src != 0
    tokens = torch.randint(4, VOCAB, (5, 5), generator=torch.Generator().manual_seed(0))
    eager = [to_bf16(random_model("standard", seed=seed).float()) for seed in (0, 1)]
    compiled = [compile_decoding(model) for model in eager]
    assert [c.decode.frozen for c in compiled] == [True, True]
    assert not compile_decoding(random_model("standard").float()).decode.frozen
    before = graphs()
    got = [step_logits(c, src, mask, tokens, "bf16") for c in compiled]
    want = [step_logits(e, src, mask, tokens, "bf16") for e in eager]
    assert graphs() - before == 2 and all(c.decode.failed is None for c in compiled)
    for g, w, other in zip(got, want, reversed(want), strict=True):
        for step in range(2, tokens.shape[1]):  # the first two steps run eagerly
            torch.testing.assert_close(g[step], w[step], atol=0.05, rtol=0.05)
            assert (g[step] - other[step]).abs().max() > 0.5


def test_frozen_graph_serves_greedy_steps_and_beam_steps_keep_graph_inputs():
    model = compile_decoding(to_bf16(random_model("standard").float()))
    step, calls = model.decode, []
    step.compiled = lambda *args: calls.append("inputs") or step.eager(*args)
    step.compiled_frozen = lambda *args: calls.append("frozen") or step.eager(*args)
    src = random_batch(batch=6, seed=1)
    with precision_context("bf16", torch.device("cpu")):
        greedy(model, src, src != 0)
        assert calls and set(calls) == {"frozen"}
        calls.clear()
        beam(model, src, src != 0)
        assert calls and set(calls) == {"inputs"}


def test_failed_compile_warns_once_and_decodes_eagerly(caplog):
    eager = random_model("diff").float()
    compiled = compile_decoding(eager)
    calls = []

    def broken(*args):
        calls.append(1)
        raise torch._dynamo.exc.TorchDynamoException("no working C++ compiler")

    compiled.decode.compiled = broken
    src = random_batch(batch=4, seed=5)
    with caplog.at_level(logging.WARNING, logger="seq2seq_diff"):
        got = greedy_search(compiled, src, src != 0)
    assert got == greedy_search(eager, src, src != 0)
    assert len(calls) == 1 and compiled.decode.failed == "no working C++ compiler"
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the decoding step failed (no working C++ compiler); decoding eagerly"]


def test_compile_takes_float_models_only():
    model = random_model("diff").float()
    with pytest.raises(ValueError, match="not an int8"):
        compile_decoding(quantize_int8(model))


def test_translate_cli_compile_gives_the_same_lines(model_dir, tmp_path, english):
    outputs = cli_translations(model_dir, tmp_path, english[:12], 2, [], ["--compile"])
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 13


def test_compile_with_int8_or_pack_is_one_clear_error(model, tokenizer, model_dir, capsys):
    from seq2seq_diff.cli import main

    with pytest.raises(ConfigError, match="drop --compile or --int8"):
        Translator(model, tokenizer, compile=True, quantize="int8")
    for flag, message in (("--int8", "drop --compile or --int8"),
                          ("--pack", "drop --pack, or drop --compile")):
        assert main(["translate", "--model", str(model_dir), "--compile", flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
