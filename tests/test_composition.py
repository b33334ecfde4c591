"""Composition blocks (Stack, Average, Fuse, BatchSplit, Parallel) and AdapterDrop, each checked
against its definition computed by hand on tiny models.

The hand computations run the base model (``dt.disabled``) with forward hooks on the adapted
base modules that replace each one's output h by the block's definition, written with the
adapters' own weights: a serial adapter's change is u(h) = W_up relu(W_down h + b_down) + b_up.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.layer import delta_layers
from zoo import randomize_delta, tiny_inputs, tiny_model

ATOL = 1e-5


def randomize(model, name, seed=0, scale=0.3):
    randomize_delta(model, name, seed, scale)


def with_adapters(arch, names, method=dt.HoulsbyConfig, **options):
    model = tiny_model(arch)
    for seed, name in enumerate(names):
        dt.attach(model, method(bottleneck=4, **options), name)
        randomize(model, name, seed)
    return model


def change(model, name, path, h):
    """u(h) of the serial adapter ``name`` on ``path`` (zero where it is not attached)."""
    layer = delta_layers(model)[path]
    if name not in layer.deltas:
        return torch.zeros_like(h)
    a = layer.deltas[name].adapter
    return F.linear(F.relu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)


def by_hand(model, inputs, output, out="logits"):
    """The base model's output with every adapted layer's output h replaced by output(path, h)."""
    handles = []
    with dt.disabled(model):
        for path, layer in delta_layers(model).items():
            handles.append(layer.base.register_forward_hook(lambda m, args, h, path=path: output(path, h)))
        try:
            with torch.no_grad():
                return getattr(model(**inputs), out)
        finally:
            for handle in handles:
                handle.remove()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# Stack ----------------------------------------------------------------------------------------


def test_stack_runs_serial_adapters_in_order_and_order_matters():
    model = with_adapters("llama", ["lang", "task"])
    inputs = tiny_inputs("llama", model)

    def adapter(name, path, h):
        return h + change(model, name, path, h)

    lang_then_task = by_hand(model, inputs, lambda p, h: adapter("task", p, adapter("lang", p, h)))
    task_then_lang = by_hand(model, inputs, lambda p, h: adapter("lang", p, adapter("task", p, h)))
    dt.activate(model, dt.Stack("lang", "task"))
    torch.testing.assert_close(logits(model, inputs), lang_then_task, atol=ATOL, rtol=0)
    dt.activate(model, dt.Stack("task", "lang"))
    torch.testing.assert_close(logits(model, inputs), task_then_lang, atol=ATOL, rtol=0)
    assert (lang_then_task - task_then_lang).abs().max() > 1e-3
    assert dt.active_block(model) == dt.Stack("task", "lang")


def test_stack_of_lora_and_adapter_on_one_layer():
    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["o_proj"]), "lora")
    randomize(model, "lora", 1)
    dt.attach(model, dt.PfeifferConfig(bottleneck=4, targets=["o_proj"]), "adapter")
    randomize(model, "adapter", 2)
    inputs = tiny_inputs("llama", model)
    layers = delta_layers(model)
    captured = {}

    def capture(module, args, output, path):
        captured[path] = args[0]

    def expected(path, h):
        lora = layers[path].deltas["lora"]
        h = h + lora.scale * F.linear(F.linear(captured[path], lora.A), lora.B)
        return h + change(model, "adapter", path, h)

    hooks = [layer.base.register_forward_pre_hook(lambda m, a, p=path: capture(m, a, None, p))
             for path, layer in layers.items()]
    try:
        hand = by_hand(model, inputs, expected)
    finally:
        for hook in hooks:
            hook.remove()
    dt.activate(model, dt.Stack("lora", "adapter"))
    torch.testing.assert_close(logits(model, inputs), hand, atol=ATOL, rtol=0)


# Average --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, [0.3, -0.9]])
def test_average_is_the_weighted_sum_of_the_children_changes(weights):
    model = with_adapters("bert", ["a", "b"], dt.PfeifferConfig)
    inputs = tiny_inputs("bert", model)
    w = weights or [0.5, 0.5]
    hand = by_hand(model, inputs, lambda p, h: h + w[0] * change(model, "a", p, h) + w[1] * change(model, "b", p, h))
    dt.activate(model, dt.Average("a", "b", weights=weights))
    torch.testing.assert_close(logits(model, inputs), hand, atol=ATOL, rtol=0)
    if weights is None:  # the plain mean of the two adapted outputs
        mean = by_hand(model, inputs, lambda p, h: ((h + change(model, "a", p, h)) + (h + change(model, "b", p, h))) / 2)
        torch.testing.assert_close(logits(model, inputs), mean, atol=ATOL, rtol=0)


# Fuse -----------------------------------------------------------------------------------------


def fused(model, fusion, names, path, h):
    """h + Σᵢ softmaxᵢ(Q(h)·K(zᵢ)) V(zᵢ), zᵢ the adapters' changes, written out."""
    f = delta_layers(model)[path].deltas[fusion]
    z = [change(model, n, path, h) for n in names]
    q = h @ f.query.weight.T + f.query.bias
    scores = torch.stack([(q * (zi @ f.key.weight.T + f.key.bias)).sum(-1) for zi in z], dim=-1)
    alpha = torch.softmax(scores, dim=-1)
    return h + sum(alpha[..., i : i + 1] * (zi @ f.value.weight.T + f.value.bias) for i, zi in enumerate(z))


