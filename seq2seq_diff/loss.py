"""Label-smoothed cross-entropy with a one-pass backward.

Per row: loss = (1 − ε)·NLL + ε·mean over the vocabulary of −log p, the definition of
``F.cross_entropy(..., label_smoothing=ε)``. Its gradient with respect to the logits is
softmax − (1 − ε)·onehot − ε/V, which this function writes in three passes over the saved
log-probabilities. Autograd through ``log_softmax``, ``gather`` and ``mean`` makes about
twice as many (N, V) passes, and for a small model those are a fifth of a CPU training step
(BENCHMARKS.md). Tests check values and gradients against ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _SmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        logp = logits.log_softmax(dim=-1)  # (N, V)
        nll = -logp.gather(1, target[:, None]).squeeze(1)  # (N,)
        loss = (1.0 - eps) * nll - eps * logp.mean(dim=-1)
        ctx.save_for_backward(logp, target)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor | None, grad_nll: Tensor | None):
        logp, target = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None
        eps, vocab = ctx.eps, logp.shape[-1]
        g = grad_loss[:, None]  # (N, 1)
        # softmax·g − (ε/V)·g, then − (1 − ε)·g at the targets.
        grad = logp.exp().mul_(g).sub_(g * (eps / vocab))
        grad.scatter_add_(1, target[:, None], g * -(1.0 - eps))
        return grad, None, None


def smoothed_cross_entropy(logits: Tensor, target: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row label-smoothed loss (N,) and NLL (N,, no gradient) of ``logits`` (N, V)."""
    return _SmoothedCrossEntropy.apply(logits, target, eps)
