"""RMSNorm and dropout tuned for CPU training, drop-in for ``nn.RMSNorm`` and ``nn.Dropout``.

- ``RMSNorm`` normalises in float32 when its input is bf16 under autocast: ``nn.RMSNorm`` would
  otherwise fall back from its fused kernel (input and weight dtypes differ) to a slower path
  with bf16 statistics.
- ``Dropout`` draws its CPU mask from 16-bit random numbers, four per 64-bit draw of the
  generator: ``torch.bernoulli`` spends one draw per element, and on 2 CPU cores that was 15% of
  a training step (BENCHMARKS.md). The drop probability is rounded to a multiple of 1/65536 and
  the kept values are scaled by the exact inverse of the kept share, so the expectation is
  unchanged. The default torch generator is used, so ``seed_everything`` and resumed RNG states
  reproduce it. On GPUs ``F.dropout`` (Philox, fused) is used as is.

  Under ``torch.compile`` the mask comes from the same function, wrapped as the custom op
  ``seq2seq_diff::keep_mask`` that the compiled graph calls: Dynamo cannot trace ``random_``
  (each dropout would break the graph, and a break inside the layer loop sends the whole stack
  back to eager), and inductor's own CPU dropout runs a scalar Philox round per element, 10 ms
  for one FFN activation of the peers batch (BENCHMARKS.md). The multiply by the mask fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` with float32 statistics (and the fused kernel) for bf16 inputs."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or x.dtype == self.weight.dtype:
            return super().forward(x)
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(
            x.dtype)


def keep_mask(shape: torch.Size, p: float, device: torch.device | None = None) -> Tensor:
    """A boolean mask, each element False (dropped) with probability ``round(p·65536)/65536``."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    bits = words.random_(-(2**63), 2**63 - 1).view(torch.int16)[:n]  # uniform over int16
    return bits.view(shape) >= -(2**15) + round(p * _LEVELS)


@torch.library.custom_op("seq2seq_diff::keep_mask", mutates_args=())
def _keep_mask_like(x: Tensor, p: float) -> Tensor:
    """``keep_mask`` of ``x``'s shape, as an op a compiled graph calls (never traces into).

    ``x`` is an input, not just its shape, so that the graph's common-subexpression pass,
    which knows only torch's own random ops, cannot merge the masks of dropouts of different
    tensors; and the partitioner never recomputes a custom op for the backward, so the mask is
    saved.
    """
    return keep_mask(x.shape, p, x.device)


@_keep_mask_like.register_fake
def _(x: Tensor, p: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.bool)  # contiguous, as keep_mask's


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout`` with a cheaper CPU mask (see the module docstring)."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    levels = round(p * _LEVELS)
    if levels == 0:
        return x
    scale = _LEVELS / (_LEVELS - levels)
    if torch.compiler.is_compiling():
        keep = _keep_mask_like(x.detach(), p)
    else:
        keep = keep_mask(x.shape, p, x.device)
    return x * torch.where(keep, scale, 0.0).to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the cheaper CPU mask of ``dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