def with_fusion(arch="bert"):
    model = with_adapters(arch, ["a", "b", "c"], dt.PfeifferConfig)
    dt.attach(model, dt.FusionConfig(adapters=["a", "b", "c"]), "f")
    return model


def test_fusion_starts_with_value_near_identity_and_activates_its_block():
    model = with_fusion()
    assert dt.active_block(model) == dt.Fuse("a", "b", "c", fusion="f")
    paths = dt.deltas(model)["f"].paths
    assert paths == dt.deltas(model)["a"].paths == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    f = delta_layers(model)[paths[0]].deltas["f"]
    torch.testing.assert_close(f.value.weight.diagonal(), torch.ones(32))
    assert (f.value.weight.detach() - torch.eye(32)).abs().max() <= 1e-6
    assert f.query.weight.std() < 0.05 and f.key.bias.abs().max() == 0


def test_fuse_equals_the_attention_formula():
    model = with_fusion()
    randomize(model, "f", 7, scale=0.2)
    inputs = tiny_inputs("bert", model)
    hand = by_hand(model, inputs, lambda p, h: fused(model, "f", ["a", "b", "c"], p, h))
    torch.testing.assert_close(logits(model, inputs), hand, atol=ATOL, rtol=0)


def test_fusion_trains_while_the_fused_adapters_stay_frozen():
    model = with_fusion()
    model.train()
    fusion_params = [p for layer in delta_layers(model).values() for p in layer.deltas["f"].parameters()]
    assert {id(p) for p in dt.trainable_parameters(model)} == {id(p) for p in fusion_params}
    inputs = tiny_inputs("bert", model)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for layer in delta_layers(model).values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.deltas["f"].parameters())
        for name in "abc":
            assert all(not p.requires_grad and p.grad is None for p in layer.deltas[name].parameters())


def test_fusion_saves_and_loads_after_its_adapters(tmp_path):
    model = with_fusion()
    randomize(model, "f", 3, scale=0.2)
    inputs = tiny_inputs("bert", model)
    expected = logits(model, inputs)
    dt.save(model, tmp_path / "adapters", ["a", "b", "c"])
    dt.save(model, tmp_path / "fusion", "f")
    fresh = tiny_model("bert")
    with pytest.raises(dt.ConfigError, match=r"'a', 'b', 'c' are not attached.*before their fusion"):
        dt.load(fresh, tmp_path / "fusion")
    assert not dt.deltas(fresh)
    dt.load(fresh, tmp_path / "adapters")
    assert dt.load(fresh, tmp_path / "fusion") == ["f"]
    assert dt.active_block(fresh) == dt.Fuse("a", "b", "c", fusion="f")
    torch.testing.assert_close(logits(fresh, inputs), expected, atol=0, rtol=0)



