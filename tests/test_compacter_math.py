"""Compacter / PHM adapters: W = Σ A_i ⊗ B_i, low-rank B_i, one shared rule, the paper's counts."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.layer import delta_layers
from zoo import tiny_inputs, tiny_model


def projections(model, name="default"):
    return [p for layer in delta_layers(model).values() for p in (layer.deltas[name].adapter.down, layer.deltas[name].adapter.up)]


def test_phm_weight_is_a_sum_of_kronecker_products_with_low_rank_blocks():
    torch.manual_seed(0)
    model = tiny_model("llama")
    dt.attach(model, dt.CompacterConfig(bottleneck=8, phm_dim=4, phm_rank=2))
    down = projections(model)[0]
    rule, s, t = down.rule, down.s, down.t
    blocks = [s[i] @ t[i].T for i in range(4)]
    assert all(torch.linalg.matrix_rank(b) <= 2 for b in blocks)
    expected = sum(torch.kron(rule[i], blocks[i]) for i in range(4))
    torch.testing.assert_close(down.weight(), expected)
    x = torch.randn(3, 32)
    torch.testing.assert_close(down(x), x @ expected.T + down.bias)


def test_the_rule_is_shared_by_every_projection_once():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.CompacterConfig(bottleneck=8))
    rules = {id(p.rule) for p in projections(model)}
    assert len(rules) == 1
    trainable = dt.trainable_parameters(model)
    assert sum(p is projections(model)[0].rule for p in trainable) == 1
    model(**inputs).logits.pow(2).mean().backward()
    assert projections(model)[0].rule.grad.abs().sum() > 0
    model.to(torch.float64)
    assert len({id(p.rule) for p in projections(model)}) == 1 and projections(model)[1].rule.dtype == torch.float64

    dt.attach(model.to(torch.float32), dt.CompacterConfig(bottleneck=8), "second")
    assert projections(model, "second")[0].rule is not projections(model)[0].rule


def test_rule_is_saved_once_and_loads_shared(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.CompacterPlusPlusConfig(bottleneck=8))
    with torch.no_grad():
        projections(model)[0].rule.mul_(3)
    expected = model(**inputs).logits
    dt.save(model, tmp_path / "c")
    keys = [k for k in load_file(str(tmp_path / "c" / "delta.safetensors")) if k.endswith(".rule")]
    assert len(keys) == 1
    fresh = tiny_model("llama")
    dt.load(fresh, tmp_path / "c")
    torch.testing.assert_close(fresh(**inputs).logits, expected, atol=0, rtol=0)
    assert len({id(p.rule) for p in projections(fresh)}) == 1


def compacter_params(layers, d, m, n, r):
    return n ** 3 + layers * (2 * r * (d + m) + d + m)


def test_parameter_counts_match_the_formula_on_a_tiny_model_and_bert_base():
    model = tiny_model("llama")
    d, m, n = 32, 8, 4
    dt.attach(model, dt.CompacterPlusPlusConfig(bottleneck=m, phm_dim=n))
    assert dt.count_parameters(model)[0] == compacter_params(2, d, m, n, 1)

    with torch.device("meta"):
        bert = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2))
    d, n = 768, 4
    m = d // 16
    # Compacter: adapters after attention and FFN in 12 layers
    assert dt.plan(bert, dt.CompacterConfig()).delta_params == compacter_params(24, d, m, n, 1)
    # PHM-Adapter (full B_i): 2·d·m/n per adapter instead of 2·r·(d + m)
    phm = dt.plan(bert, dt.CompacterConfig(phm_rank=None)).delta_params
    assert phm == n ** 3 + 24 * (2 * d * m // n + d + m)


def test_placements_and_identity_with_zero_up():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", model)
    before = model(**inputs).logits
    dt.attach(model, dt.CompacterPlusPlusConfig(bottleneck=8, init="zero_up"), "pp")
    dt.attach(model, dt.CompacterConfig(bottleneck=8), "c")
    assert [p.rsplit(".", 2)[-2:] for p in dt.deltas(model)["pp"].paths] == [["output", "dense"]] * 2
    assert len(dt.deltas(model)["c"].paths) == 4
    dt.activate(model, "pp")
    torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)


def test_sizes_must_divide():
    model = tiny_model("llama")
    with pytest.raises(dt.TargetError, match=r"phm_dim=3 must divide both the hidden size \(32\) and the bottleneck \(8\)"):
        dt.attach(model, dt.CompacterConfig(bottleneck=8, phm_dim=3))
    with pytest.raises(dt.ConfigError, match="phm_rank"):
        dt.CompacterConfig(phm_rank=0)
