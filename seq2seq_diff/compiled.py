"""Decoding steps through ``torch.compile``: one compiled graph per search kind, every shape.

A CPU decoding step of the small model runs about 330 PyTorch ops, and paying for each one's
dispatch (Python, argument checks, a fresh output) is a third of a greedy step at d_model 256
(BENCHMARKS.md, eighth session). Compiled, inductor fuses the element-wise work (norms, rotary,
softmax, the cache copy) into a few C++ kernels and calls the matrix products directly, so a step
costs its arithmetic and little else.

``compile_decoding(model)`` returns an inference copy (``Seq2SeqTransformer.inference_copy``)
whose ``decode`` runs

* every one-position step in which every size is at least 2 (rows, sources, source positions,
  cached positions) through ``torch.compile(dynamic=True, fullgraph=True)``, with duck sizing
  off, so one graph serves every number of rows, source length and step: Dynamo would
  specialise a size of 1 and recompile later. Before a greedy step (one row per source) the
  self-attention caches apply any reorder and make room for the new position
  (``DecoderCache.reserve``): the graph writes it in place. Before a beam step every cache
  takes its rows by one shared index (``DecoderCache.index_rows``): the graph gathers them and
  appends in one kernel. Either way steps before and after a finished sentence leaves see the
  same cache state;
* the rest eagerly: each batch's first two steps (an empty cache, then one cached position),
  its last sentence alone, a source of one token.

Greedy search and beam search (one graph per beam size: the K beams of a source share its
cross-attention keys) each compile once per process: about 50 s on 2 CPU cores, 30 s once
inductor's on-disk cache holds the kernels (Dynamo's tracing is redone every time). Greedy steps
then run 1.1-1.6× faster on a real book, beam-5 steps 1.05-1.14× (float32) to 1.26-1.4× (bf16
on AMX): it pays on long runs, not on a page (BENCHMARKS.md, ninth and tenth sessions). float32
and bf16 (``--bf16``: autocast is traced into the graph) compile; int8 dynamic quantisation and the
oneDNN-packed weights do not (their opaque weights are outside what Dynamo traces). float32
products call the same GEMM library as eager PyTorch (MKL, on input-major weights). bf16 weights
on a CPU are frozen into the graph instead, and inductor times its own C++ GEMM kernels (AMX
tiles) against oneDNN's for each product once, at compile time, keeping the faster: greedy
steps 1.2-1.35× faster again at d_model 256 and 1.05-1.3× at 512, for a longer compile. Beam
steps gained 1.01-1.04× from it, not worth doubling their compile time: they keep the weights
as graph inputs. If compiling fails (no C++ compiler, an unsupported op), decoding warns once and
goes on eagerly: the same results.

``CompiledOrEager`` is the same fallback for training's compiled loss (``model.compile``).
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from seq2seq_diff.model import DecoderCache, Seq2SeqTransformer

logger = logging.getLogger(__name__)


# Graphs kept per compiled function: ``decode`` is one code object for every model in the
# process, and each model shape, precision and search kind is a graph of it (Dynamo's default of
# 8 would send a benchmark's ninth variant back to eager).
RECOMPILE_LIMIT = 64


def _tracing_settings(frozen: bool = False) -> tuple[tuple[object, str, object], ...]:
    """(config module, name, value) for one graph over all shapes: distinct sizes get distinct
    symbols even when equal (without this, a step whose self and cross caches both hold 32 rows
    ties the two, and the next step, where they differ, recompiles); room for many graphs.
    ``frozen``: inductor's ``freezing``, which Dynamo reads while tracing (``FROZEN``)."""
    from torch._inductor import config as inductor_config
    from torch.fx.experimental import _config as fx_config

    settings = ((fx_config, "use_duck_shape", False),
                (torch._dynamo.config, "recompile_limit", RECOMPILE_LIMIT))
    return settings + ((inductor_config, "freezing", True),) if frozen else settings


# Inductor options of a frozen graph: the weights become constants of the graph (Dynamo then
# guards on each parameter's identity), so inductor may choose, by timing each product once, its
# own C++ GEMM kernels (AMX for bf16) over the library's. The timings are not printed.
FROZEN = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
          "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def _call_with(settings, fn, *args):
    """``fn(*args)`` with ``settings`` in force (Dynamo reads them when it traces). Set and
    restored by hand: their ``patch`` context managers cost 0.15 ms a step."""
    saved = [getattr(module, name) for module, name, _ in settings]
    for module, name, value in settings:
        setattr(module, name, value)
    try:
        return fn(*args)
    finally:
        for (module, name, _), value in zip(settings, saved, strict=True):
            setattr(module, name, value)


def first_line(error: Exception) -> str:
    """The first line of a compile error, for a one-line warning."""
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


class CompiledOrEager:
    """``torch.compile(fn)``, or ``fn`` itself from the first call whose compile fails (no C++
    compiler, an unsupported op): one warning naming ``what``, then eager, the same results.

    Dynamo raises while tracing or compiling, before the graph runs; ``fn`` must have no graph
    break before a failing part (training's encoder/decoder is one graph).
    """

    def __init__(self, fn: Callable[..., Tensor], what: str):
        self.eager, self.what = fn, what
        self.compiled = torch.compile(fn)
        self.failed: str | None = None

    def __call__(self, *args: Tensor) -> Tensor:
        if self.failed is None:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as error:
                self.failed = first_line(error)
                logger.warning("torch.compile of %s failed (%s); running it eagerly", self.what,
                               self.failed)
        return self.eager(*args)


