"""oneDNN-packed float32 linear layers for CPU inference (``translate``'s default where it pays).

PyTorch's CPU ``F.linear`` calls MKL's sgemm on a plain row-major weight. oneDNN, bundled with
PyTorch, can instead reorder a weight once into its blocked layout, so every later product reads
it in cache-friendly tiles. Decoding multiplies a few dozen rows by each weight per step, where
the layout matters most: on this project's 2-core AMD EPYC the d_model × 8,000 output projection
of 32 rows takes 0.70 ms packed against 1.51 ms with MKL, and greedy and beam-5 decoding of the
small model run 1.1-1.3× faster with every linear layer packed (BENCHMARKS.md). CTranslate2 uses
the same oneDNN sgemm on this CPU. MKL takes its AVX2 path there; on Intel CPUs it takes its
AVX-512 path, and on a 2-core Xeon (Emerald Rapids) packing made decoding slower instead, up
to 25% with greedy search (ninth session): ``packing_pays`` says whether this CPU packs by
default.

``pack_linears`` returns a copy of a model whose ``nn.Linear`` layers (the tied output projection
untied first, the self-attention and feed-forward input projections fused,
``Seq2SeqTransformer.fuse_projections``) are ``PackedLinear``: same function, same float32
arithmetic up to the summation order of the GEMM. ``translate --bf16`` packs its bfloat16
weights the same way (``quantize.to_bf16``, then ``pack_linears``): bf16 products as autocast's
``F.linear`` computes them, greedy decoding 1.14-1.25× and beam 5 1.04-1.09× faster on the
Zen 5 EPYC (nineteenth session). Inference only: a packed weight is an opaque
oneDNN tensor without autograd, and ``copy.deepcopy`` of a packed model gives a plain (fused)
model back.

Where weights are not packed, ``store_input_major`` keeps each linear weight (out, in) in
column-major storage instead: ``F.linear`` multiplies by its transpose, which is then a plain
row-major (in, out) matrix, and MKL's sgemm runs the few-row products of decoding 1.1-2× faster
on it than on the transposed operand of the usual layout (8-32 rows; level from about 64 rows
up; whole greedy searches up to 1.1×: tenth session, BENCHMARKS.md). The same values, the same
function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from seq2seq_diff.model import Seq2SeqTransformer
from seq2seq_diff.onednn import faster_than_mkl

# oneDNN picks the blocked layout for an expected number of rows; every hint from 32 rows up gave
# the same speed for 32 to 960 rows (decoding steps to encoder batches), a hint of 1 was slower.
ROWS_HINT = 64


@functools.cache
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build can pack and run oneDNN linear weights of ``dtype`` (float32
    or bfloat16) on this CPU."""
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8, dtype=dtype),
                                                         ROWS_HINT)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), weight, None,
                                                 "none", [], "")
        return bool(torch.allclose(out.float(), torch.full((2, 4), 8.0)))
    except (AttributeError, RuntimeError):  # a build without oneDNN or these ops, or a CPU
        return False  # without what oneDNN's bfloat16 kernels need


@functools.cache
def packing_pays() -> bool:
    """Whether ``Translator`` packs float32 CPU weights by default: where packing is available
    and MKL, torch's default GEMM, does not take its AVX-512 path (Intel CPUs; see above)."""
    return packing_available() and faster_than_mkl()


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight reordered once into oneDNN's blocked layout (float32 or
    bfloat16, CPU). A bfloat16 layer takes its input in bfloat16 (cast if need be) and returns
    bfloat16, as ``F.linear`` under bf16 autocast does (``translate --bf16``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight
        if weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
            raise ValueError("PackedLinear takes a float32 or bfloat16 CPU nn.Linear, got "
                             f"{weight.dtype} on {weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = weight.dtype
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach().to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features), in the weight's dtype."""
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias,
                                                  "none", [], "")

    def unpacked(self) -> nn.Linear:
        """The plain ``nn.Linear`` again (its weight in the usual row-major layout)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.packed.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        # An opaque oneDNN tensor has no storage to copy: a copy of a packed model is a plain
        # one, which quantize_int8, to_bf16 and pack_linears (all copying first) start from.
        return self.unpacked()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed=oneDNN")


@torch.no_grad()
def store_input_major(model: nn.Module) -> nn.Module:
    """Keep every ``nn.Linear`` weight of ``model`` (an inference copy) in column-major storage,
    in place (module docstring); weights already stored so are left alone. Returns ``model``.

    A copy keeps the layout (``copy.deepcopy``, ``.to(dtype)`` and ``.to(device)`` preserve
    strides); ``fuse_projections`` makes row-major weights again, so store after fusing.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_contiguous():
            weight = module.weight
            module.weight = nn.Parameter(weight.detach().t().contiguous().t(),
                                         requires_grad=weight.requires_grad)
    return model


def with_linears(model: Seq2SeqTransformer,
                 make: Callable[[nn.Linear], nn.Module]) -> Seq2SeqTransformer:
    """A CPU inference copy of ``model`` (``inference_copy``: projections fused, the output
    projection untied) with every ``nn.Linear`` layer replaced by ``make(layer)``."""
    model = model.inference_copy().cpu()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))
    return model


def pack_linears(model: Seq2SeqTransformer) -> Seq2SeqTransformer:
    """A CPU copy of ``model`` (float32, or with ``quantize.to_bf16``'s bfloat16 linear weights)
    for inference with every linear layer a ``PackedLinear``."""
    return with_linears(model, PackedLinear)
