"""int8 with activations quantised per row (``quantize.Int8Linear``, ``quantize.int8_rows``)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, random_model
from torch import nn

from seq2seq_diff.quantize import Int8Linear, int8_rows
from seq2seq_diff.search import greedy_search

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The formula: per-channel int8 weights, per-row int8 inputs, exact integer products."""
    w = linear.weight.detach().double()
    w_scale = w.abs().amax(1) / 127
    w_q = (w / w_scale[:, None]).round()
    rows = x.reshape(-1, x.shape[-1]).double()
    x_scale = rows.abs().amax(1, keepdim=True) / 127
    x_q = (rows / x_scale).round()
    y = (x_q @ w_q.t()) * x_scale * w_scale + linear.bias.detach().double()
    return y.view(*x.shape[:-1], -1)


def test_int8_linear_is_the_formula_and_close_to_float():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    got = Int8Linear(linear)(x)
    assert got.shape == (3, 7, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(linear, x), rtol=1e-5, atol=1e-5)
    want = linear(x)
    assert (got - want).norm() / want.norm() < 0.02  # int8 rounding, both sides
    assert Int8Linear(linear).weight_int8.dtype == torch.int8


def test_a_row_does_not_depend_on_the_rows_beside_it():
    """One scale per row: a sentence's int8 translation is the same alone or in any batch
    (PyTorch's dynamic quantisation scales the whole batch at once)."""
    torch.manual_seed(1)
    layer = Int8Linear(nn.Linear(64, 32, bias=False))
    x = torch.randn(8, 64)
    x[3] *= 50  # a row with a far larger range than the others
    batched = layer(x)
    for i in range(8):
        assert torch.equal(layer(x[i : i + 1]), batched[i : i + 1])
    model = int8_rows(random_model("diff").float())
    src = random_batch(6, seed=3)
    with torch.inference_mode():
        together = greedy_search(model, src, src != 0)
        alone = [greedy_search(model, src[i : i + 1], src[i : i + 1] != 0)[0] for i in range(6)]
    assert together == alone


def test_int8_rows_converts_every_linear_of_a_copy():
    model = random_model("standard").float()
    converted = int8_rows(model)
    assert not any(isinstance(m, nn.Linear) for m in converted.modules())
    assert isinstance(converted.output_proj, Int8Linear)  # the tied projection too, untied
    assert any(isinstance(m, nn.Linear) for m in model.modules())  # the model is untouched
    src = random_batch(4, seed=2)
    with torch.inference_mode():
        got = converted.decode(torch.full((4, 1), 1), converted.encode(src, src != 0), src != 0)
        want = model.decode(torch.full((4, 1), 1), model.encode(src, src != 0), src != 0)
    assert (got - want).norm() / want.norm() < 0.05
