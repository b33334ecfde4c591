"""BitFit, LN tuning and top-layer tuning: what they train, and that it equals training the original."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.layer import delta_layers
from zoo import tiny_inputs, tiny_model


def test_bitfit_trains_every_bias_and_its_gradient_is_the_bias_gradient():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", model)
    reference = copy.deepcopy(model)
    biases = {n: p for n, p in reference.named_parameters() if n.endswith("bias")}
    dt.attach(model, dt.BitFitConfig())
    assert dt.count_parameters(model)[0] == sum(p.numel() for p in biases.values())

    model(**inputs).logits.pow(2).mean().backward()
    reference(**inputs).logits.pow(2).mean().backward()
    reference_modules = dict(reference.named_modules())
    for path, layer in delta_layers(model).items():
        torch.testing.assert_close(layer.deltas["default"].delta_bias.grad, reference_modules[path].bias.grad)


def test_bitfit_equation_on_linear_and_layer_norm():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("dense", nn.Linear(5, 4))
    model.add_module("LayerNorm", nn.LayerNorm(4))
    dt.attach(model, dt.BitFitConfig())
    layers = delta_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.deltas["default"].delta_bias.normal_()
    db1, db2 = (layers[p].deltas["default"].delta_bias for p in ("dense", "LayerNorm"))
    x = torch.randn(3, 5)
    dense, norm = model.dense.base, model.LayerNorm.base
    expected = F.layer_norm(x @ dense.weight.T + dense.bias + db1, (4,), norm.weight, norm.bias + db2)
    torch.testing.assert_close(model(x), expected)
    dt.merge(model)
    torch.testing.assert_close(model(x), expected)


def test_bitfit_subset_query_and_intermediate_bias():
    model = tiny_model("bert")
    dt.attach(model, dt.BitFitConfig(targets=["attn.q", "ffn.up"]))
    paths = dt.deltas(model)["default"].paths
    assert paths == [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.self.query", "intermediate.dense")]
    assert dt.count_parameters(model)[0] == 2 * (32 + 64)


def test_bitfit_without_biases_names_add_missing_and_refuses_to_merge_added_biases():
    model = tiny_model("llama")
    with pytest.raises(dt.TargetError, match="add_missing=True"):
        dt.attach(model, dt.BitFitConfig())
    dt.attach(model, dt.BitFitConfig(add_missing=True))
    assert len(dt.deltas(model)["default"].paths) == 2 * 7  # q, k, v, o, gate, up, down per block
    with pytest.raises(dt.ConfigError, match="none to merge into"):
        dt.merge(model)


def test_bitfit_head_is_a_trained_copy_and_a_tied_head_is_not_merged():
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", model)
    dt.attach(model, dt.BitFitConfig(head=True))
    head = delta_layers(model)["lm_head"].deltas["default"]
    assert torch.equal(head.copies["weight"], model.lm_head.base.weight)
    with torch.no_grad():
        head.copies["weight"].add_(0.1)
    before = model.transformer.wte.weight.clone()
    model(**inputs)
    assert torch.equal(model.transformer.wte.weight, before)  # the tied embedding is untouched
    with pytest.raises(dt.ConfigError, match="tied"):
        dt.merge(model)


def test_ln_tuning_trains_every_norm_with_copies():
    model = tiny_model("llama")
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    dt.attach(model, dt.LNTuningConfig())
    assert dt.count_parameters(model)[0] == sum(p.numel() for p in norms.values())
    assert len(dt.deltas(model)["default"].paths) == 2 * 2 + 1  # two per block and the final norm

    torch.manual_seed(0)
    layer_norm = nn.LayerNorm(6)
    model = nn.Sequential()
    model.add_module("ln", layer_norm)
    dt.attach(model, dt.LNTuningConfig(targets=["ln"]))
    copies = delta_layers(model)["ln"].deltas["default"].copies
    with torch.no_grad():
        copies["weight"].normal_()
        copies["bias"].normal_()
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), F.layer_norm(x, (6,), copies["weight"], copies["bias"]))
    assert torch.equal(layer_norm.weight, torch.ones(6))  # the base is untouched
    dt.merge(model)
    torch.testing.assert_close(layer_norm.weight.detach(), copies["weight"].detach())
    dt.unmerge(model)
    assert torch.equal(layer_norm.weight, torch.ones(6))


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_top_layers_trains_every_parameter_of_the_last_k_blocks(arch):
    model = tiny_model(arch)
    stacks = ["model.layers.1."] if arch == "llama" else ["encoder.block.1.", "decoder.block.1."]
    expected = sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(s) for s in stacks))
    dt.attach(model, dt.TopLayersConfig(k=1))
    assert dt.count_parameters(model)[0] == expected
    assert all(any(p.startswith(s) for s in stacks) for p in dt.deltas(model)["default"].paths)


def test_two_active_copies_combine_as_sums_of_their_changes_in_forward_and_merge():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("ln", nn.LayerNorm(4))
    dt.attach(model, dt.LNTuningConfig(targets=["ln"]), "a")
    dt.attach(model, dt.LNTuningConfig(targets=["ln"]), "b")
    deltas = delta_layers(model)["ln"].deltas
    with torch.no_grad():
        deltas["a"].copies["weight"].add_(0.5)
        deltas["b"].copies["bias"].add_(-0.25)
    x = torch.randn(3, 4)
    expected = F.layer_norm(x, (4,), torch.full((4,), 1.5), torch.full((4,), -0.25))
    torch.testing.assert_close(model(x), expected)
    dt.merge(model)
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model.ln.base.weight.detach(), torch.full((4,), 1.5))
    dt.unmerge(model)
    assert torch.equal(model.ln.base.weight, torch.ones(4)) and torch.equal(model.ln.base.bias, torch.zeros(4))


def test_copies_stay_fp32_on_a_bf16_base():
    model = tiny_model("llama").to(torch.bfloat16)
    inputs = tiny_inputs("llama", model)
    before = model(**inputs).logits
    dt.attach(model, dt.TopLayersConfig(k=1))
    assert all(p.dtype == torch.float32 for p in dt.trainable_parameters(model))
    assert torch.equal(model(**inputs).logits, before)


def test_bad_options():
    with pytest.raises(dt.ConfigError, match="k must be a positive integer"):
        dt.TopLayersConfig(k=0)
    with pytest.raises(dt.ConfigError, match="add_missing must be true or false"):
        dt.BitFitConfig(add_missing="yes")
