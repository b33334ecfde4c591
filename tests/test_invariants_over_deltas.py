"""The invariant suite for methods that work over other attached deltas (``standalone=False``,
e.g. AdapterFusion over adapters), on every tiny architecture: test_invariants.py attaches a
method alone, which these cannot be. Each case attaches its prerequisite deltas first, as a
user does, then the method itself.

Invariants: the fused adapters' weights decide the output (a fusion over adapters that change
nothing changes nothing); only the new delta trains (the adapters and the base stay exactly as
they were); the whole set saves and loads back to the same logits, the new delta after the
deltas it builds on; disabled equals the base model; detaching everything restores the model.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.config import registered_classes
from deltatune.layer import delta_layers
from test_invariants import TOL, logits, two_training_steps
from zoo import ARCHITECTURES, randomize_delta, tiny_inputs, tiny_model

#: method -> (its config, {prerequisite delta name: its config})
OVER_DELTAS = {
    "fusion": (lambda: dt.FusionConfig(adapters=["a", "b"]),
               {"a": lambda: dt.PfeifferConfig(bottleneck=4, init="zero_up"), "b": lambda: dt.PfeifferConfig(bottleneck=4, init="zero_up")}),
}
CASES = [(m, a) for m in OVER_DELTAS for a in ARCHITECTURES]
IDS = [f"{m}-{a}" for m, a in CASES]


def attached(method, arch, randomize_prerequisites=True):
    """(model with prerequisites and the method attached as "f", inputs, base logits)."""
    model = tiny_model(arch).eval()
    inputs = tiny_inputs(arch, model)
    base = logits(model, inputs)
    make, prerequisites = OVER_DELTAS[method]
    for i, (name, config) in enumerate(prerequisites.items()):
        dt.attach(model, config(), name)
        if randomize_prerequisites:
            randomize_delta(model, name, seed=i + 1)
    dt.attach(model, make(), "f")
    return model, inputs, base


def test_every_method_over_other_deltas_is_in_this_matrix():
    assert {c.method for c in registered_classes() if not c.standalone} == set(OVER_DELTAS)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_at_init_over_deltas_that_change_nothing_it_changes_nothing(method, arch):
    model, inputs, base = attached(method, arch, randomize_prerequisites=False)
    torch.testing.assert_close(logits(model, inputs), base, **TOL)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_only_the_new_delta_trains(method, arch):
    model, inputs, base = attached(method, arch)
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".deltas.f." not in k}
    trainable = dt.trainable_parameters(model)
    own = {id(p) for layer in delta_layers(model).values() if "f" in layer.deltas for p in layer.deltas["f"].parameters()}
    assert trainable and {id(p) for p in trainable} == own
    two_training_steps(model, inputs, trainable)
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_saved_with_what_it_builds_on_it_loads_back_exactly(method, arch, tmp_path):
    model, inputs, base = attached(method, arch)
    randomize_delta(model, "f", seed=7)
    expected = logits(model, inputs)
    assert (expected - base).abs().max() > 1e-3
    dt.save(model, tmp_path / "deltas")
    fresh = tiny_model(arch).eval()
    names = dt.load(fresh, tmp_path / "deltas")
    assert names[-1] == "f" and set(names) == {"f", *OVER_DELTAS[method][1]}
    torch.testing.assert_close(logits(fresh, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_disabled_equals_base_and_detach_restores(method, arch):
    model = tiny_model(arch).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model, inputs, base = attached(method, arch)
    randomize_delta(model, "f", seed=7)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)
    dt.detach(model)
    assert not delta_layers(model)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(state[k], after[k]) for k in state)
