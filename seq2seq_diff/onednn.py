"""Float32 CPU training products through oneDNN, where MKL takes its AVX2 path.

PyTorch's CPU ``F.linear`` and ``@`` call MKL's sgemm. MKL takes its AVX-512 path on Intel
CPUs only; on an AMD EPYC it runs AVX2 code. oneDNN, bundled with PyTorch, picks its kernels by
instruction set instead. On a 2-core AMD EPYC (Zen 5, full-width AVX-512) the products of a
training step of the small model (960 rows; d_model 256 to 256, 688 and 8,000) ran at about 190
GFLOP/s with MKL and 1.3-2.3x that with oneDNN on the same plain row-major weights, the forward
and both gradients (BENCHMARKS.md, eighteenth session). In float32 those products are three
quarters of a training step.

``use_onednn(model)`` makes every ``nn.Linear`` of a model, and its tied output projection,
compute through oneDNN's linear op on the plain weight: under ``torch.compile`` through the
custom op ``seq2seq_diff::onednn_linear`` (``x @ weight.T``, autograd included, opaque to the
compiler, which calls it from the compiled graph), eagerly through an ``autograd.Function``
with the same gradients (no custom-op dispatch), and without autograd through oneDNN's op
itself, the bias fused. The same function in float32, up to the GEMM's summation order; the
weights and the state dict are untouched. Anything but a float32 CPU product outside autocast
(bf16, a GPU) falls back to ``F.linear``. ``TranslationModule`` (``model.cpu_gemm``) turns it
on for float32 training on CPUs where ``faster_than_mkl``; inference copies are plain again
(``Seq2SeqTransformer``'s ``inference_copy``). ``translate`` packs weights for eager decoding
instead (``seq2seq_diff.packed``), and ``translate --aot`` freezes them into its graphs, which
inductor packs the same way (``seq2seq_diff.exported``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("seq2seq_diff::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` (..., K) @ ``weight`` (N, K)ᵀ -> (..., N): float32 CPU, either operand strided."""
    return _product(x, weight)


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _save(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _gradients(ctx, grad: Tensor, product) -> tuple[Tensor | None, Tensor | None]:
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:  # grad @ weight, the weight's transpose as a strided operand
        grad_x = product(grad, weight.t())
    if ctx.needs_input_grad[1]:  # gradᵀ @ x (N, K)
        rows, inputs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        (m, n), k = rows.shape, inputs.shape[1]
        # oneDNN takes its input operand contiguous: copy the smaller of the gradient (M, N) and
        # the inputs (M, K) plus a transposed result (N, K). For the output projection (N the
        # vocabulary) that is 2-3x faster than copying the gradient (BENCHMARKS.md).
        if m * k + n * k < m * n:
            grad_weight = product(inputs.t(), rows.t()).t()
        else:
            grad_weight = product(rows.t(), inputs.t())
    return grad_x, grad_weight


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    return _gradients(ctx, grad, onednn_linear)


onednn_linear.register_autograd(_backward, setup_context=_save)


class _EagerLinear(torch.autograd.Function):
    """``onednn_linear`` for eager training: the same products and gradients without the
    custom op's Python dispatch (about 0.1 ms a call, 10-20 ms a step of the tiny preset's
    165 products). ``torch.compile`` traces the custom op instead, opaque to it."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _product(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        # (a double backward, under create_graph, needs the products' own gradients)
        return _gradients(ctx, grad, onednn_linear if torch.is_grad_enabled() else _product)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN for a float32 CPU product outside autocast."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")):
        if not torch.is_grad_enabled():  # no autograd: oneDNN's op itself, the bias fused
            return _product(x, weight, bias)
        if torch.compiler.is_compiling():
            out = onednn_linear(x, weight)
        else:
            out = _EagerLinear.apply(x, weight)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose product goes through ``linear`` above; its parameters unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn(model: nn.Module, enabled: bool = True) -> nn.Module:
    """In place: every ``nn.Linear`` of ``model`` computes through oneDNN (``enabled``) or is a
    plain ``nn.Linear`` again, and so does each ``Seq2SeqTransformer``'s tied output projection
    (its ``onednn`` flag). Returns ``model``."""
    for module in model.modules():
        if type(module) in (nn.Linear, OneDNNLinear):  # not other subclasses
            module.__class__ = OneDNNLinear if enabled else nn.Linear
        if hasattr(module, "onednn"):
            module.onednn = enabled
    return model


def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...); "" if
    unknown (another OS, or an architecture without the field)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


@functools.cache
def available() -> bool:
    """Whether this PyTorch build runs oneDNN's float32 linear product on the CPU."""
    try:
        out = onednn_linear(torch.ones(2, 8), torch.ones(4, 8))
        return bool(torch.allclose(out, torch.full((2, 4), 8.0)))
    except (AttributeError, RuntimeError):  # a build without oneDNN or without the op
        return False


def faster_than_mkl() -> bool:
    """Whether oneDNN's float32 products beat MKL's on this CPU by default: everywhere but on
    Intel CPUs, where MKL takes its AVX-512 path (module docstring)."""
    return cpu_vendor() != "GenuineIntel"


def pays() -> bool:
    """Whether float32 CPU training computes through oneDNN by default (``cpu_gemm: auto``)."""
    return faster_than_mkl() and available()
