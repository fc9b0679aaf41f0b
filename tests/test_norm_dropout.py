"""RMSNorm and Dropout: the drop-in replacements behave as torch's modules."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from seq2seq_diff.norm_dropout import Dropout, RMSNorm, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_rate_scale_and_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = dropout(x, p)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-4)
    assert abs(y.mean().item() - 1.0) < 0.01  # expectation unchanged


def test_mask_elements_are_independent_of_their_neighbours():
    """Bits come four to a 64-bit draw: neighbours must not be correlated."""
    torch.manual_seed(1)
    m = keep_mask(torch.Size([1_000_000]), 0.5).float()
    for lag in (1, 2, 3, 4, 8):
        corr = torch.corrcoef(torch.stack([m[:-lag], m[lag:]]))[0, 1].item()
        assert abs(corr) < 0.005, (lag, corr)
    by_lane = m.view(-1, 4).mean(0)  # each of the four 16-bit lanes of a draw
    assert torch.all((by_lane - 0.5).abs() < 0.005), by_lane


def test_gradient_is_the_mask_times_the_scale_and_seed_reproduces_it():
    x = torch.randn(3, 50, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.2)
    y.sum().backward()
    kept = (y != 0).float()
    assert abs(kept.mean().item() - 0.8) < 0.15
    assert torch.allclose(x.grad, kept / (1 - round(0.2 * 65536) / 65536))
    assert torch.allclose(y, x * x.grad)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.2), y)


def test_module_is_identity_in_eval_and_edge_probabilities():
    x = torch.randn(4, 8)
    module = Dropout(0.3).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert dropout(x, 1e-9) is x  # below 1/65536 nothing is dropped
    assert module.train()(x).shape == x.shape


def test_rmsnorm_matches_torch_and_keeps_float32_statistics_under_bf16():
    torch.manual_seed(0)
    ours, ref = RMSNorm(16, eps=1e-5), torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())  # same parameter names: checkpoints interchange
    x = torch.randn(3, 5, 16) * 100
    assert torch.allclose(ours(x), ref(x))
    xb = x.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it leaves the fused kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(xb)
    assert y.dtype == torch.bfloat16
    exact = F.rms_norm(xb.float(), (16,), ours.weight, 1e-5)
    assert torch.allclose(y.float(), exact, rtol=1e-2)


def test_compiled_dropout_is_one_graph_with_the_eager_mask_and_gradient():
    """Under torch.compile the mask comes from the same generator draws (an op the graph calls,
    not a graph break), so a seed gives the eager output and gradient."""
    x = torch.randn(6, 40, requires_grad=True)

    def fn(t: torch.Tensor) -> torch.Tensor:  # a transposed view too: the mask is contiguous
        return dropout(t, 0.25) * 2.0 + dropout(t.t(), 0.5).t()

    compiled = torch.compile(fn, fullgraph=True)
    outputs = []
    for run in (fn, compiled):
        torch.manual_seed(11)
        y = run(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        outputs.append((y, grad))
    (y0, g0), (y1, g1) = outputs
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert 0.05 < (g1 == 0).float().mean().item() < 0.2  # both dropped: 1/4 · 1/2 of them
