"""S4 (Chen et al. 2023): its grouping, and its per-group placement equal to attaching each method
to its groups' blocks by hand (same outputs, same parameters), saved and loaded as one delta."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.layer import delta_layers
from deltatune.methods.s4 import METHODS, PartsDelta, group_bounds
from zoo import tiny_inputs, tiny_model

PAPER = dt.S4Config(r=2, bottleneck=4, num_virtual_tokens=2)


def deep_llama(layers: int = 12) -> torch.nn.Module:
    config = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def test_groupings_split_the_blocks_as_the_paper_describes():
    sizes = lambda grouping, n: [len(g) for g in group_bounds(grouping, n)]  # noqa: E731
    assert sizes("spindle", 30) == [5, 10, 10, 5]  # fewer blocks at both ends (the bundled model's 30)
    assert sizes("spindle", 12) == [2, 4, 4, 2]
    assert sizes("uniform", 12) == [3, 3, 3, 3]
    assert sizes("increasing", 10) == [1, 2, 3, 4] and sizes("decreasing", 10) == [4, 3, 2, 1]
    assert sizes("bottleneck", 12) == [4, 2, 2, 4]
    for grouping in ("spindle", "uniform", "increasing", "decreasing", "bottleneck"):
        for n in (1, 2, 5, 24):
            assert [i for g in group_bounds(grouping, n) for i in g] == list(range(n))  # consecutive, all covered


def by_hand(config: dt.S4Config, model: torch.nn.Module) -> list[str]:
    """Each group's methods attached to its blocks as their own deltas, in S4's run order."""
    names = []
    for group, blocks in enumerate(group_bounds(config.grouping, model.config.num_hidden_layers)):
        letters = [s.strip() for s in config.strategies[group].split("+")]
        targets = {"B": ["attn", "ffn"], "L": ["attn.q", "attn.v"], "A": None, "P": None}
        for letter in ("B", "L", "A", "P"):
            if letter in letters and blocks:
                name = f"g{group + 1}_{METHODS[letter]}"
                part = config.part(letter, group).replace(layers=list(blocks), targets=targets[letter])
                dt.attach(model, part, name)
                names.append(name)
    return names


def copy_parts(s4_model, hand_model, names) -> None:
    """Give the hand-attached deltas the S4 parts' values, module by module."""
    hand = delta_layers(hand_model)
    for path, layer in delta_layers(s4_model).items():
        delta = layer.deltas["default"]
        parts = dict(delta.parts) if isinstance(delta, PartsDelta) else {delta_method(delta): delta}
        for method, part in parts.items():
            (name,) = [n for n in hand[path].deltas if n in names and n.endswith("_" + method)]
            hand[path].deltas[name].load_state_dict(part.state_dict())


def delta_method(delta) -> str:
    from deltatune.methods.adapters import SerialAdapter
    from deltatune.methods.lora import LoRADelta
    from deltatune.methods.prefix import PrefixDelta

    kinds = {PrefixDelta: "prefix", LoRADelta: "lora", SerialAdapter: "adapter"}
    return next((v for k, v in kinds.items() if isinstance(delta, k)), "bitfit")


@pytest.mark.parametrize("config", [
    PAPER,
    dt.S4Config(grouping="increasing", allocation="increasing", strategies=("L", "-", "P+B", "A+P+B+L"), r=4,
                bottleneck=4, num_virtual_tokens=3),
], ids=["paper-design", "increasing-with-an-untuned-group"])
def test_s4_equals_each_method_attached_to_its_groups_by_hand(config):
    s4_model, hand_model = deep_llama(), deep_llama()
    inputs = tiny_inputs("llama", s4_model)
    dt.attach(s4_model, config)
    names = by_hand(config, hand_model)
    # random values everywhere (B = 0 and zero biases would hide a part that is missing)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dt.trainable_parameters(s4_model):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    copy_parts(s4_model, hand_model, names)
    dt.activate(hand_model, names)
    assert dt.count_parameters(s4_model)[0] == dt.count_parameters(hand_model)[0]
    assert sorted(delta_layers(s4_model)) == sorted(delta_layers(hand_model))
    with torch.no_grad():
        torch.testing.assert_close(s4_model(**inputs).logits, hand_model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_the_paper_design_puts_each_method_in_its_groups():
    model = deep_llama()
    dt.attach(model, PAPER)
    layers = delta_layers(model)
    found = {}
    for path, layer in layers.items():
        delta = layer.deltas["default"]
        block = int(path.split(".")[2])
        parts = dict(delta.parts) if isinstance(delta, PartsDelta) else {delta_method(delta): delta}
        found.setdefault(block, set()).update(parts)
    # spindle on 12 blocks: G1 = 0-1 (A+L), G2 = 2-5 (A+P), G3 = 6-9 (A+P+B), G4 = 10-11 (P+B+L)
    expected = {**dict.fromkeys([0, 1], {"adapter", "lora"}), **dict.fromkeys(range(2, 6), {"adapter", "prefix"}),
                **dict.fromkeys(range(6, 10), {"adapter", "prefix", "bitfit"}),
                **dict.fromkeys([10, 11], {"prefix", "bitfit", "lora"})}
    assert found == expected
    assert isinstance(layers["model.layers.0.self_attn.q_proj"].deltas["default"], dt.LoRAConfig.delta_class)


def test_s4_saves_and_loads_as_one_delta(tmp_path):
    model = deep_llama()
    inputs = tiny_inputs("llama", model)
    dt.attach(model, PAPER)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.1)
        expected = model(**inputs).logits
    dt.save(model, tmp_path / "s4")
    fresh = deep_llama()
    assert dt.load(fresh, tmp_path / "s4") == ["default"]
    assert dt.deltas(fresh)["default"].config == PAPER
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("options, message", [
    (dict(grouping="hourglass"), "grouping='hourglass' is not valid; allowed: spindle"),
    (dict(strategies=("A+L", "A+X", "-", "-")), "strategy 'A\\+X' is not valid"),
    (dict(strategies=("A", "L")), "four strategies"),
    (dict(strategies=("-", "-", "-", "-")), "tune no group"),
    (dict(allocation="random"), "allocation='random' is not valid"),
])
def test_bad_designs_are_refused_with_the_allowed_values(options, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.S4Config(**options)


def test_a_design_whose_tuned_groups_are_empty_here_is_refused():
    # spindle on the zoo's two blocks: G1 and G4 hold none
    with pytest.raises(dt.TargetError, match="adapts nothing"):
        dt.attach(tiny_model("llama"), dt.S4Config(strategies=("A+L", "-", "-", "P")))
