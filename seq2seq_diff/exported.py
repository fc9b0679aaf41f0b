"""Decoding through AOTInductor: graphs compiled once per model, saved, and loaded in seconds.

``torch.compile`` (``seq2seq_diff.compiled``) traces and compiles in every process (about 50 s
on 2 CPU cores) and every compiled step still pays Dynamo's guards and inductor's Python wrapper
(0.35 of a 1.5 ms greedy step, BENCHMARKS.md, thirteenth session). Here ``torch.export`` and
AOTInductor compile the same model code into a shared library, packaged (``.pt2``) under a key of
the model's weights, config and precision, the torch version, the CPU's instruction set and the
model code itself: the first use builds it (tens of seconds a graph), every later process loads
it, and a call runs C++ with no guards. Like converting a model for CTranslate2, once.

``aot_decoding(model)`` returns an inference copy whose searches run three kinds of graph:

* ``start``: the encoder and every cross-attention's keys and values (``start_cache``);
* ``step``: one position for rows with a source each (greedy search, sampling, beam search's
  first step), every cached length from an empty cache on: the self-attention caches are
  buffers with room (``DecoderCache.reserve``) which the graph writes in place. A graph's sizes
  are its inputs' shapes, so the cached length comes in as the length of ``positions``;
* ``beam K``: a whole beam-search step after the first (``Seq2SeqTransformer.best_extensions``)
  for rows that share their source's cross-attention keys K at a time, on self-attention
  caches kept in place (``DecoderCache.keep_in_place``): beam reorders gather only each row's
  lineage (the buffer row of each cached position), the graph writes the new position in place
  and its attention kernels read the keys and values through the lineage, so no step copies
  the cache. It decodes and chooses each sentence's best 2K extensions
  (``seq2seq_diff.selection``: from the row's log-sum-exp and the maxima of blocks of logits,
  never writing a score per token), returning them and the new lineage. One graph per beam
  size.

Each graph serves every number of rows and sources and every source length from 2 tokens up
to a cap (``source_cap``: 100 for the encoder, where attention changes kernel with the length);
the rest runs eagerly: sources of one token or longer than the cap, calls under autograd.
float32, bf16 (``--bf16``, autocast traced into the graph) and int8 (``--int8``:
``quantize.int8_rows``, each product's activations quantised per row inside the graph, products by
``torch._int_mm``) on the CPU. bf16 graphs, and float32 ones on CPUs other than Intel's, hold
their weights frozen as constants (inductor's ``freezing``, which works only where autograd is
off: the graphs are compiled under ``no_grad``): inductor reorders each weight once into
oneDNN's blocked layout, as ``translate`` packs them for eager decoding (``seq2seq_diff.packed``),
and bf16 graphs also time inductor's own GEMM kernels (AMX) against oneDNN's, as ``compiled``
does for greedy steps. On Intel CPUs float32 graphs call MKL's sgemm on the weights as given,
which takes its AVX-512 path there. If building fails (no C++ compiler, an unsupported op),
decoding warns once and goes on eagerly: the same results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from seq2seq_diff import __version__
from seq2seq_diff.attention import FIRST_CAPACITY
from seq2seq_diff.compiled import FROZEN, check_plain, first_line
from seq2seq_diff.model import DecoderCache, Seq2SeqTransformer
from seq2seq_diff.onednn import pays
from seq2seq_diff.quantize import precision_context
from seq2seq_diff.selection import beam_candidates, best_extensions

logger = logging.getLogger(__name__)

CACHE_ENV = "SEQ2SEQ_DIFF_AOT_CACHE"  # where packages are kept (default ~/.cache/seq2seq_diff/aot)

# Largest sizes a graph takes (rows, source tokens, cached positions); beyond them, eagerly.
MAX_ROWS, MAX_SOURCE, MAX_POSITIONS = 1 << 16, 1 << 13, 1 << 13

# Modules whose code the graphs are made of: a change to any of them makes new packages.
_CODE_FILES = ("model.py", "attention.py", "layers.py", "norm_dropout.py", "selection.py",
               "quantize.py", "exported.py")


def default_cache_dir() -> Path:
    """``$SEQ2SEQ_DIFF_AOT_CACHE``, else ``$XDG_CACHE_HOME/seq2seq_diff/aot`` (~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "seq2seq_diff" / "aot"


def model_key(model: Seq2SeqTransformer, precision: str, frozen: bool = False) -> str:
    """A digest of everything a package's code depends on (module docstring)."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        digest.update((here / name).read_bytes())
    digest.update(json.dumps([__version__, torch.__version__, precision, frozen,
                              torch.backends.cpu.get_cpu_capability(),
                              model.config.to_dict()], default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# The functions exported: plain tensors in, plain tensors out, the caches rebuilt inside


def _self_caches(cache: DecoderCache, keys: list[Tensor], values: list[Tensor],
                 length: int) -> None:
    for kv, k, v in zip(cache.self_attn, keys, values, strict=True):
        kv._k, kv._v, kv._length = k, v, length


def _cross_caches(cache: DecoderCache, keys: list[Tensor], values: list[Tensor],
                  group: int = 1) -> None:
    for kv, k, v in zip(cache.cross_attn, keys, values, strict=True):
        kv.set(k, v)
        kv.group = group


class _Start(nn.Module):
    """(src, src_mask) -> every decoder layer's cross-attention keys, then values."""

    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_mask: Tensor) -> list[Tensor]:
        cache = Seq2SeqTransformer.start_cache(self.model, src, src_mask)
        return [c.k for c in cache.cross_attn] + [c.v for c in cache.cross_attn]


