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
    return x * torch.where(keep_mask(x.shape, p, x.device), scale, 0.0).to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the cheaper CPU mask of ``dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
