"""FAR: the chosen output features train, the others are the frozen base, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.layer import delta_layers


def one_layer(module):
    model = nn.Sequential()
    model.add_module("fc1", module)
    return model


def test_identity_at_init_and_only_selected_rows_change():
    torch.manual_seed(0)
    layer = nn.Linear(6, 10)
    model = one_layer(layer)
    x = torch.randn(5, 6)
    before = model(x)
    dt.attach(model, dt.FARConfig(fraction=0.3, targets=["fc1"]))
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    delta = delta_layers(model)["fc1"].deltas["default"]
    assert delta.rows.numel() == 3
    optimizer = torch.optim.AdamW(dt.trainable_parameters(model), lr=0.1)
    for _ in range(3):
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model(x)
    frozen = [i for i in range(10) if i not in delta.rows.tolist()]
    base_weight = layer.weight.detach().clone()
    assert torch.equal(after[:, frozen], before[:, frozen])
    assert not torch.allclose(after[:, delta.rows], before[:, delta.rows])
    expected = x @ delta.weight.T + delta.bias
    torch.testing.assert_close(after[:, delta.rows], expected)
    dt.merge(model)
    torch.testing.assert_close(model(x), after)
    assert torch.equal(layer.weight[frozen], base_weight[frozen])  # one dense layer again
    torch.testing.assert_close(layer.weight[delta.rows], delta.weight.detach())


def test_magnitude_picks_the_rows_with_largest_l1_norm():
    layer = nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [5.0], [0.1], [3.0], [-4.0], [0.2]]).expand(6, 4))
    model = one_layer(layer)
    dt.attach(model, dt.FARConfig(fraction=0.5, targets=["fc1"]))
    delta = delta_layers(model)["fc1"].deltas["default"]
    assert delta.rows.tolist() == [1, 3, 4] and delta.bias is None
    assert dt.count_parameters(model)[0] == 3 * 4


@pytest.mark.parametrize("conv1d", [False, True])
def test_gradient_measure_picks_the_rows_the_loss_depends_on(conv1d):
    torch.manual_seed(0)
    layer = Conv1D(8, 5) if conv1d else nn.Linear(5, 8)
    model = one_layer(layer)
    dt.attach(model, dt.FARConfig(fraction=0.25, measure="gradient", targets=["fc1"]))
    delta = delta_layers(model)["fc1"].deltas["default"]
    assert delta.needs_calibration
    batches = [torch.randn(4, 5) for _ in range(3)]
    # the loss reads only features 2 and 6, so only their rows have a gradient
    assert dt.calibrate(model, batches, loss_fn=lambda m, x: m(x)[:, [2, 6]].pow(2).sum()) == 1
    assert delta.rows.tolist() == [2, 6] and not delta.needs_calibration
    assert not layer.weight.requires_grad and layer.weight.grad is None
    dense = layer.weight.T if conv1d else layer.weight
    torch.testing.assert_close(delta.weight.detach(), dense[[2, 6]].detach())


def test_bad_options():
    with pytest.raises(dt.ConfigError, match="fraction"):
        dt.FARConfig(fraction=0)
    with pytest.raises(dt.ConfigError, match="allowed: magnitude, gradient"):
        dt.FARConfig(measure="hessian")