def test_a_fusion_saved_with_its_adapters_loads_after_them(tmp_path):
    model = with_adapters("bert", ["a", "b", "c"], dt.PfeifferConfig)
    dt.attach(model, dt.FusionConfig(adapters=["a", "b", "c"]), "_fusion")  # its directory sorts first
    randomize(model, "_fusion", 3, scale=0.2)
    inputs = tiny_inputs("bert", model)
    expected = logits(model, inputs)
    dt.save(model, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir())[0] == "_fusion"
    fresh = tiny_model("bert")
    assert dt.load(fresh, tmp_path / "all") == ["a", "b", "c", "_fusion"]
    dt.activate(fresh, dt.Fuse("a", "b", "c", fusion="_fusion"))
    torch.testing.assert_close(logits(fresh, inputs), expected, atol=0, rtol=0)


def test_fusion_names_missing_adapters_and_runs_only_in_its_block():
    model = with_adapters("bert", ["a", "b"], dt.PfeifferConfig)
    with pytest.raises(dt.ConfigError, match=r"'zz' are not attached"):
        dt.attach(model, dt.FusionConfig(adapters=["a", "zz"]), "f")
    with pytest.raises(dt.ConfigError, match="takes no targets"):
        dt.FusionConfig(adapters=["a"], targets=["ffn.down"])
    dt.attach(model, dt.FusionConfig(adapters=["a"]), "f")
    with pytest.raises(dt.ConfigError, match=r"runs inside its block: dt.activate\(model, dt.Fuse\('a', fusion='f'\)\)"):
        dt.activate(model, ["a", "f"])
    with pytest.raises(dt.ConfigError, match="'f' is a fusion delta"):
        dt.activate(model, dt.Stack("a", "f"))
    with pytest.raises(dt.ConfigError, match=r"Fuse\(..., fusion='b'\): 'b' is a pfeiffer delta, not a fusion"):
        dt.activate(model, dt.Fuse("a", fusion="b"))


# Parallel -------------------------------------------------------------------------------------