class CompiledDecode:
    """``Seq2SeqTransformer.decode`` with its incremental steps compiled (module docstring)."""

    def __init__(self, model: Seq2SeqTransformer, frozen: bool = False,
                 frozen_beams: bool = False):
        self.eager = types.MethodType(type(model).decode, model)  # the class's eager decode
        self.compiled = torch.compile(self.eager, dynamic=True, fullgraph=True)
        self.settings = _tracing_settings()
        self.failed: str | None = None  # why compiling failed; then every step runs eagerly
        # ``frozen``: steps whose rows each have a source of their own (greedy search) run a
        # graph with the weights frozen in; beam steps (K rows share a source's cross-attention
        # keys) too with ``frozen_beams``, otherwise they keep them as graph inputs: frozen,
        # they ran 1.01-1.04x faster for twice the compile time. Dynamo keeps graphs per code
        # object, and a frozen graph holds one model's weights: a code object of its own keeps
        # them from other models and lets them go with this one.
        self.frozen, self.frozen_beams = frozen, frozen and frozen_beams
        if frozen:
            self.compiled_frozen = torch.compile(_own_code(model), dynamic=True,
                                                 fullgraph=True, options=FROZEN)
            self.settings_frozen = _tracing_settings(frozen=True)

    def __call__(self, tgt_in: Tensor, memory: Tensor | None, src_mask: Tensor,
                 cache: DecoderCache | None = None) -> Tensor:
        if self.failed is not None or not _compilable_step(tgt_in, cache):
            return self.eager(tgt_in, memory, src_mask, cache)
        greedy = cache.cross_attn[0].group == 1  # one row per source, as greedy search has
        if greedy:  # reorders applied now: the step appends in place, into room made now,
            # one position more than it needs: a buffer that the step fills up would be a
            # contiguous view, which the graph specialises for (a second graph)
            cache.reserve(2)
        else:  # beam steps reorder every step: the gather and the append fuse in the graph
            cache.index_rows()
        # The searches' step tokens are a column view of their token history, whose stride and
        # offset change every step; the mask may be a normal tensor or an inference one.
        tgt_in = tgt_in.clone(memory_format=torch.contiguous_format)
        if not src_mask.is_inference():
            src_mask = src_mask.clone()
        settings, step = self.settings, self.compiled
        if self.frozen and (self.frozen_beams or greedy):
            settings, step = self.settings_frozen, self.compiled_frozen
        try:
            return _call_with(settings, step, tgt_in, memory, src_mask, cache)
        except torch._dynamo.exc.TorchDynamoException as error:
            # Raised while tracing or compiling, before the graph ran: the cache is untouched.
            self.failed = first_line(error)
            logger.warning("torch.compile of the decoding step failed (%s); decoding eagerly",
                           self.failed)
            return self.eager(tgt_in, memory, src_mask, cache)


def _compilable_step(tgt_in: Tensor, cache: DecoderCache | None) -> bool:
    """Whether this step runs compiled: one new position after at least two cached ones, at
    least two rows, two sources and two source positions, and no autograd. Every size the graph
    sees is then >= 2, so none is specialised for being 0 or 1 (each would be a graph of its
    own); the few steps outside (each batch's first two, its last sentence alone, a source of
    one token) run eagerly."""
    if cache is None or torch.is_grad_enabled() or tgt_in.shape[1] != 1 or tgt_in.shape[0] < 2:
        return False
    cross = cache.cross_attn[0].k
    return len(cache) >= 2 and cross is not None and cross.shape[0] >= 2 and cross.shape[2] >= 2


def _own_code(model: Seq2SeqTransformer) -> Callable[..., Tensor]:
    """``model.decode`` bound through a copy of the function's code object."""
    fn = type(model).decode
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(copy, model)


def check_plain(model: Seq2SeqTransformer, what: str) -> None:
    """ValueError unless ``model`` has plain float32 or bf16 linear layers (not int8 or
    oneDNN-packed ones, which a graph cannot trace)."""
    for module in model.modules():
        if "quantized" in type(module).__module__ or hasattr(module, "packed"):
            raise ValueError(f"{what} takes a plain float32 or bf16 model, not an int8 or "
                             "oneDNN-packed one")


def compile_decoding(model: Seq2SeqTransformer,
                     device: str | torch.device | None = None) -> Seq2SeqTransformer:
    """An inference copy of ``model`` (float32 or bf16 weights), moved to ``device`` if given,
    whose decoding steps compile.

    bf16 weights on a CPU are frozen into greedy search's graph (``FROZEN``; the graph keeps
    packed copies of them, the module its own for the other steps): with inductor's AMX kernels
    greedy searches ran 1.2-1.35x faster than on oneDNN's (32 rows a step, d_model 256).
    float32 ones are not: frozen, inductor repacks them for oneDNN, 0.9x the MKL products on
    input-major weights (BENCHMARKS.md, eleventh session).
    """
    check_plain(model, "compile_decoding")
    model = model.inference_copy()
    if device is not None:
        model.to(device)
    weight = model.output_proj.weight
    frozen = weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
    if frozen:  # inductor's timing of GEMM kernels reads a deprecated storage attribute
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated",
                                category=UserWarning, module=r"torch\._inductor\.select_algorithm")
    model.decode = CompiledDecode(model, frozen=frozen)
    return model