class _Step(nn.Module):
    """One position for rows with a source each, written in place into buffers with room;
    ``positions`` (L,): its length is the number of cached positions. -> logits (B, 1, V)."""

    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, src_mask: Tensor, positions: Tensor, self_k: list[Tensor],
                self_v: list[Tensor], cross_k: list[Tensor], cross_v: list[Tensor]) -> Tensor:
        # the buffers have room for the new position: no branch to grow them
        torch._check(positions.shape[0] < self_k[0].shape[2])
        cache = DecoderCache(len(self_k))
        _self_caches(cache, self_k, self_v, positions.shape[0])
        _cross_caches(cache, cross_k, cross_v)
        return Seq2SeqTransformer.decode(self.model, tokens, None, src_mask, cache)


class _BeamStep(nn.Module):
    """One beam-search step for rows sharing their source ``group`` at a time, on caches kept
    in place (``DecoderCache.keep_in_place``): ``lineage`` (B, L) gives the buffer row of each
    cached position of each row, and row i's new position is written into buffer row i.
    -> each source's best extensions (``Seq2SeqTransformer.best_extensions``: scores,
    indices) and the new lineage (B, L + 1)."""

    def __init__(self, model: Seq2SeqTransformer, group: int):
        super().__init__()
        self.model, self.group = model, group

    def forward(self, tokens: Tensor, src_mask: Tensor, scores: Tensor, ban_eos: Tensor,
                only_eos: Tensor, lineage: Tensor, self_k: list[Tensor], self_v: list[Tensor],
                cross_k: list[Tensor], cross_v: list[Tensor]) -> list[Tensor]:
        # the buffers have room for the new position (and a row for each row): no branch to grow
        torch._check(lineage.shape[1] < self_k[0].shape[2])
        cache = DecoderCache(len(self_k))
        _self_caches(cache, self_k, self_v, lineage.shape[1])
        for kv in cache.self_attn:
            kv._pending = lineage
        _cross_caches(cache, cross_k, cross_v, self.group)
        logits = Seq2SeqTransformer.decode(self.model, tokens, None, src_mask, cache)[:, -1]
        # the choice traced with the decoder: one pass over its logits, no score per token
        top = best_extensions(logits, scores, ban_eos, only_eos, self.group,
                              beam_candidates(self.group, self.model.config), self.model.config)
        return [*top, cache.self_attn[0]._pending]


# Float32 graphs frozen: inductor packs each weight for oneDNN. Timing its own GEMM kernels
# against oneDNN's as well (max_autotune, as bf16 does) was no faster (BENCHMARKS.md).
_FROZEN_FLOAT32 = {"freezing": True}

# Sizes of the dummy batch each graph is traced on. Inductor times its GEMM kernels for these
# sizes (bf16), so they are a batch's typical ones, not tiny; all distinct, or export would
# trace two of them as one symbol: sources, source tokens, positions cached, then (beam) sources
# left after one finished.
_SOURCES, _SOURCE_TOKENS, _POSITIONS, _BEAM_SOURCES = 24, 29, 13, 8


