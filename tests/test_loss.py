"""smoothed_cross_entropy: values and gradients equal torch's label-smoothed cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from seq2seq_diff.loss import smoothed_cross_entropy


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_values_and_gradients_match_f_cross_entropy(eps):
    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64) * 3
    target = torch.randint(0, 11, (7,))
    weights = torch.rand(7, dtype=torch.float64)  # a non-uniform upstream gradient
    ours = logits.clone().requires_grad_()
    loss, nll = smoothed_cross_entropy(ours, target, eps)
    (loss * weights).sum().backward()
    ref = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref, target, label_smoothing=eps, reduction="none")
    (ref_loss * weights).sum().backward()
    assert torch.allclose(loss, ref_loss, atol=1e-12)
    assert torch.allclose(nll, F.cross_entropy(logits, target, reduction="none"), atol=1e-12)
    assert not nll.requires_grad
    assert torch.allclose(ours.grad, ref.grad, atol=1e-12)


def test_gradcheck():
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, 2, 2])
    assert torch.autograd.gradcheck(lambda x: smoothed_cross_entropy(x, target, 0.2)[0], logits)


def test_training_loss_gradient_equals_autograd_through_torch_cross_entropy():
    """The module's loss (only real target rows projected) has the gradient of the plain one."""
    from test_lit_module import _batch, tiny_config

    from seq2seq_diff.lit_module import TranslationModule

    module = TranslationModule(tiny_config(300), label_smoothing=0.1, warmup_steps=1).eval()
    batch = _batch(extra_pad=3)
    module._loss(batch)[0].backward()
    ours = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    logits = module.model(batch["src"], batch["tgt_in"]).flatten(0, 1)
    F.cross_entropy(logits, batch["tgt_out"].flatten(), ignore_index=0, label_smoothing=0.1,
                    reduction="sum").backward()
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert torch.allclose(ours[name], p.grad, atol=1e-5, rtol=1e-4), name
    assert len(ours) == sum(p.grad is not None for p in module.parameters())
