"""The public API: configs, targets, switching, several deltas, save/load, counts, errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune import layer as layer_module
from deltatune.layer import delta_layers
from zoo import tiny_inputs, tiny_model


# configs ------------------------------------------------------------------------------------


def test_config_by_name_equals_config_class():
    by_name = dt.config("lora", r=16, alpha=32, targets=["q_proj", "v_proj"])
    assert by_name == dt.LoRAConfig(r=16, alpha=32, targets=["q_proj", "v_proj"])
    assert by_name.targets == ("q_proj", "v_proj")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_round_trip(tmp_path, suffix):
    config = dt.LoRAConfig(r=4, dora=True, targets=["attn"], layers="top:2", rank_pattern={"attn.q": 2})
    config.save(tmp_path / f"c{suffix}")
    assert dt.DeltaConfig.load(tmp_path / f"c{suffix}") == config


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dt.config("lorra"), "unknown method 'lorra'.*Did you mean 'lora'"),
        (lambda: dt.config("lora", rank=4), r"unknown option 'rank' for method 'lora'; valid options: .*\br, alpha"),
        (lambda: dt.LoRAConfig(r=0), "r must be a positive integer.*got 0"),
        (lambda: dt.LoRAConfig(r=-3), "got -3"),
        (lambda: dt.LoRAConfig(alpha=0), "alpha must be a positive number"),
        (lambda: dt.LoRAConfig(dropout=1.5), r"dropout must be in \[0, 1\)"),
        (lambda: dt.LoRAConfig(init="xavier"), "init='xavier' is not valid; allowed: default, gaussian, pissa"),
        (lambda: dt.LoRAConfig(targets=["re:("]), "bad regular expression"),
        (lambda: dt.LoRAConfig(layers="middle"), "is not a layer selection"),
        (lambda: dt.LoRAConfig(dora=True, init="pissa"), "cannot be combined"),
        (lambda: dt.LoRAConfig(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    ],
)
def test_bad_configs_fail_when_built(call, message):
    with pytest.raises(dt.ConfigError, match=message):
        call()


# targets ------------------------------------------------------------------------------------


def _paths(model, **kwargs):
    return dt.plan(model, dt.LoRAConfig(**kwargs)).paths


def test_target_language():
    model = tiny_model("llama")
    assert _paths(model, targets=["attn.q"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert _paths(model, targets=["q_proj"]) == _paths(model, targets=["attn.q"])
    assert _paths(model, targets=["self_attn.q_proj"]) == _paths(model, targets=["attn.q"])
    assert _paths(model, targets=["model.layers.*.self_attn.q_proj"]) == _paths(model, targets=["attn.q"])
    assert _paths(model, targets=[r"re:.*\.1\.mlp\..*"]) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert len(_paths(model, targets=["ffn"])) == 6
    assert "lm_head" not in _paths(model, targets=["all-linear"]) and len(_paths(model, targets=["all-linear"])) == 14
    assert _paths(model, targets=["attn.q"], layers="top:1") == ["model.layers.1.self_attn.q_proj"]
    assert _paths(model, targets=["attn.q"], layers=[0]) == ["model.layers.0.self_attn.q_proj"]
    assert _paths(model, targets=["attn.q"], layers="0:1") == ["model.layers.0.self_attn.q_proj"]
    assert len(_paths(model, targets=["attn"], exclude=["attn.k", "attn.v"])) == 4


def test_default_targets_are_all_linear_layers_but_the_head():
    assert _paths(tiny_model("gpt2")) == _paths(tiny_model("gpt2"), targets=["all-linear"])
    assert len(_paths(tiny_model("gpt2"))) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj × 2 blocks
    assert len(_paths(tiny_model("llama"))) == 14


def test_target_matching_nothing_names_closest_modules():
    with pytest.raises(dt.TargetError, match=r"'q_prj' matched no module\. Closest existing names: q_proj"):
        dt.attach(tiny_model("llama"), dt.LoRAConfig(targets=["q_prj"]))
    with pytest.raises(dt.TargetError, match="Roles found in this model: .*attn.qkv"):
        dt.attach(tiny_model("gpt2"), dt.LoRAConfig(targets=["attn.q"]))


def test_target_of_unsupported_kind_is_explained():
    with pytest.raises(dt.TargetError, match="cannot adapt: model.layers.0.self_attn"):
        dt.attach(tiny_model("llama"), dt.LoRAConfig(targets=["self_attn"]))


def test_plan_changes_nothing_and_counts_like_attach():
    model = tiny_model("llama")
    before = [type(m) for m in model.modules()]
    planned = dt.plan(model, dt.LoRAConfig(r=4, targets=["all-linear"]))
    assert [type(m) for m in model.modules()] == before
    dt.attach(model, dt.LoRAConfig(r=4, targets=["all-linear"]))
    assert planned.delta_params == dt.summary(model).trainable
    assert "plan for lora: 14 modules" in str(planned)


# several deltas -----------------------------------------------------------------------------


def test_switching_and_any_subset_active():
    model = tiny_model("llama").eval()
    x = tiny_inputs("llama", model)
    for name in ("a", "b"):
        dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.q"]), name)
        with torch.no_grad():
            for layer in delta_layers(model).values():
                layer.deltas[name].B.normal_()
    out = lambda: model(**x).logits  # noqa: E731
    assert dt.deltas(model)["a"].active and dt.deltas(model)["b"].active
    both = out()
    dt.activate(model, "a")
    only_a = out()
    assert not dt.deltas(model)["b"].active
    dt.activate(model, "b", exclusive=False)
    torch.testing.assert_close(out(), both)
    dt.deactivate(model, "b")
    torch.testing.assert_close(out(), only_a)
    dt.deactivate(model)
    with dt.disabled(model):
        base = out()
    torch.testing.assert_close(out(), base)
    with pytest.raises(dt.ConfigError, match="no delta named 'c'.*'a', 'b'"):
        dt.activate(model, "c")
    with pytest.raises(dt.ConfigError, match="already attached"):
        dt.attach(model, dt.LoRAConfig(), "a")


def test_training_two_deltas_at_once():
    model = tiny_model("llama")
    x = tiny_inputs("llama", model)
    dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.q"]), "a")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.v"]), "b")
    params = dt.trainable_parameters(model)
    assert len(params) == len(dt.trainable_parameters(model, "a")) + len(dt.trainable_parameters(model, "b"))
    model(**x).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in params)


def test_delete_keeps_other_deltas():
    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.q"]), "a")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.q", "attn.v"]), "b")
    dt.delete(model, "b")
    assert list(dt.deltas(model)) == ["a"]
    assert len(delta_layers(model)) == 2


def test_merged_delta_cannot_be_routed_or_switched_away():
    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2), "a")
    dt.attach(model, dt.LoRAConfig(r=2), "b")
    dt.merge(model, "a")
    with pytest.raises(dt.ConfigError, match="unmerge it before routing"):
        with dt.route(model, ["a", "b"]):
            pass
    with pytest.raises(dt.ConfigError, match="unmerge it before switching"):
        dt.activate(model, "b")


# save / load --------------------------------------------------------------------------------


def test_saved_files_are_small_and_self_describing(tmp_path):
    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.q"]))
    (directory,) = dt.save(model, tmp_path / "d")
    meta = json.loads((directory / "delta_config.json").read_text())
    assert meta["config"]["method"] == "lora" and meta["numerics"]["scale"] == "alpha/r"
    assert meta["base"]["architecture"] == "LlamaForCausalLM" and meta["library_version"]
    from safetensors import safe_open

    with safe_open(directory / "delta.safetensors", "pt") as f:
        assert sorted(f.keys()) == [
            "model.layers.0.self_attn.q_proj.A", "model.layers.0.self_attn.q_proj.B",
            "model.layers.1.self_attn.q_proj.A", "model.layers.1.self_attn.q_proj.B"]


def test_several_deltas_save_and_load_together(tmp_path):
    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2), "a")
    dt.attach(model, dt.LoRAConfig(r=3, targets=["ffn"]), "b")
    dt.save(model, tmp_path / "all")
    fresh = tiny_model("llama")
    assert sorted(dt.load(fresh, tmp_path / "all")) == ["a", "b"]
    assert dt.summary(fresh).trainable == dt.summary(model).trainable


def test_loading_onto_another_base_fails_clearly(tmp_path):
    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["attn.q"]))
    dt.save(model, tmp_path / "d")
    with pytest.raises(dt.CheckpointError, match="does not fit this model.*does not exist here.*strict=False"):
        dt.load(tiny_model("gpt2"), tmp_path / "d")
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(dt.CheckpointError, match="other shapes"):
        dt.load(wider, tmp_path / "d")
    mistral = tiny_model("mistral")
    with pytest.raises(dt.CheckpointError, match="made for LlamaForCausalLM, this model is MistralForCausalLM"):
        dt.load(mistral, tmp_path / "d")
    with pytest.warns(UserWarning, match="loading the modules that fit"):
        assert dt.load(mistral, tmp_path / "d", strict=False) == ["default"]


def test_missing_or_corrupt_checkpoints(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(dt.CheckpointError, match="does not exist"):
        dt.load(model, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dt.CheckpointError, match="holds no delta_config.json"):
        dt.load(model, tmp_path / "empty")
    dt.attach(model, dt.LoRAConfig(r=2))
    dt.save(model, tmp_path / "d")
    (tmp_path / "d" / "delta_config.json").write_text("{not json")
    with pytest.raises(dt.CheckpointError, match="not valid JSON"):
        dt.load(tiny_model("llama"), tmp_path / "d")


# counting -----------------------------------------------------------------------------------


def test_opt_6_7b_count_on_meta_device_without_weights():
    config = tf.OPTConfig(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096)
    with torch.device("meta"):
        model = tf.OPTForCausalLM(config)
    dt.attach(model, dt.LoRAConfig(r=16, targets=["q_proj", "v_proj"]))
    summary = dt.summary(model)
    assert summary.headline() == "trainable params: 8,388,608 || all params: 6,666,862,592 || trainable%: 0.1258"
    assert "attn.q       32  4,194,304" in str(summary)


def test_unknown_architecture_works_with_explicit_names():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    dt.attach(model, dt.LoRAConfig(r=2, targets=["0", "2"]))
    assert len(delta_layers(model)) == 2
    dt.attach(model, dt.LoRAConfig(), "other")  # the default, all-linear, needs no anatomy
    assert dt.deltas(model)["other"].paths == ["0", "2"]


def test_two_methods_on_one_model_train_save_and_load_together(tmp_path):
    """LoRA on attention and a Pfeiffer adapter on the FFN: both train, both save, both load."""
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.LoRAConfig(r=4, targets=["attn"]), "lora")
    dt.attach(model, dt.PfeifferConfig(bottleneck=4, init="zero_up"), "adapter")
    dt.activate(model, ["lora", "adapter"])
    params = dt.trainable_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in dt.trainable_parameters(model, ["lora", "adapter"])}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        model(**inputs).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name in ("lora", "adapter"):
        layers = [layer for layer in delta_layers(model).values() if name in layer.deltas]
        assert any(p.abs().sum() > 0 for layer in layers for n, p in layer.deltas[name].named_parameters()
                   if n in ("B", "adapter.up.weight"))
    expected = model(**inputs).logits
    dt.save(model, tmp_path / "both")
    fresh = tiny_model("llama")
    assert sorted(dt.load(fresh, tmp_path / "both")) == ["adapter", "lora"]
    torch.testing.assert_close(fresh(**inputs).logits, expected, atol=0, rtol=0)
    assert {"lora", "adapter"} == {r[0] for r in dt.summary(fresh).rows}


def test_compare_lists_every_method_side_by_side():
    model = tiny_model("llama")
    table = dt.compare(model)
    methods = [row[0] for row in table.rows]
    assert methods == dt.methods()
    lora = next(row for row in table.rows if row[0] == "lora")
    assert lora[2] == dt.plan(model, dt.LoRAConfig()).delta_params and not lora[3]
    text = str(table)
    assert "lora" in text and "houlsby" in text and "% of base" in text
    assert table.markdown().startswith("| method |")
    assert not list(delta_layers(model))  # a dry run


# modules_to_save ------------------------------------------------------------------------------


def test_modules_to_save_trains_a_full_copy_of_a_whole_head(tmp_path):
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", model)
    reference = model(**inputs).logits
    # BertForMaskedLM's cls.predictions.transform holds a dense layer and a LayerNorm
    dt.attach(model, dt.LoRAConfig(r=2, modules_to_save=["predictions.transform"]))
    copied = {p for p, layer in delta_layers(model).items() if type(layer.deltas["default"]).__name__ == "ParameterCopy"}
    assert copied == {"cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "cls.predictions.transform.dense.deltas.default.copies.weight" in trainable
    assert "cls.predictions.transform.LayerNorm.deltas.default.copies.bias" in trainable
    torch.testing.assert_close(model(**inputs).logits, reference)  # a copy starts equal to the module
    with torch.no_grad():
        model.get_submodule("cls.predictions.transform.dense").deltas["default"].copies["weight"].mul_(1.5)
    changed = model(**inputs).logits
    assert not torch.allclose(changed, reference)
    dt.save(model, tmp_path / "delta")
    fresh = tiny_model("bert")
    dt.load(fresh, tmp_path / "delta")
    torch.testing.assert_close(fresh(**inputs).logits, changed)
    dt.detach(model)
    torch.testing.assert_close(model(**inputs).logits, reference)


def test_modules_to_save_that_matches_nothing_names_close_modules():
    with pytest.raises(dt.TargetError, match="lm_hed.*matched no module.*lm_head"):
        dt.attach(tiny_model("llama"), dt.LoRAConfig(modules_to_save=["lm_hed"]))


def test_modules_to_save_on_a_quantized_layer_is_refused():
    pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    dt.quantize(model, "nf4", skip=())
    with pytest.raises(dt.ConfigError, match="modules_to_save: model.layers.0.mlp.down_proj is"):
        dt.attach(model, dt.LoRAConfig(targets=["q_proj"], modules_to_save=["layers.0.mlp.down_proj"]))


def test_mixed_batch_of_several_loras_runs_as_one_gathered_product_equal_to_separate_runs(monkeypatch):
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model, batch=5)
    ranks = {"a": 2, "b": 4, "c": 3}  # different ranks: the stack pads to the largest
    for i, (name, r) in enumerate(ranks.items()):
        dt.attach(model, dt.LoRAConfig(r=r, rslora=i == 1), name, activate=False)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in dt.trainable_parameters(model, name):
                p.normal_(std=0.3)
    dt.attach(model, dt.LoRAConfig(r=2, dora=True), "dora", activate=False)  # not low-rank: gathered apart
    with torch.no_grad():
        for p in dt.trainable_parameters(model, "dora"):
            p.add_(0.1)
    order = ["b", None, "a", "dora", "c"]
    separate = {}
    for name in set(order):
        if name is None:
            with dt.disabled(model):
                separate[name] = model(**inputs).logits
        else:
            dt.activate(model, name)
            separate[name] = model(**inputs).logits
    gathered = []
    original = layer_module._stack_factors

    def spy(factors, *rest):
        gathered.append(set(factors))
        return original(factors, *rest)

    monkeypatch.setattr(layer_module, "_stack_factors", spy)
    with dt.route(model, order):
        mixed = model(**inputs).logits
    assert gathered and all(names == {"a", "b", "c"} for names in gathered)  # DoRA went its own way
    for row, name in enumerate(order):
        torch.testing.assert_close(mixed[row], separate[name][row], atol=1e-5, rtol=1e-5)