def test_parallel_runs_each_adapter_on_its_replica_of_the_batch():
    model = with_adapters("llama", ["a", "b"])
    inputs = tiny_inputs("llama", model)
    separate = []
    for name in ("a", "b"):
        dt.activate(model, name)
        separate.append(logits(model, inputs))
    dt.activate(model, dt.Parallel("a", "b"))
    both = logits(model, inputs)
    batch = inputs["input_ids"].shape[0]
    assert both.shape[0] == 2 * batch
    torch.testing.assert_close(both[:batch], separate[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[batch:], separate[1], atol=ATOL, rtol=0)
    with torch.no_grad():  # labels are replicated with the inputs
        assert model(**inputs, labels=inputs["input_ids"]).loss.isfinite()
    with pytest.raises(dt.ConfigError, match=r"cannot continue from a cache.*dt.route"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with dt.disabled(model):
        assert logits(model, inputs).shape[0] == batch
    dt.activate(model, "a")  # the replicating hook goes with the block
    torch.testing.assert_close(logits(model, inputs), separate[0], atol=0, rtol=0)


def test_parallel_of_stacks():
    model = with_adapters("llama", ["lang", "t1", "t2"])
    inputs = tiny_inputs("llama", model)
    dt.activate(model, dt.Stack("lang", "t2"))
    second = logits(model, inputs)
    dt.activate(model, dt.Parallel(dt.Stack("lang", "t1"), dt.Stack("lang", "t2")))
    torch.testing.assert_close(logits(model, inputs)[2:], second, atol=ATOL, rtol=0)


# BatchSplit -----------------------------------------------------------------------------------


def rows(inputs, start, stop):
    return {k: v[start:stop] for k, v in inputs.items()}


def test_batch_split_slices_equal_separate_runs():
    model = with_adapters("llama", ["a", "b"])
    inputs = tiny_inputs("llama", model, batch=3)
    dt.activate(model, dt.BatchSplit("a", "b", sizes=[1, 2]))
    split = logits(model, inputs)
    dt.activate(model, "a")
    torch.testing.assert_close(split[:1], logits(model, rows(inputs, 0, 1)), atol=ATOL, rtol=0)
    dt.activate(model, "b")
    torch.testing.assert_close(split[1:], logits(model, rows(inputs, 1, 3)), atol=ATOL, rtol=0)
    dt.activate(model, dt.BatchSplit("a", "b", sizes=[2, 2]))
    with pytest.raises(ValueError, match="covers 4 samples but the layer saw a batch of 3 rows"):
        logits(model, inputs)


def test_batch_split_with_beam_search_equals_separate_generation():
    model = with_adapters("llama", ["a", "b"])
    inputs = tiny_inputs("llama", model)
    options = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    expected = []
    for row, name in enumerate(("a", "b")):
        dt.activate(model, name)
        expected.append(model.generate(**rows(inputs, row, row + 1), **options)[0])
    dt.activate(model, dt.BatchSplit("a", "b", sizes=[1, 1]))
    split = model.generate(**inputs, **options)
    for row in range(2):
        assert torch.equal(split[row], expected[row])


def test_parallel_adapters_hand_their_input_over_inside_blocks():
    model = with_adapters("llama", ["p", "q"], dt.ParallelAdapterConfig)
    inputs = tiny_inputs("llama", model)
    separate = []
    for row, name in enumerate(("p", "q")):
        dt.activate(model, name)
        separate.append(logits(model, rows(inputs, row, row + 1)))
    dt.activate(model, dt.BatchSplit("p", "q", sizes=[1, 1]))
    torch.testing.assert_close(logits(model, inputs), torch.cat(separate), atol=ATOL, rtol=0)
    with pytest.raises(dt.ConfigError, match="'p' \\(parallel\\) hands its sublayer's input .* only once in a block"):
        dt.activate(model, dt.BatchSplit("p", dt.Stack("q", "p"), sizes=[1, 1]))
    dt.attach(model, dt.FusionConfig(adapters=["p", "q"]), "f")  # on ffn.down only, not the input taps
    assert dt.deltas(model)["f"].paths == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert logits(model, inputs).isfinite().all()


# Nesting --------------------------------------------------------------------------------------


def test_stack_of_adapter_and_fuse():
    model = with_adapters("bert", ["lang", "a", "b"], dt.PfeifferConfig)
    dt.attach(model, dt.FusionConfig(adapters=["a", "b"]), "f")
    randomize(model, "f", 5, scale=0.2)
    inputs = tiny_inputs("bert", model)

    def expected(path, h):
        h = h + change(model, "lang", path, h)
        return fused(model, "f", ["a", "b"], path, h)

    dt.activate(model, dt.Stack("lang", dt.Fuse("a", "b", fusion="f")))
    torch.testing.assert_close(logits(model, inputs), by_hand(model, inputs, expected), atol=ATOL, rtol=0)


def test_stack_of_adapter_and_batch_split():
    model = with_adapters("llama", ["lang", "a", "b"])
    inputs = tiny_inputs("llama", model)
    dt.activate(model, dt.Stack("lang", dt.BatchSplit("a", "b", sizes=[1, 1])))
    nested = logits(model, inputs)
    for row, name in enumerate(("a", "b")):
        dt.activate(model, dt.Stack("lang", name))
        torch.testing.assert_close(nested[row:row + 1], logits(model, rows(inputs, row, row + 1)), atol=ATOL, rtol=0)


def test_adapters_on_different_layers_leave_the_others_alone():
    model = tiny_model("llama")
    dt.attach(model, dt.PfeifferConfig(bottleneck=4), "ffn")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["q_proj"]), "q")
    randomize(model, "ffn", 0)
    randomize(model, "q", 1)
    inputs = tiny_inputs("llama", model)
    dt.activate(model, ["ffn", "q"])
    plain = logits(model, inputs)
    dt.activate(model, dt.Average("ffn", "q", weights=[1.0, 1.0]))  # each alone on its layers
    torch.testing.assert_close(logits(model, inputs), plain, atol=ATOL, rtol=0)
    assert {p: layer.composition for p, layer in delta_layers(model).items()} == {
        p: dt.Average("ffn", "q", weights=[1.0, 1.0]) for p in delta_layers(model)
    }


