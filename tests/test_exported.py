"""Ahead-of-time compiled decoding (seq2seq_diff.exported): the same searches as eager.

Building a graph takes 5-35 s for these tiny models on 2 CPU cores, so the equivalence tests
share one model's graphs (start, step, beam 3), kept in a directory for the module.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import cli_translations, random_batch, random_model

from seq2seq_diff import exported
from seq2seq_diff.compiled import FROZEN
from seq2seq_diff.errors import ConfigError
from seq2seq_diff.exported import ExportedDecoding, aot_decoding, model_key
from seq2seq_diff.quantize import Int8Linear, apply_quantization, int8_rows, quantize_int8
from seq2seq_diff.search import beam_search, greedy_search
from seq2seq_diff.translator import Translator

pytestmark = pytest.mark.usefixtures("one_thread")

# Every shape a translation meets: mixed lengths (rows leave at different steps), one sentence,
# sources of one token (eager: the graphs take 2 source tokens up), a wider batch, and sources
# longer than the start graph takes for these models (encoded eagerly).
BATCHES = [dict(batch=6, seed=1), dict(batch=1, seed=2),
           dict(batch=3, seed=3, min_len=0, max_len=1), dict(batch=11, seed=4, max_len=14),
           dict(batch=3, seed=5, min_len=101, max_len=120)]


def searches(model, src):
    mask = src != 0
    greedy = greedy_search(model, src, mask, max_len_a=1.0, max_len_b=4)
    hyps = [h for min_len in (0, 3)  # (eos banned on the first steps, then forced at the cap)
            for h in beam_search(model, src, mask, beam_size=3, n_best=3, max_len_a=1.0,
                                 max_len_b=4, min_len=min_len)]
    return greedy, [[h.tokens for h in s] for s in hyps], [h.score for s in hyps for h in s]


class Counting:
    """Counts the calls that each graph serves."""

    def __init__(self, graphs: ExportedDecoding):
        self.calls: dict[str, int] = {}
        self.runner = graphs.runner

    def __call__(self, kind: str, group: int = 1):
        run = self.runner(kind, group)
        name = kind if kind != "beam" else f"beam{group}"

        def counted(inputs, run=run):
            self.calls[name] = self.calls.get(name, 0) + 1
            return run(inputs)

        return None if run is None else counted


def graph_calls(package: Path) -> set[str]:
    """The ATen and oneDNN functions a package's C++ wrapper calls."""
    with zipfile.ZipFile(package) as archive:
        code = "".join(archive.read(name).decode() for name in archive.namelist()
                       if name.endswith("wrapper.cpp"))
    return set(re.findall(r"aoti_torch_cpu_(\w+?)\(", code))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(eager float32 random DIFF model, its AOT copy, the graphs' directory): weights frozen
    into the graphs (the default on CPUs other than Intel's)."""
    eager = random_model("diff", vocab=200).float()  # beam 3 graph: the choice by blocks
    directory = tmp_path_factory.mktemp("aot")
    aot = aot_decoding(eager, cache_dir=directory, frozen=True)
    assert aot.decode.__self__.frozen
    return eager, aot, directory


def assert_searches_equal(aot, eager, batches) -> ExportedDecoding:
    """``aot``'s searches of ``batches`` give ``eager``'s, every graph serving some; -> them."""
    graphs = aot.decode.__self__
    counting = graphs.runner = Counting(graphs)
    for shape in batches:
        src = random_batch(**shape)
        with torch.inference_mode():
            got, want = searches(aot, src), searches(eager, src)
        assert got[:2] == want[:2]
        assert got[2] == pytest.approx(want[2], abs=1e-4)
    assert graphs.failed is None
    assert set(counting.calls) == {"start", "step", "beam3"}
    return graphs


def test_aot_searches_equal_eager(models):
    eager, aot = models[:2]
    graphs = assert_searches_equal(aot, eager, BATCHES)
    assert sorted(p.name for p in graphs.directory.iterdir()) == [
        "beam3.pt2", "start.pt2", "step.pt2"]
    if torch.backends.mkldnn.is_available():  # frozen weights, packed: oneDNN's products
        for package in graphs.directory.iterdir():
            calls = graph_calls(package)
            assert "_linear_pointwise" in calls and not calls & {"mm_out", "addmm_out"}


@pytest.mark.parametrize(("precision", "configs"), [("bf16", FROZEN), ("none", {"freezing": True})])
def test_frozen_graphs_are_compiled_without_autograd(tmp_path, monkeypatch, precision, configs):
    """Inductor freezes a graph's weights only where autograd is off (it silently compiled the
    bf16 graphs unfrozen before); unfrozen graphs take inductor's defaults."""
    model = random_model("standard", vocab=200).float().inference_copy()
    if precision == "bf16":
        model = apply_quantization(model, "bf16")
    compiled = []

    def compile_package(program, package_path, inductor_configs):
        compiled.append((torch.is_grad_enabled(), inductor_configs))
        Path(package_path).touch()

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_package)
    for frozen in (True, False):
        exported.build_package(model, "step", precision, tmp_path / f"{frozen}.pt2",
                               frozen=frozen)
    assert compiled == [(False, configs), (False, {})]


def test_int8_aot_searches_equal_eager_int8(tmp_path):
    """``--int8 --aot``: every linear layer int8 with activations quantised per row inside the
    graphs, the same searches as the same model decoded eagerly."""
    eager = int8_rows(random_model("standard", vocab=200, seed=3).float())
    aot = aot_decoding(eager, "int8", cache_dir=tmp_path)
    assert_searches_equal(aot, eager, BATCHES[:2])
    assert model_key(aot, "int8") != model_key(aot, "none")


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """(eager float32 random standard-attention model, its AOT copy): weights as graph inputs,
    torch's own products (MKL's; the default on Intel CPUs)."""
    eager = random_model("standard", seed=2).float()
    aot = aot_decoding(eager, cache_dir=tmp_path_factory.mktemp("aot-standard"), frozen=False)
    assert not aot.decode.__self__.frozen
    return eager, aot


@pytest.mark.parametrize("kind", ["diff", "standard"])
@pytest.mark.parametrize("batch", [5, 1])
def test_step_logits_match_eager_from_an_empty_cache_on(models, standard, kind, batch):
    """Every step of a batch, the first (nothing cached) included, against eager decoding."""
    eager, aot = models[:2] if kind == "diff" else standard
    src = random_batch(batch=batch, seed=7)
    mask = src != 0
    tokens = torch.randint(4, 40, (batch, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        caches = [model.start_cache(src, mask) for model in (aot, eager)]
        for t in range(tokens.shape[1]):
            got, want = (model.decode(tokens[:, t:t + 1], None, mask, cache)
                         for model, cache in zip((aot, eager), caches, strict=True))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(caches[0]) == len(caches[1]) == tokens.shape[1]
    assert set(aot.decode.__self__.runners) >= {"start", "step"}


def test_bf16_graphs_hold_packed_weights_and_match_eager_bf16(tmp_path):
    """``--bf16 --aot``: the weights frozen into the graphs (each product then oneDNN's or
    inductor's own kernel on a weight it packed, never ATen's on the plain weight), every
    step's logits those of eager bf16 decoding to bf16's precision."""
    eager = apply_quantization(random_model("standard", seed=4).float(), "bf16")
    aot = aot_decoding(eager, "bf16", cache_dir=tmp_path)
    src = random_batch(batch=5, seed=8)
    mask = src != 0
    tokens = torch.randint(4, 40, (5, 4), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        caches = [model.start_cache(src, mask) for model in (aot, eager)]
        for t in range(tokens.shape[1]):
            got, want = (model.decode(tokens[:, t:t + 1], None, mask, cache).float()
                         for model, cache in zip((aot, eager), caches, strict=True))
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    graphs = aot.decode.__self__
    assert graphs.frozen and graphs.failed is None and set(graphs.runners) == {"start", "step"}
    assert not graph_calls(graphs.directory / "step.pt2") & {"mm_out", "addmm_out"}


def test_packages_are_reused_by_a_later_run_and_keyed_by_the_weights(models, monkeypatch):
    eager, aot, directory = models
    src = random_batch(batch=4, seed=5)
    with torch.inference_mode():
        want = searches(aot, src)

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(exported, "build_package", no_build)
    again = aot_decoding(eager, cache_dir=directory, frozen=True)  # as a new process would
    with torch.inference_mode():
        assert searches(again, src)[:2] == want[:2]
    assert again.decode.__self__.failed is None
    other = random_model("diff", seed=1).float().inference_copy()
    assert model_key(other, "none") != model_key(aot, "none")
    assert model_key(aot, "bf16") != model_key(aot, "none")
    assert model_key(aot, "none", frozen=True) != model_key(aot, "none")


def test_failed_build_warns_once_and_decodes_eagerly(tmp_path, monkeypatch, caplog):
    eager = random_model("standard").float()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(exported, "build_package", broken)
    aot = aot_decoding(eager, cache_dir=tmp_path)
    src = random_batch(batch=4, seed=5)
    with caplog.at_level(logging.WARNING, logger="seq2seq_diff"):
        got = searches(aot, src)
    want = searches(eager, src)
    assert got[:2] == want[:2] and len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "ahead-of-time compiling failed (no working C++ compiler); decoding eagerly"]


def test_aot_takes_float_cpu_models_only():
    with pytest.raises(ValueError, match="not an int8"):
        aot_decoding(quantize_int8(random_model("diff").float()))


def test_translate_cli_aot_gives_the_same_lines(model_dir, tmp_path, english, monkeypatch):
    monkeypatch.setenv(exported.CACHE_ENV, str(tmp_path / "aot"))
    outputs = cli_translations(model_dir, tmp_path, english[:12], 1, [], ["--aot"])
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 13
    assert sorted(p.name for p in (tmp_path / "aot").glob("*/*.pt2")) == ["start.pt2",
                                                                         "step.pt2"]


def test_aot_with_pack_compile_or_a_gpu_is_one_clear_error(model, tokenizer, model_dir, capsys):
    from seq2seq_diff.cli import main

    int8 = Translator(model, tokenizer, aot=True, quantize="int8")  # int8 per row in the graphs
    assert isinstance(int8.model.output_proj, Int8Linear)
    with pytest.raises(ConfigError, match="not cuda"):
        Translator(model, tokenizer, aot=True, device="cuda")
    for flag, message in (("--pack", "drop --pack, or drop --aot"),
                          ("--compile", "not allowed with argument")):
        assert main(["translate", "--model", str(model_dir), "--aot", flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and message in err[-1]
