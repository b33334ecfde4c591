"""Weighted combinations of deltas (deltatune.combine): each one against its equation."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.combine import _disjoint_mean, _trim
from deltatune.layer import delta_layers
from zoo import tiny_inputs, tiny_model


def lora_model(*configs):
    """A tiny Llama with one LoRA delta per config ('t0', 't1', ...) with random non-zero factors."""
    model = tiny_model("llama")
    for i, config in enumerate(configs):
        dt.attach(model, config, f"t{i}", activate=False)
        torch.manual_seed(i + 1)
        with torch.no_grad():
            for p in dt.trainable_parameters(model, f"t{i}"):
                p.normal_(std=0.2)
    return model


def delta_weights(model, name):
    return {p: layer.deltas[name].delta_weight() for p, layer in delta_layers(model).items() if name in layer.deltas}


def test_linear_combination_is_the_weighted_sum_of_updates_without_cross_terms():
    model = lora_model(dt.LoRAConfig(r=2, targets=["q_proj", "v_proj"]), dt.LoRAConfig(r=3, alpha=5, targets=["v_proj", "o_proj"]))
    dt.combine(model, {"t0": 0.7, "t1": -0.4}, "mix")
    first, second, mixed = (delta_weights(model, n) for n in ("t0", "t1", "mix"))
    assert set(mixed) == set(first) | set(second)
    for path, update in mixed.items():
        expected = 0.7 * first.get(path, 0) + -0.4 * second.get(path, 0)
        torch.testing.assert_close(update, expected, atol=1e-6, rtol=1e-5)
    assert dt.deltas(model)["mix"].config.r == 5  # ranks add up where both adapt a module


def test_linear_combination_computes_the_weighted_sum_of_outputs():
    model = lora_model(dt.LoRAConfig(r=2), dt.LoRAConfig(r=2))
    inputs = tiny_inputs("llama", model)
    with dt.disabled(model):
        base = model(**inputs).logits
    dt.combine(model, {"t0": 1.0, "t1": 1.0}, "sum", activate=True)
    combined = model(**inputs).logits
    dt.activate(model, ["t0", "t1"])  # both active at once computes W + ΔW_0 + ΔW_1
    torch.testing.assert_close(combined, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(combined, base)


def test_svd_combination_is_the_best_low_rank_approximation():
    model = lora_model(dt.LoRAConfig(r=4, targets=["q_proj"]), dt.LoRAConfig(r=4, targets=["q_proj"]))
    dt.combine(model, {"t0": 0.5, "t1": 0.5}, "full", combination="svd", rank=8)
    dt.combine(model, {"t0": 0.5, "t1": 0.5}, "low", combination="svd", rank=2)
    first, second = delta_weights(model, "t0"), delta_weights(model, "t1")
    for path, update in delta_weights(model, "full").items():
        exact = 0.5 * first[path] + 0.5 * second[path]
        torch.testing.assert_close(update, exact, atol=1e-5, rtol=1e-4)  # rank 8 holds it all
        u, s, vh = torch.linalg.svd(exact)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(delta_weights(model, "low")[path], best, atol=1e-5, rtol=1e-4)


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_entries():
    # the paper's three steps by hand, on two 1×4 task vectors
    first = torch.tensor([[4.0, -1.0, 2.0, 0.5]])
    second = torch.tensor([[-1.0, -3.0, 2.0, -0.2]])
    trimmed = [_trim(first, 0.5), _trim(second, 0.5)]
    torch.testing.assert_close(trimmed[0], torch.tensor([[4.0, 0.0, 2.0, 0.0]]))
    torch.testing.assert_close(trimmed[1], torch.tensor([[0.0, -3.0, 2.0, 0.0]]))
    # signs of the sums: +, -, +, 0; entry 0 and 1 come from one vector each, entry 2 from both
    torch.testing.assert_close(_disjoint_mean(trimmed), torch.tensor([[4.0, -3.0, 2.0, 0.0]]))
    torch.testing.assert_close(_disjoint_mean([first, second]), torch.tensor([[4.0, -2.0, 2.0, 0.5]]))


def test_ties_combination_on_a_model_matches_the_three_steps():
    model = lora_model(dt.LoRAConfig(r=2, targets=["k_proj"]), dt.LoRAConfig(r=2, targets=["k_proj"]))
    dt.combine(model, {"t0": 1.0, "t1": 0.5}, "ties", combination="ties", density=0.3, rank=16)
    first, second = delta_weights(model, "t0"), delta_weights(model, "t1")
    for path, update in delta_weights(model, "ties").items():
        expected = _disjoint_mean([_trim(first[path], 0.3), _trim(0.5 * second[path], 0.3)])
        torch.testing.assert_close(update, expected, atol=1e-5, rtol=1e-4)


def test_dare_keeps_the_density_fraction_rescaled_and_is_unbiased():
    model = lora_model(dt.LoRAConfig(r=2, targets=["q_proj"]))
    dt.combine(model, {"t0": 1.0}, "dense", combination="dare_linear", density=1.0, rank=2)
    original = delta_weights(model, "t0")
    for path, update in delta_weights(model, "dense").items():
        torch.testing.assert_close(update, original[path], atol=1e-5, rtol=1e-4)  # density 1 drops nothing
    samples = []
    for seed in range(200):
        name = f"dare{seed}"
        dt.combine(model, {"t0": 1.0}, name, combination="dare_linear", density=0.5, rank=32, seed=seed)
        samples.append(delta_weights(model, name))
        dt.delete(model, name)
    path = next(iter(original))
    one = samples[0][path]
    kept = one.abs() > 1e-3  # dropped entries come back from the full-rank SVD as float noise
    assert 0.35 < kept.float().mean() < 0.65
    torch.testing.assert_close(one[kept], 2 * original[path][kept], atol=1e-4, rtol=1e-3)
    mean = torch.stack([s[path] for s in samples]).mean(0)
    assert (mean - original[path]).abs().mean() < 0.15 * original[path].abs().mean()


def test_dare_is_reproducible_by_seed():
    model = lora_model(dt.LoRAConfig(r=2, targets=["q_proj"]))
    for name in ("a", "b"):
        dt.combine(model, {"t0": 1.0}, name, combination="dare_ties", density=0.4, seed=3)
    for path, update in delta_weights(model, "a").items():
        assert torch.equal(update, delta_weights(model, "b")[path])


def test_ia3_vectors_combine_linearly():
    model = tiny_model("llama")
    for i in range(2):
        dt.attach(model, dt.IA3Config(), f"t{i}", activate=False)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in dt.trainable_parameters(model, f"t{i}"):
                p.add_(torch.randn_like(p) * 0.3)
    dt.combine(model, {"t0": 0.25, "t1": 0.75}, "mix")
    for path, layer in delta_layers(model).items():
        expected = 0.25 * layer.deltas["t0"].scale + 0.75 * layer.deltas["t1"].scale
        torch.testing.assert_close(layer.deltas["mix"].scale, expected)
        assert layer.deltas["mix"].scale_input == layer.deltas["t0"].scale_input


def test_lora_bias_deltas_add_up():
    model = tiny_model("gpt2")
    for i in range(2):
        dt.attach(model, dt.LoRAConfig(r=2, targets=["c_attn"], bias="targets"), f"t{i}", activate=False)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in dt.trainable_parameters(model, f"t{i}"):
                p.normal_(std=0.1)
    dt.combine(model, {"t0": 2.0, "t1": -1.0}, "mix")
    for layer in delta_layers(model).values():
        expected = 2.0 * layer.deltas["t0"].delta_bias - layer.deltas["t1"].delta_bias
        torch.testing.assert_close(layer.deltas["mix"].delta_bias, expected)


@pytest.mark.parametrize("configs, weights, kwargs, message", [
    ((dt.LoRAConfig(), dt.IA3Config()), {"t0": 1, "t1": 1}, {}, "one method; got ia3, lora"),
    ((dt.LoRAConfig(dora=True),), {"t0": 1}, {}, "DoRA deltas cannot be combined"),
    ((dt.IA3Config(),), {"t0": 1}, {"combination": "svd"}, "combine linearly only"),
    ((dt.LoRAConfig(),), {"t0": 1}, {"combination": "mean"}, "combination='mean' is not valid; allowed: linear"),
    ((dt.LoRAConfig(),), {"t9": 1}, {}, "no delta named 't9'"),
    ((dt.LoRAConfig(),), {"t0": 1}, {"density": 0}, "density must be in"),
    ((dt.HoulsbyConfig(),), {"t0": 1}, {}, "combining 'houlsby' deltas is not implemented"),
])
def test_bad_combinations_are_refused_with_the_reason(configs, weights, kwargs, message):
    model = tiny_model("llama")
    for i, config in enumerate(configs):
        dt.attach(model, config, f"t{i}")
    with pytest.raises(dt.ConfigError, match=message):
        dt.combine(model, weights, "mix", **kwargs)