def _examples(model: Seq2SeqTransformer, precision: str, group: int = 1):
    """Inputs of the start graph and of a step graph (``group`` beams a source), from an eager
    search's state on a dummy batch (``_SOURCES``): a greedy step after ``_POSITIONS`` steps
    (buffers with room), or a beam step after 5, with one sentence of ``_BEAM_SOURCES`` just
    dropped (the caches hold its rows until the step takes the others')."""
    device = model.embed.weight.device
    config = model.config
    sources = _SOURCES if group == 1 else _BEAM_SOURCES
    src = torch.randint(4, config.vocab_size, (sources, _SOURCE_TOKENS), device=device)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    tokens = torch.full((sources, 1), config.bos_id, device=device)
    with torch.inference_mode(), precision_context(precision, device):
        cache = Seq2SeqTransformer.start_cache(model, src, src_mask)
        if group == 1:
            for _ in range(_POSITIONS):
                Seq2SeqTransformer.decode(model, tokens, None, src_mask, cache)
            cache.reserve(4)
            inputs = (tokens, src_mask, torch.zeros(len(cache), device=device))
        else:
            Seq2SeqTransformer.decode(model, tokens, None, src_mask, cache)
            beams = torch.arange(sources, device=device).repeat_interleave(group)
            cache.share_cross(group)
            cache.reorder_self(beams)
            src_mask, tokens = src_mask[beams], tokens[beams]
            for _ in range(4):
                cache.keep_in_place(1)
                Seq2SeqTransformer.decode(model, tokens, None, src_mask, cache)
                cache.reorder_self(torch.randperm(len(beams), device=device))
            keep = torch.arange((sources - 1) * group, device=device)
            cache.reorder(keep)
            scores = -torch.rand(len(keep), device=device)
            only_eos = torch.arange(len(keep), device=device) == 0
            inputs = (tokens[keep], src_mask[keep], scores, torch.zeros_like(only_eos), only_eos,
                      cache.keep_in_place(4))
        keys = [c._k for c in cache.self_attn]
        values = [c._v for c in cache.self_attn]
        cross_k = [c.k for c in cache.cross_attn]
        cross_v = [c.v for c in cache.cross_attn]
    # (copies made outside inference mode: export takes no inference tensors)
    step = tuple(x.clone() for x in inputs) + tuple(
        [x.clone() for x in xs] for xs in (keys, values, cross_k, cross_v))
    return (src.clone(), torch.ones_like(src, dtype=torch.bool)), step


def source_cap(model: Seq2SeqTransformer, queries: int | None) -> int:
    """Longest source a graph takes, with ``queries`` query rows per source in each attention
    (None: the encoder's, as many as source tokens). Differential attention materialises its
    maps up to ``max_explicit_scores`` query-key pairs and fuses beyond, a branch on the length
    that a graph fixes (so does standard attention on the CPU); longer sources run eagerly."""
    caps = [math.isqrt(m.max_explicit_scores) if queries is None
            else m.max_explicit_scores // queries
            for m in model.modules() if hasattr(m, "max_explicit_scores")]
    return min([MAX_SOURCE, *caps])


