"""SparseAdapter: masked adapter equation, sparsity, criteria, zeros that stay zero, small files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.layer import delta_layers
from deltatune.methods.sparse_adapter import pack_bits, unpack_bits
from zoo import tiny_inputs, tiny_model


def one_layer(width=16):
    model = nn.Sequential()
    model.add_module("down_proj", nn.Linear(width, width))
    return model


def delta_of(model):
    return delta_layers(model)["down_proj"].deltas["default"]


def test_forward_is_the_adapter_with_masked_weights_and_sparsity_is_per_matrix():
    torch.manual_seed(0)
    model = one_layer()
    dt.attach(model, dt.SparseAdapterConfig(bottleneck=8, sparsity=0.75, targets=["down_proj"]))
    delta = delta_of(model)
    for linear, mask in ((delta.adapter.down, delta.down_mask), (delta.adapter.up, delta.up_mask)):
        assert int((~mask).sum()) == round(0.75 * mask.numel())
        assert torch.count_nonzero(linear.weight[~mask]) == 0
        kept, pruned = linear.weight.abs()[mask], linear.weight.abs()[~mask]
        assert kept.min() >= pruned.max()  # magnitude: the smallest were pruned
    x = torch.randn(3, 16)
    with dt.disabled(model):
        h = model(x)
    a = delta.adapter
    expected = h + F.relu(h @ (a.down.weight * delta.down_mask).T + a.down.bias) @ (a.up.weight * delta.up_mask).T + a.up.bias
    torch.testing.assert_close(model(x), expected)
    assert delta.sparsity() == pytest.approx(0.75)


def test_pruned_weights_stay_zero_through_adamw_with_weight_decay():
    torch.manual_seed(0)
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.SparseAdapterConfig(bottleneck=8, sparsity=0.6))
    optimizer = torch.optim.AdamW(dt.trainable_parameters(model), lr=0.05, weight_decay=0.1)
    for _ in range(3):
        model(**inputs).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for layer in delta_layers(model).values():
        delta = layer.deltas["default"]
        assert torch.count_nonzero(delta.adapter.down.weight[~delta.down_mask]) == 0
        assert torch.count_nonzero(delta.adapter.up.weight[~delta.up_mask]) == 0


def test_snip_prunes_by_weight_times_gradient_via_calibrate():
    torch.manual_seed(0)
    model = one_layer(8)
    dt.attach(model, dt.SparseAdapterConfig(bottleneck=4, sparsity=0.5, criterion="snip", targets=["down_proj"]))
    delta = delta_of(model)
    assert delta.needs_calibration and bool(delta.down_mask.all())  # dense until calibrated
    batches = [torch.randn(5, 8) for _ in range(2)]
    loss = lambda m, x: m(x)[:, :3].sum()  # noqa: E731
    grads = {}
    for x in batches:
        loss(model, x).backward()
    for name in ("down", "up"):
        weight = getattr(delta.adapter, name).weight
        grads[name] = (weight.detach() * weight.grad).abs()
    model.zero_grad()
    assert dt.calibrate(model, batches, loss_fn=loss) == 1
    for name, mask in (("down", delta.down_mask), ("up", delta.up_mask)):
        assert grads[name][mask].min() >= grads[name][~mask].max()
    assert delta.sparsity() == pytest.approx(0.5)


def test_iterative_schedule_reaches_the_target_at_prune_until():
    model = one_layer()
    config = dt.SparseAdapterConfig(bottleneck=8, sparsity=0.8, schedule="iterative", prune_every=5,
                                    prune_until=0.5, targets=["down_proj"])
    dt.attach(model, config)
    delta = delta_of(model)
    assert delta.sparsity() == 0
    seen = []
    for step in range(1, 41):
        delta.after_optimizer_step(step, 40)
        seen.append(delta.sparsity())
    assert seen == sorted(seen)  # pruning only removes
    assert seen[4] == pytest.approx(0.8 * (1 - (1 - 5 / 20) ** 3), abs=0.01)
    assert seen[19] == pytest.approx(0.8, abs=0.01) and seen[-1] == seen[19]


def test_checkpoint_stores_kept_values_and_packed_mask(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.SparseAdapterConfig(bottleneck=32, sparsity=0.9))
    expected = model(**inputs).logits
    dt.save(model, tmp_path / "sparse")
    fresh = tiny_model("llama")
    dt.load(fresh, tmp_path / "sparse")
    torch.testing.assert_close(fresh(**inputs).logits, expected, atol=0, rtol=0)
    for path, layer in delta_layers(fresh).items():
        original = delta_layers(model)[path].deltas["default"]
        assert torch.equal(layer.deltas["default"].down_mask, original.down_mask)

    dense = tiny_model("llama")
    dt.attach(dense, dt.PfeifferConfig(bottleneck=32))
    dt.save(dense, tmp_path / "dense")
    size = lambda d: (tmp_path / d / "delta.safetensors").stat().st_size  # noqa: E731
    assert size("sparse") < 0.25 * size("dense")


def test_bit_packing_round_trips():
    mask = torch.rand(7, 5) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), mask.shape), mask)
    assert pack_bits(mask).numel() == 5  # 35 entries in 5 bytes


def test_bad_options():
    with pytest.raises(dt.ConfigError, match="sparsity"):
        dt.SparseAdapterConfig(sparsity=1.0)
    with pytest.raises(dt.ConfigError, match="allowed: magnitude, snip"):
        dt.SparseAdapterConfig(criterion="random")
    with pytest.raises(dt.ConfigError, match="zero_up"):
        dt.SparseAdapterConfig(init="zero_up")
    with pytest.raises(dt.ConfigError, match="allowed: pfeiffer, houlsby"):
        dt.SparseAdapterConfig(placement="parallel")