# serialisation and errors ---------------------------------------------------------------------


def test_blocks_round_trip_through_json():
    block = dt.Parallel(
        dt.Stack("lang", dt.Fuse("a", dt.Stack("b", "c"), fusion="f")),
        dt.BatchSplit("a", dt.Average("b", "c", weights=[0.25, 0.75]), sizes=[2, 3]),
    )
    data = json.loads(json.dumps(block.to_dict()))
    assert data == {"parallel": [
        {"stack": ["lang", {"fuse": ["a", {"stack": ["b", "c"]}], "fusion": "f"}]},
        {"batch_split": ["a", {"average": ["b", "c"], "weights": [0.25, 0.75]}], "sizes": [2, 3]},
    ]}
    assert dt.Block.from_dict(data) == block
    assert block.names() == ["lang", "a", "b", "c", "f"]


@pytest.mark.parametrize("build,message", [
    (lambda: dt.Stack(), "at least one child"),
    (lambda: dt.BatchSplit("a", "b", sizes=[2]), r"one positive number of samples per child \(2\)"),
    (lambda: dt.BatchSplit("a", "b", sizes=[2, 0]), "positive number"),
    (lambda: dt.Average("a", "b", weights=[1.0]), r"one number per child \(2\)"),
    (lambda: dt.Fuse("a", "b"), "fusion='<name>'"),
    (lambda: dt.Stack("a", dt.Parallel("b", "c")), "Parallel cannot be nested inside Stack"),
    (lambda: dt.Stack("a", 3), "children are delta names or blocks"),
    (lambda: dt.Stack("a b"), "not a delta name"),
    (lambda: dt.Block.from_dict({"stak": ["a"]}), "exactly one of the keys stack, fuse"),
    (lambda: dt.Block.from_dict({"stack": ["a"], "sizes": [1]}), "unknown option 'sizes' for a stack block"),
])
def test_bad_blocks_are_refused_when_built(build, message):
    with pytest.raises(dt.ConfigError, match=message):
        build()


def test_blocks_that_cannot_run_are_refused_with_the_reason():
    model = with_adapters("llama", ["a"])
    with pytest.raises(dt.ConfigError, match=r"no delta named 'nope'.*attached deltas: 'a'"):
        dt.activate(model, dt.Stack("a", "nope"))
    dt.attach(model, dt.IA3Config(), "ia3", activate=False)
    with pytest.raises(dt.ConfigError, match=r"'ia3' \(ia3\) cannot be part of a block: it changes its layer's input"):
        dt.activate(model, dt.Stack("a", "ia3"))
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=2), "prefix", activate=False)
    with pytest.raises(dt.ConfigError, match="wraps a whole module's call"):
        dt.activate(model, dt.Average("a", "prefix"))
    dt.attach(model, dt.LoRAConfig(r=2), "lora")
    dt.merge(model, "lora")
    with pytest.raises(dt.ConfigError, match="'lora' is merged into the weights of .*; unmerge it to compose it"):
        dt.activate(model, dt.Stack("a", "lora"))
    with pytest.raises(dt.ConfigError, match="'lora' is merged into the weights; unmerge it before switching away"):
        dt.activate(model, dt.Stack("a"))
    dt.unmerge(model)
    dt.activate(model, dt.Stack("a", "lora"))
    with pytest.raises(dt.ConfigError, match="composition block .* is active"):
        with dt.route(model, ["a", "lora"]):
            pass
    with pytest.raises(dt.ConfigError, match="cannot be merged"):
        dt.merge(model)


