"""Invariants every method must satisfy, on every architecture the anatomy supports.

Later method issues add their configs to ``METHODS``; nothing else here should need to change.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.layer import delta_layers
from zoo import ARCHITECTURES, is_seq2seq, supports_generate, tiny_inputs, tiny_model

METHODS = {
    "lora": lambda: dt.LoRAConfig(r=4, targets=["all-linear"]),
    "lora-rslora-roles": lambda: dt.LoRAConfig(r=4, alpha=8, rslora=True, targets=["attn", "ffn"]),
    "dora": lambda: dt.LoRAConfig(r=4, dora=True, targets=["all-linear"]),
    "pissa": lambda: dt.LoRAConfig(r=2, init="pissa", targets=["all-linear"]),
    "lora-embed": lambda: dt.LoRAConfig(r=4, init="gaussian", targets=["embed", "attn"]),
}
CASES = [(m, a) for m in METHODS for a in ARCHITECTURES]
IDS = [f"{m}-{a}" for m, a in CASES]
TOL = dict(atol=2e-4, rtol=1e-4)  # fp32 merge reorders sums; T5 logits are unscaled
# PiSSA's merge forms s·(BA - B0A0) from principal factors of |W|'s size: fp32 cancellation
MERGE_TOL = {"pissa": dict(atol=1e-3, rtol=1e-4)}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def perturb(model, name, seed=1):
    """Give a delta non-trivial weights, so that it is no longer the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in delta_layers(model).values():
            if name in layer.deltas:
                for p in layer.deltas[name].parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def merge_refused(method, model):
    """Merging an embedding delta into a weight tied to the output head must be refused."""
    head = model.get_output_embeddings()
    tied = head is not None and model.get_input_embeddings().weight is head.weight
    if method == "lora-embed" and tied:
        with pytest.raises(dt.ConfigError, match="tied"):
            dt.merge(model)
        return True
    return False


def setup(method, arch, name="default"):
    model = tiny_model(arch).eval()
    inputs = tiny_inputs(arch, model)
    base = logits(model, inputs)
    dt.attach(model, METHODS[method](), name)
    return model, inputs, base


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_identity_at_init(method, arch):
    model, inputs, base = setup(method, arch)
    torch.testing.assert_close(logits(model, inputs), base, **TOL)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_merged_equals_unmerged_equals_merge_and_detach(method, arch):
    model, inputs, base = setup(method, arch)
    perturb(model, "default")
    unmerged = logits(model, inputs)
    assert (unmerged - base).abs().max() > 1e-3, "the perturbed delta should change the output"
    if merge_refused(method, model):
        return
    tol = MERGE_TOL.get(method, TOL)
    dt.merge(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, **tol)
    dt.unmerge(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, **tol)
    plain = dt.merge_and_detach(model)
    assert plain is model and not delta_layers(model)
    assert not any(".base." in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, inputs), unmerged, **tol)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_detach_restores_original_state_exactly(method, arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    dt.attach(model, METHODS[method]())
    perturb(model, "default")
    if not merge_refused(method, model):
        dt.merge(model, keep_exact=True)
        dt.unmerge(model)
    dt.detach(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(modules_before[n] is m for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_only_delta_parameters_train(method, arch):
    model, inputs, _ = setup(method, arch)
    model.train()
    base_state = {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    delta_params = dt.trainable_parameters(model)
    assert delta_params and all(p.requires_grad for p in delta_params)
    optimizer = torch.optim.AdamW(delta_params, lr=1e-2)
    for _ in range(2):
        out = model(**inputs)
        out.logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    ids = {id(p) for p in delta_params}
    for name, p in model.named_parameters():
        if id(p) not in ids:
            assert not p.requires_grad and p.grad is None, name
    after = model.state_dict()
    assert all(torch.equal(base_state[k], after[k]) for k in base_state)
    changed = [p for p in delta_params if p.grad is not None]
    assert len(changed) == len(delta_params)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_save_load_round_trip(method, arch, tmp_path):
    model, inputs, _ = setup(method, arch)
    perturb(model, "default")
    expected = logits(model, inputs)
    dt.save(model, tmp_path / "delta")
    fresh = tiny_model(arch).eval()
    assert dt.load(fresh, tmp_path / "delta") == ["default"]
    torch.testing.assert_close(logits(fresh, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_disabled_equals_base(method, arch):
    model, inputs, base = setup(method, arch)
    perturb(model, "default")
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)
    if merge_refused(method, model):
        return
    dt.merge(model)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, inputs), base, **TOL)
    assert (logits(model, inputs) - base).abs().max() > 1e-3


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_mixed_batch_equals_separate_runs(method, arch):
    model = tiny_model(arch).eval()
    inputs = tiny_inputs(arch, model, batch=3)
    for i, name in enumerate(("a", "b")):
        dt.attach(model, METHODS[method](), name)
        perturb(model, name, seed=i + 1)
    separate = {}
    for name in ("a", "b"):
        dt.activate(model, name)
        separate[name] = logits(model, inputs)
    with dt.disabled(model):
        separate[None] = logits(model, inputs)
    with dt.route(model, ["b", None, "a"]):
        mixed = logits(model, inputs)
    for row, name in enumerate(["b", None, "a"]):
        torch.testing.assert_close(mixed[row], separate[name][row], **TOL)


@pytest.mark.parametrize("method,arch", [c for c in CASES if supports_generate(c[1])],
                         ids=[i for c, i in zip(CASES, IDS) if supports_generate(c[1])])
def test_generate_with_delta(method, arch):
    model, inputs, _ = setup(method, arch)
    perturb(model, "default")
    kwargs = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
    with torch.no_grad():
        plain = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
        dt.attach(model, METHODS[method](), "other")
        perturb(model, "other", seed=5)
        dt.activate(model, "default")
        one = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
        with dt.route(model, ["default", "other"]):
            routed = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
        dt.activate(model, "other")
        other = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, one)
    assert torch.equal(routed[0], one[0]) and torch.equal(routed[1], other[1])
    assert plain.shape[1] > kwargs["input_ids"].shape[1] or is_seq2seq(arch)