def _dynamic_shapes(kind: str, model: Seq2SeqTransformer, group: int = 1):
    Dim = torch.export.Dim
    layers = len(model.decoder_layers)
    rows = Dim("rows", min=1, max=MAX_ROWS)
    if kind == "start":
        source = Dim("source", min=2, max=source_cap(model, None))
        return ({0: rows, 1: source}, {0: rows, 1: source})
    source = Dim("source", min=2, max=source_cap(model, group))
    cross = [{0: rows, 2: source}] * layers
    if kind == "step":
        positions = Dim("positions", min=0, max=MAX_POSITIONS - 2)
        buffer = [{0: rows, 2: Dim("capacity", min=3, max=MAX_POSITIONS)}] * layers
        return ({0: rows}, {0: rows, 1: source}, {0: positions}, buffer, buffer, cross, cross)
    sources = Dim("sources", min=1, max=MAX_ROWS // group)
    beams = group * sources
    lineage = {0: beams, 1: Dim("positions", min=1, max=MAX_POSITIONS - 1)}
    buffer = [{0: Dim("buffer_rows", min=1, max=MAX_ROWS),
               2: Dim("capacity", min=3, max=MAX_POSITIONS)}] * layers
    cross = [{0: sources, 2: source}] * layers
    return ({0: beams}, {0: beams, 1: source}, {0: beams}, {0: beams}, {0: beams}, lineage,
            buffer, buffer, cross, cross)


def build_package(model: Seq2SeqTransformer, kind: str, precision: str, path: Path,
                  group: int = 1, frozen: bool = False) -> None:
    """Export graph ``kind`` ("start", "step" or "beam") of ``model`` and compile it into the
    AOTInductor package ``path`` (written whole, then moved into place); ``frozen``: its
    weights frozen into the graph as constants (``aot_decoding``)."""
    # Built from a clean state: a search calls this from under inference mode and autocast.
    with torch.inference_mode(False), torch.autocast(model.embed.weight.device.type,
                                                     enabled=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        _build(model, kind, precision, path, group, frozen)


def _build(model: Seq2SeqTransformer, kind: str, precision: str, path: Path, group: int,
           frozen: bool) -> None:
    start_inputs, step_inputs = _examples(model, precision, group)
    if kind == "start":
        module, inputs = _Start(model), start_inputs
    elif kind == "step":
        module, inputs = _Step(model), step_inputs
    else:
        module, inputs = _BeamStep(model, group), step_inputs
    device = model.embed.weight.device
    shapes = _dynamic_shapes(kind, model, group)
    with torch.no_grad(), precision_context(precision, device):
        program = torch.export.export(module.eval(), inputs, dynamic_shapes=shapes)
        # Autocast is applied while the graph is lowered to ATen ops, so lower it under it.
        program = program.run_decompositions()
    configs = {}  # (a copy: inductor adds its own options to the dict it is given)
    if frozen:
        configs = dict(FROZEN if precision == "bf16" else _FROZEN_FLOAT32)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (inductor freezes a graph's weights only where autograd is off)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad():
        part = Path(scratch) / path.name
        torch._inductor.aoti_compile_and_package(program, package_path=str(part),
                                                 inductor_configs=configs)
        os.replace(part, path)


# ---------------------------------------------------------------------------------------------
# Running the graphs


class ExportedDecoding:
    """The graphs of one model, built or loaded on first use, and the calls that route each
    search step to one (module docstring)."""

    def __init__(self, model: Seq2SeqTransformer, precision: str, cache_dir: Path,
                 frozen: bool = False):
        self.model, self.precision, self.frozen = model, precision, frozen
        self.eager_start = types.MethodType(Seq2SeqTransformer.start_cache, model)
        self.eager_decode = types.MethodType(Seq2SeqTransformer.decode, model)
        self.eager_extensions = types.MethodType(Seq2SeqTransformer.best_extensions, model)
        self.directory = cache_dir / model_key(model, precision, frozen)
        self.runners: dict[str, object] = {}
        self.failed: str | None = None  # why building failed; then everything runs eagerly
        self.positions = torch.empty(MAX_POSITIONS, device=model.embed.weight.device)
        self.source_caps = {None: source_cap(model, None)}  # longest source, by graph

    def source_cap(self, group: int | None) -> int:
        """``source_cap`` of the model for ``group`` query rows a source, computed once."""
        if group not in self.source_caps:
            self.source_caps[group] = source_cap(self.model, group)
        return self.source_caps[group]

    def runner(self, kind: str, group: int = 1):
        """Graph ``kind`` (beam: for ``group`` beams), loaded or built; None once any failed."""
        name = kind if kind != "beam" else f"beam{group}"
        if name in self.runners or self.failed is not None:
            return self.runners.get(name)
        path = self.directory / f"{name}.pt2"
        try:
            if not path.exists():
                began = time.perf_counter()
                logger.info("compiling the %s graph ahead of time (once per model) into %s",
                            name, path)
                build_package(self.model, kind, self.precision, path, group, self.frozen)
                logger.info("compiled the %s graph in %.0f s", name, time.perf_counter() - began)
            with warnings.catch_warnings():  # torch's own pytree, deprecated inside torch
                warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
                loaded = torch._inductor.aoti_load_package(str(path))
        except Exception as error:  # noqa: BLE001 - any failure to build or load: eagerly
            self.failed = first_line(error)
            logger.warning("ahead-of-time compiling failed (%s); decoding eagerly", self.failed)
            return None
        self.runners[name] = loaded.loader.boxed_run
        return self.runners[name]

    def start_cache(self, src: Tensor, src_mask: Tensor) -> DecoderCache:
        run = None
        if _sizes_fit(src.shape[0], src.shape[1], self.source_cap(None)) \
                and not torch.is_grad_enabled():
            run = self.runner("start")
        if run is None:
            return self.eager_start(src, src_mask)
        layers = len(self.model.decoder_layers)
        out = run([src.contiguous(), src_mask.contiguous()])
        cache = DecoderCache(layers)
        _cross_caches(cache, out[:layers], out[layers:])
        return cache

    def decode(self, tgt_in: Tensor, memory: Tensor | None, src_mask: Tensor,
               cache: DecoderCache | None = None) -> Tensor:
        run = None
        if self._routable(tgt_in, cache, group=1):
            run = self.runner("step")
        if run is None:
            return self.eager_decode(tgt_in, memory, src_mask, cache)
        selfs, cross = cache.self_attn, cache.cross_attn
        if selfs[0]._k is None:  # in place, into room made now
            _empty_buffers(selfs, cross[0], capacity=FIRST_CAPACITY)
        else:
            cache.reserve(2)  # two more: a full buffer would be a view of another layout
        logits = run([tgt_in.contiguous(), src_mask.contiguous(), self.positions[: len(cache)],
                      *[c._k for c in selfs], *[c._v for c in selfs], *[c.k for c in cross],
                      *[c.v for c in cross]])[0]
        for c in selfs:
            c._length += 1
        return logits

    def best_extensions(self, tgt_in: Tensor, src_mask: Tensor, cache: DecoderCache,
                        scores: Tensor, ban_eos: Tensor, only_eos: Tensor, width: int,
                        count: int) -> tuple[Tensor, Tensor]:
        run = None
        if (width > 1 and count == beam_candidates(width, self.model.config)
                and scores.dtype == torch.float32 and self._routable(tgt_in, cache, width)):
            run = self.runner("beam", width)
        if run is None:  # (beam search's first step: the step graph, through ``decode``)
            return self.eager_extensions(tgt_in, src_mask, cache, scores, ban_eos, only_eos,
                                         width, count)
        selfs, cross = cache.self_attn, cache.cross_attn
        lineage = cache.keep_in_place(1)  # (the buffers grow here, by doubling, if full)
        out = run([tgt_in.contiguous(), src_mask.contiguous(), scores.contiguous(),
                   ban_eos.contiguous(), only_eos.contiguous(), lineage, *[c._k for c in selfs],
                   *[c._v for c in selfs], *[c.k for c in cross], *[c.v for c in cross]])
        for c in selfs:  # (their buffers written in place)
            c._pending, c._length = out[2], c._length + 1
        return out[0], out[1]

    def _routable(self, tgt_in: Tensor, cache: DecoderCache | None, group: int) -> bool:
        """Whether a step of rows sharing their source ``group`` at a time can run a graph."""
        return (_routable(tgt_in, cache) and cache.cross_attn[0].group == group
                and cache.cross_attn[0].k.shape[2] <= self.source_cap(group))


def _sizes_fit(rows: int, source: int, cap: int = MAX_SOURCE) -> bool:
    return 1 <= rows <= MAX_ROWS and 2 <= source <= cap


def _routable(tgt_in: Tensor, cache: DecoderCache | None) -> bool:
    """Whether a step runs a graph: one new position, a cache holding the cross-attention keys,
    no autograd, every size within the graphs' ranges (source tokens from 2, ``MAX_*``)."""
    if cache is None or torch.is_grad_enabled() or tgt_in.shape[1] != 1:
        return False
    cross = cache.cross_attn[0]
    if cross.k is None or len(cache) > MAX_POSITIONS - 4:
        return False
    group = cross.group
    if group > 1 and len(cache) < 1:
        return False  # (beam search shares the keys after its first step, never before)
    return _sizes_fit(tgt_in.shape[0], cross.k.shape[2])


def _empty_buffers(selfs, cross, capacity: int) -> None:
    """Self-attention buffers with room and nothing cached, laid out as the cross-attention
    keys and values are (an empty cache's first step then runs the step graph too)."""
    k, v = cross.k, cross.v
    for c in selfs:
        c._k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
        c._v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
        c._length = 0


def aot_decoding(model: Seq2SeqTransformer, precision: str = "none",
                 cache_dir: str | Path | None = None,
                 frozen: bool | None = None) -> Seq2SeqTransformer:
    """An inference copy of ``model`` (float32 or bf16 weights, or ``quantize.Int8Linear``
    layers; CPU) whose searches run ahead-of-time compiled graphs, built on first use into
    ``cache_dir`` (default ``default_cache_dir()``) and reused by every later process (module
    docstring). ``precision``: "none", "bf16" or "int8", as the model was prepared
    (``apply_quantization``; ``int8_rows`` for "int8"). ``frozen``: the weights frozen into the
    graphs as constants, which inductor's freezing reorders once into oneDNN's blocked layout
    (``packed``'s, inside the graph); None: bf16 graphs, and float32 ones on CPUs where oneDNN
    beats MKL (``onednn.pays()``: not Intel's, whose MKL takes its AVX-512 path and which then
    run MKL's products on the weights as given)."""
    check_plain(model, "aot_decoding")
    model = model.inference_copy()
    if model.embed.weight.device.type != "cpu":
        raise ValueError("ahead-of-time compiled decoding runs on the CPU")
    if frozen is None:
        frozen = precision == "bf16" or (precision == "none" and pays())
    graphs = ExportedDecoding(model, precision,
                              Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                              frozen)
    model.start_cache = graphs.start_cache
    model.decode = graphs.decode
    model.best_extensions = graphs.best_extensions
    return model