def test_switching_away_from_a_block():
    model = with_adapters("llama", ["a", "b"])
    inputs = tiny_inputs("llama", model)
    with dt.disabled(model):
        base = logits(model, inputs)
    dt.activate(model, dt.Stack("a", "b"))
    stacked = logits(model, inputs)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, inputs), stacked, atol=0, rtol=0)
    dt.deactivate(model, "b")  # the whole block goes off: no half block
    assert dt.active_block(model) is None and not any(i.active for i in dt.deltas(model).values())
    dt.activate(model, dt.Stack("a", "b"))
    dt.detach(model, "b")
    assert dt.active_block(model) is None
    torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)


# AdapterDrop ----------------------------------------------------------------------------------


def copy_of_layer(model, index):
    """A fresh model with the same adapter only in block ``index``."""
    other = tiny_model("llama")
    dt.attach(other, dt.HoulsbyConfig(bottleneck=4, layers=[index]), "a")
    theirs = delta_layers(other)
    with torch.no_grad():
        for path, layer in delta_layers(model).items():
            if path in theirs:
                for mine, copy in zip(layer.deltas["a"].parameters(), theirs[path].deltas["a"].parameters()):
                    copy.copy_(mine)
    return other


def test_adapter_drop_skips_the_chosen_layers_exactly():
    model = with_adapters("llama", ["a"])
    inputs = tiny_inputs("llama", model)
    full = logits(model, inputs)
    dt.adapter_drop(model, "bottom:1")
    torch.testing.assert_close(logits(model, inputs), logits(copy_of_layer(model, 1), inputs), atol=0, rtol=0)
    dt.adapter_drop(model, [1])
    torch.testing.assert_close(logits(model, inputs), logits(copy_of_layer(model, 0), inputs), atol=0, rtol=0)
    dt.adapter_drop(model, None)
    torch.testing.assert_close(logits(model, inputs), full, atol=0, rtol=0)
    with pytest.raises(dt.ConfigError, match="is not a layer selection"):
        dt.adapter_drop(model, "lowest:2")


def test_adapter_drop_also_skips_inside_a_block():
    model = with_adapters("llama", ["a", "b"])
    inputs = tiny_inputs("llama", model)
    dt.activate(model, dt.Stack("a", "b"))
    dt.adapter_drop(model, "0:2")
    with dt.disabled(model):
        base = logits(model, inputs)
    torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)


def test_random_adapter_drop_draws_per_training_forward_and_is_off_in_eval():
    model = with_adapters("llama", ["a"])
    inputs = tiny_inputs("llama", model)
    references = [logits(model, inputs)]  # m = 0, 1, 2 blocks dropped
    references.append(logits(copy_of_layer(model, 1), inputs))
    with dt.disabled(model):
        references.append(logits(model, inputs))
    dt.adapter_drop(model, random_max=2)
    model.train()  # the tiny Llama has no dropout: training forwards are deterministic
    torch.manual_seed(0)
    seen = []
    for _ in range(12):
        out = logits(model, inputs)
        seen.append(next(m for m, ref in enumerate(references) if torch.equal(out, ref)))
    assert set(seen) == {0, 1, 2}
    model.eval()
    for _ in range(3):
        torch.testing.assert_close(logits(model, inputs), references[0], atol=0, rtol=0)
    dt.adapter_drop(model, None)
    model.train()
    assert not any(layer.dropped for layer in delta_layers(model).values())
    torch.testing.assert_close(logits(model, inputs), references[0], atol=0, rtol=0)


def test_adapter_drop_refuses_merged_deltas():
    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2), "lora")
    dt.merge(model)
    with pytest.raises(dt.ConfigError, match="merged into the weights of .*cannot be skipped"):
        dt.adapter_drop(model, "top:1")
