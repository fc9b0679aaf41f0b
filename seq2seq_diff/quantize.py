"""Low-precision inference: bf16, int8 dynamic quantisation, and simulated k-bit weights.

- ``to_bf16``: every linear weight (the output projection untied first) stored in bfloat16, run
  under bf16 autocast (``precision_context``) as in ``--trainer.precision bf16-mixed`` training:
  matrix products in bf16; the residual stream, norms, softmaxes and search scores stay float32.
  Needs bf16 matrix instructions on a CPU (AVX512-BF16 or AMX; ``cpu_bf16_native``) or a GPU.
- ``quantize_int8``: PyTorch's dynamic quantisation of every ``nn.Linear`` (int8 weights with
  one scale per output channel; activations quantised on the fly), CPU only. The tied output
  projection is untied into its own ``nn.Linear`` first, so the largest matrix product
  (d_model × vocabulary) is quantised too; the embedding stays float32. The activation scale
  is one per tensor, computed over the whole batch, so a sentence's int8 translation can depend
  on the sentences batched with it (float32's does not). Per-row scales (``torch._int_mm``)
  removed that but ran no faster than packed float32 (BENCHMARKS.md, sixth session).
- ``int8_rows``: the int8 of compiled decoding (``translate --int8 --aot``): every
  ``nn.Linear`` becomes an ``Int8Linear``, int8 weights with one scale per output channel and
  activations quantised per row (one scale per token) as part of the graph, products in int32
  (``torch._int_mm``, AMX-INT8 or VNNI through oneDNN). Per row, a sentence's translation does
  not depend on the sentences batched with it. Eagerly, each quantisation is a few more kernels
  a product, which is why plain ``--int8`` keeps PyTorch's dynamic quantisation.
- All of them (and ``seq2seq_diff.packed``) fuse the self-attention Q/K/V and the feed-forward
  w1/w3 projections of their copy first (``Seq2SeqTransformer.fuse_projections``).
- ``fake_quantize_weights``: round every linear weight (and the output projection) to ``bits``
  bits, symmetric per group of ``group_size`` input columns, and store it back in float32: the
  accuracy of k-bit weight-only quantisation, without its kernels (for robustness studies).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import Tensor, nn

from seq2seq_diff.errors import ConfigError
from seq2seq_diff.model import Seq2SeqTransformer
from seq2seq_diff.packed import with_linears

QUANTIZE_CHOICES = ("none", "int8", "bf16")
INT8_LEVELS = 127  # symmetric int8: -127..127


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (one scale per output channel) whose input is quantised
    per row on the fly (symmetric, one scale per row): ``y = (x_q · W_q) · s_x · s_w``, the
    product in int32 by ``torch._int_mm``. Inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()  # (N, K)
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / INT8_LEVELS
        quantized = (weight / scale[:, None]).round().clamp(-INT8_LEVELS, INT8_LEVELS)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # input-major (K, N), as ``torch._int_mm`` takes it
        self.register_buffer("weight_int8", quantized.to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / INT8_LEVELS
        quantized = (rows / scale).round().clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        y = torch._int_mm(quantized, self.weight_int8).float() * scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows"


def cpu_bf16_native() -> bool | None:
    """Whether this CPU has bf16 matrix instructions (oneDNN's own check); None if unknown."""
    try:  # private, so a build without oneDNN may lack it
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def to_bf16(model: Seq2SeqTransformer) -> Seq2SeqTransformer:
    """A copy of ``model`` with bfloat16 linear weights; run it under ``precision_context``.

    Embeddings, norms and the λ vectors keep float32; the tied output projection becomes its own
    bf16 ``nn.Linear``, so no step casts the d_model × vocabulary matrix again.
    """
    model = model.inference_copy()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16),
                                         requires_grad=False)
    return model


def precision_context(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """What a model prepared by ``apply_quantization(model, mode)`` runs under."""
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def quantize_int8(model: Seq2SeqTransformer) -> Seq2SeqTransformer:
    """A copy of ``model`` with int8 dynamically quantised linear layers (CPU inference)."""
    model = model.inference_copy().cpu()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig},
                                                      dtype=torch.qint8)


def int8_rows(model: Seq2SeqTransformer) -> Seq2SeqTransformer:
    """A copy of ``model`` whose linear layers are ``Int8Linear`` (CPU; for compiled decoding,
    ``exported.aot_decoding(model, "int8")``)."""
    return with_linears(model, Int8Linear)


@torch.no_grad()
def fake_quantize_weights(model: Seq2SeqTransformer, bits: int,
                          group_size: int = 64) -> Seq2SeqTransformer:
    """A copy of ``model`` whose linear weights are rounded to ``bits`` bits (stored as float)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    model = copy.deepcopy(model).eval()
    model.untie_output()
    levels = 2 ** (bits - 1) - 1
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            rows, cols = w.shape
            size = group_size if cols % group_size == 0 else cols
            groups = w.reshape(rows, cols // size, size)
            scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
            module.weight.copy_(((groups / scale).round().clamp(-levels, levels) * scale)
                                .view(rows, cols))
    return model


def apply_quantization(model: Seq2SeqTransformer, mode: str) -> Seq2SeqTransformer:
    """'none': the model; 'int8': ``quantize_int8(model)``; 'bf16': ``to_bf16(model)``."""
    if mode == "none":
        return model
    if mode == "int8":
        return quantize_int8(model)
    if mode == "bf16":
        return to_bf16(model)
    raise ConfigError(f"unknown quantization {mode!r}: choose one of "
                      f"{', '.join(QUANTIZE_CHOICES)}")
