"""KronA checked against its equation: h = W0 x + s·(A ⊗ B) x, without forming A ⊗ B."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.layer import delta_layers
from deltatune.methods.krona import kronecker_apply
from zoo import tiny_inputs, tiny_model


def one_layer(module):
    model = nn.Sequential()
    model.add_module("q_proj", module)
    return model


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3), (4, 5)), ((1, 6), (7, 1)), ((3, 3), (3, 3))])
def test_reshape_identity_equals_torch_kron(a_shape, b_shape):
    torch.manual_seed(0)
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    x = torch.randn(2, 3, a_shape[1] * b_shape[1])
    torch.testing.assert_close(kronecker_apply(a, b, x), x @ torch.kron(a, b).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_krona_equation_and_merge(conv1d):
    torch.manual_seed(0)
    layer = Conv1D(12, 10) if conv1d else nn.Linear(10, 12)  # 10 in, 12 out either way
    model = one_layer(layer)
    w0 = (layer.weight.T if conv1d else layer.weight).detach().clone()
    b0 = layer.bias.detach().clone()
    dt.attach(model, dt.KronAConfig(a_shape=(3, 2), scale=0.5, targets=["q_proj"]))
    delta = delta_layers(model)["q_proj"].deltas["default"]
    assert delta.A.shape == (3, 2) and delta.B.shape == (4, 5)
    with torch.no_grad():
        delta.B.normal_()
    x = torch.randn(4, 10)
    expected = x @ (w0 + 0.5 * torch.kron(delta.A, delta.B)).T + b0
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    dt.merge(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_zero_b_at_init_and_automatic_factor_shapes():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    before = model(**inputs).logits
    dt.attach(model, dt.KronAConfig())
    assert torch.equal(model(**inputs).logits, before)
    q = delta_layers(model)["model.layers.0.self_attn.q_proj"].deltas["default"]
    v = delta_layers(model)["model.layers.0.self_attn.v_proj"].deltas["default"]
    assert q.A.shape == (4, 4) and q.B.shape == (8, 8)     # 32 × 32: divisors nearest √32
    assert v.A.shape == (4, 4) and v.B.shape == (4, 8)     # 16 out (2 kv heads of 8) × 32 in
    per_block = (16 + 64) + (16 + 32)
    assert dt.count_parameters(model)[0] == 2 * per_block  # a1·a2 + b1·b2 per layer


def test_factor_shape_that_does_not_divide_is_named():
    model = one_layer(nn.Linear(10, 12))
    with pytest.raises(dt.TargetError, match=r"does not divide q_proj's weight \(12 out × 10 in\)"):
        dt.attach(model, dt.KronAConfig(a_shape=(5, 2), targets=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="a_shape must be two positive integers"):
        dt.KronAConfig(a_shape=(0, 2))


def test_krona_res_adds_a_scaled_kronecker_branch_beside_the_ffn():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.KronAResConfig(scale=0.5))
    layers = delta_layers(model)
    writer = "model.layers.0.mlp.down_proj"
    reader = "model.layers.0.mlp.up_proj"
    delta = layers[writer].deltas["default"]
    with torch.no_grad():
        delta.B.normal_()
    seen = {}
    hooks = [
        layers[reader].register_forward_hook(lambda m, a, r: seen.__setitem__("x", a[0])),
        layers[writer].register_forward_hook(lambda m, a, r: seen.update(down_in=a[0], out=r)),
    ]
    model(**inputs)
    for h in hooks:
        h.remove()
    expected = layers[writer].base(seen["down_in"]) + 0.5 * seen["x"] @ torch.kron(delta.A, delta.B).T
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
    assert delta.scale.requires_grad
    with pytest.raises(dt.ConfigError, match="cannot be merged"):
        dt.merge(model)
