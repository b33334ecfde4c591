"""Intrinsic SAID: the Fastfood projection against an explicitly built P, and the layer equation."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.layer import delta_layers
from deltatune.methods.intrinsic import hadamard_matrix, walsh_hadamard


def deltas_of(model, name="default"):
    return {path: layer.deltas[name] for path, layer in delta_layers(model).items() if name in layer.deltas}


@pytest.mark.parametrize("n", [1, 2, 32, 64, 2048])
def test_fast_walsh_hadamard_equals_the_matrix_product(n):
    torch.manual_seed(n)
    v = torch.randn(n, dtype=torch.float64)
    h = hadamard_matrix(n, torch.float64)
    torch.testing.assert_close(walsh_hadamard(v), h @ v)
    torch.testing.assert_close(h @ h, n * torch.eye(n, dtype=torch.float64))  # Hᵀ H = n I


def test_fastfood_projection_equals_an_explicitly_built_p():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9))  # D = 63 entries, d = 20: padded to n = 64
    dt.attach(model, dt.IntrinsicSAIDConfig(dimension=20))
    delta = deltas_of(model)["0"]
    d, n, big_d = 20, delta.padded, 63
    assert n == 64
    h = hadamard_matrix(n, torch.float64)
    b = torch.zeros(n, d, dtype=torch.float64)
    b[torch.arange(d), torch.arange(d)] = delta.signs.double()
    permutation = torch.eye(n, dtype=torch.float64)[delta.permutation.long()]  # (Π v)_i = v_π(i)
    gains = delta.gains.double()
    p = (h @ torch.diag(gains) @ permutation @ h @ b)[:big_d] / (gains.norm() * math.sqrt(big_d))
    theta = torch.randn(d)
    with torch.no_grad():
        delta.theta.copy_(theta)
    torch.testing.assert_close(delta.projection().double().flatten(), p @ theta.double(), rtol=1e-5, atol=1e-6)
    # the scale makes P's columns about unit length
    assert 0.5 < float(p.norm(dim=0).square().mean()) < 1.5


def test_said_layers_share_theta_and_each_scales_its_own_projection(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    dt.attach(model, dt.IntrinsicSAIDConfig(dimension=10))
    found = deltas_of(model)
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == 10 + 2  # θ^d and one λ per layer
    with torch.no_grad():
        found["0"].theta.normal_()
        found["2"].scale.fill_(-0.5)
    x = torch.randn(5, 8)
    first, second = model[0].base, model[2].base
    hidden = torch.tanh(x @ (first.weight + 1.0 * found["0"].projection()).T + first.bias)
    expected = hidden @ (second.weight - 0.5 * found["2"].projection()).T + second.bias
    torch.testing.assert_close(model(x), expected)
    assert found["2"].intrinsic is found["0"].theta
    # the checkpoint holds θ^d and the λs only; the projections are drawn again from the seed
    dt.save(model, tmp_path / "said")
    assert sorted(load_file(tmp_path / "said" / "delta.safetensors")) == ["0.scale", "0.theta", "2.scale"]
    fresh = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    fresh[0].load_state_dict(first.state_dict())
    fresh[2].load_state_dict(second.state_dict())
    dt.load(fresh, tmp_path / "said")
    assert torch.equal(fresh(x), model(x))
    dt.merge(model)
    torch.testing.assert_close(model(x), expected)


def test_did_without_per_layer_scales_and_a_gradient_only_through_theta():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8))
    dt.attach(model, dt.IntrinsicSAIDConfig(dimension=6, per_layer_scale=False, seed=3))
    delta = deltas_of(model)["0"]
    assert [p.numel() for p in dt.trainable_parameters(model)] == [6]
    x = torch.randn(3, 8)
    model(x).sum().backward()
    # ∂L/∂θ = Pᵀ ∂L/∂W, with ∂L/∂W = Σ_rows 1 ⊗ x and P's columns the projections of e_j
    grad_w = torch.ones(3, 8).T @ x
    columns = []
    saved = delta.theta.detach().clone()
    with torch.no_grad():
        for j in range(6):
            delta.theta.copy_(torch.eye(6)[j])
            columns.append(delta.projection().flatten())
        delta.theta.copy_(saved)
    torch.testing.assert_close(delta.theta.grad, torch.stack(columns, dim=1).T @ grad_w.flatten(), rtol=1e-4, atol=1e-6)
    with pytest.raises(dt.ConfigError, match="dimension must be a positive integer"):
        dt.IntrinsicSAIDConfig(dimension=0)


def test_d90_is_the_smallest_dimension_reaching_the_share_of_full_fine_tuning(tmp_path):
    from deltatune.analysis.intrinsic_dim import IntrinsicDimension

    found = IntrinsicDimension("accuracy", 0.8, [(1000, 0.79), (10, 0.5), (100, 0.75)])
    assert found.target == pytest.approx(0.72) and found.d90 == 100
    assert "d90 = 100" in str(found)
    assert IntrinsicDimension("accuracy", 0.8, [(10, 0.5)]).d90 is None
    assert found.plot(tmp_path / "plot.png").stat().st_size > 0


def test_a_forward_without_gradients_reuses_the_difference_only_while_its_inputs_are_unchanged():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8))
    dt.attach(model, dt.IntrinsicSAIDConfig(dimension=6))
    delta = deltas_of(model)["0"]
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)
        delta.theta.add_(1.0)  # an optimizer step changes θ in place
        moved = model(x)
        delta.scale.mul_(2.0)
        scaled = model(x)
    assert not torch.equal(moved, first) and not torch.equal(scaled, moved)
    torch.testing.assert_close(scaled, x @ (model[0].base.weight + 2 * delta.projection()).T + model[0].base.bias)
