"""Invariants every method must satisfy, on every architecture the anatomy supports, and on
quantized bases (4-bit NF4, LLM.int8) for every method that declares it trains on one: the 4-bit
bases in bitsandbytes' standard layout and, forced on whatever the CPU (``:cpu-packed``), in its
CPU-packed layout, whose kernel computes in bf16 (``CPU_PACKED_TOL``).

Method families add their configs to ``CASES`` in a ``cases_*.py`` file (with tolerances for
near-identity inits or merges that cancel, ``NOT_IDENTITY`` for methods whose paper starts from
a random change, ``UNSUPPORTED`` for architectures a method refuses); nothing here should need
to change. Capabilities a config declares off (merging, mixed batches) are checked to fail with a
clear error instead, and so are the refused architectures.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.layer import delta_layers
from zoo import (ARCHITECTURES, QUANTIZED_ARCHITECTURES, base_architecture, is_cpu_packed, is_seq2seq,
                 supports_generate, tiny_inputs, tiny_model)

import cases_adapters
import cases_lora
import cases_prefix
import cases_prompt
import cases_scaling
import cases_side
import cases_sparse
import cases_structured

FAMILIES = [cases_lora, cases_adapters, cases_scaling, cases_structured, cases_sparse, cases_prefix, cases_prompt,
            cases_side]
METHODS = {name: make for family in FAMILIES for name, make in family.CASES.items()}
IDENTITY_TOL = {k: v for family in FAMILIES for k, v in getattr(family, "IDENTITY_TOL", {}).items()}
MERGE_TOL = {k: v for family in FAMILIES for k, v in getattr(family, "MERGE_TOL", {}).items()}
NOT_IDENTITY = {k for family in FAMILIES for k in getattr(family, "NOT_IDENTITY", ())}
UNSUPPORTED = {k: v for family in FAMILIES for k, v in getattr(family, "UNSUPPORTED", {}).items()}

def on_quantized_base(method):
    return METHODS[method]().quantized_base_blocker is None


def supported(method, arch):
    return base_architecture(arch) not in UNSUPPORTED.get(method, ()) and (
        "+" not in arch or on_quantized_base(method))


ALL_ARCHITECTURES = ARCHITECTURES + QUANTIZED_ARCHITECTURES
CASES = [(m, a) for m in METHODS for a in ALL_ARCHITECTURES if supported(m, a)]
REFUSED = [(m, a) for m in METHODS for a in ARCHITECTURES if not supported(m, a)]
REFUSED_ON_QUANTIZED = [(m, a) for m in METHODS for a in QUANTIZED_ARCHITECTURES
                        if base_architecture(a) not in UNSUPPORTED.get(m, ()) and not on_quantized_base(m)]
IDS = [f"{m}-{a}" for m, a in CASES]
TOL = dict(atol=2e-4, rtol=1e-4)  # fp32 merge reorders sums; T5 logits are unscaled
# LLM.int8 quantizes the activations too, row by row, and runs the columns holding an outlier
# anywhere in the batch in 16-bit: a merged (dequantized, float) layer and a batch of another
# composition differ from it by that rounding, ~1e-3 on these logits
INT8_TOL = dict(atol=1e-2, rtol=0)
# bitsandbytes' kernel for the CPU-packed 4-bit layout rounds its inputs and outputs to bf16 (8
# significant bits): a merged (dequantized, fp32) layer differs from it by that rounding, and
# so does the same layer given inputs that differ in their last fp32 bits (an unmerge by
# subtraction, another batch composition): ~3e-3 on these logits, 1.1e-2 at most seen
CPU_PACKED_TOL = dict(atol=2e-2, rtol=0)


def tolerance(method, arch):
    if arch.endswith("+int8"):
        return INT8_TOL
    return CPU_PACKED_TOL if is_cpu_packed(arch) else MERGE_TOL.get(method, TOL)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def two_training_steps(model, inputs, params):
    """Two AdamW steps on a loss of the logits; the gradients stay (zeroed, not dropped)."""
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        model(**inputs).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)


def perturb(model, name, seed=1):
    """Give a delta non-trivial weights, so that it is no longer the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in delta_layers(model).values():
            if name in layer.deltas:
                for p in layer.deltas[name].parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def mergeable(method):
    return METHODS[method]().supports_merge


def merge_refused(method, model):
    """Whether merging must be refused here: the method cannot merge, a delta says it cannot go
    into its layer (a bias the base lacks), or a delta sits on a weight tied between the input
    embedding and the output head (merging would change both)."""
    if not mergeable(method):
        with pytest.raises(dt.ConfigError, match="cannot be merged"):
            dt.merge(model)
        return True
    if any(d.merge_blocker(layer.backend) for layer in delta_layers(model).values() for d in layer.deltas.values()):
        with pytest.raises(dt.ConfigError, match="cannot merge"):
            dt.merge(model)
        return True
    head = model.get_output_embeddings()
    tied = head is not None and model.get_input_embeddings().weight is head.weight
    if tied and any(layer.backend.weight is head.weight for layer in delta_layers(model).values()):
        with pytest.raises(dt.ConfigError, match="tied"):
            dt.merge(model)
        return True
    return False


def same_generation(model, a, b):
    """Equal token for token; where one sequence stopped earlier (EOS) and was padded in its
    batch while another row went on, the longer one may only continue with padding."""
    n = min(len(a), len(b))
    filler = {model.generation_config.pad_token_id, model.generation_config.eos_token_id}
    rest = a[n:] if len(a) > n else b[n:]
    return torch.equal(a[:n], b[:n]) and all(int(t) in filler for t in rest)


def mixed_batches(method):
    return METHODS[method]().supports_mixed_batch


def attached(method, arch, name="default"):
    model = tiny_model(arch).eval()
    inputs = tiny_inputs(arch, model)
    base = logits(model, inputs)
    dt.attach(model, METHODS[method](), name)
    return model, inputs, base


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_identity_at_init(method, arch):
    model, inputs, base = attached(method, arch)
    if method in NOT_IDENTITY:  # a random prompt or prefix: the model must see it
        assert (logits(model, inputs) - base).abs().max() > 1e-4
        return
    torch.testing.assert_close(logits(model, inputs), base, **IDENTITY_TOL.get(method, TOL))


@pytest.mark.parametrize("method,arch", REFUSED, ids=[f"{m}-{a}" for m, a in REFUSED])
def test_unsupported_architecture_is_refused_when_attached(method, arch):
    model = tiny_model(arch)
    before = dict(model.named_modules())
    with pytest.raises(dt.DeltatuneError, match="not supported"):
        dt.attach(model, METHODS[method]())
    assert dict(model.named_modules()) == before and not delta_layers(model)


@pytest.mark.parametrize("method,arch", REFUSED_ON_QUANTIZED, ids=[f"{m}-{a}" for m, a in REFUSED_ON_QUANTIZED])
def test_method_without_quantized_support_is_refused_on_a_quantized_base(method, arch):
    model = tiny_model(arch)
    before = dict(model.named_modules())
    with pytest.raises(dt.ConfigError, match="not supported on a quantized base"):
        dt.attach(model, METHODS[method]())
    assert dict(model.named_modules()) == before and not delta_layers(model)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_merged_equals_unmerged_equals_merge_and_detach(method, arch):
    model, inputs, base = attached(method, arch)
    perturb(model, "default")
    unmerged = logits(model, inputs)
    assert (unmerged - base).abs().max() > 1e-3, "the perturbed delta should change the output"
    if merge_refused(method, model):
        return
    tol = tolerance(method, arch)
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
    model, inputs, _ = attached(method, arch)
    model.train()
    base_state = {k: v.clone() for k, v in model.state_dict().items() if ".deltas." not in k}
    delta_params = dt.trainable_parameters(model)
    assert delta_params and all(p.requires_grad for p in delta_params)
    two_training_steps(model, inputs, delta_params)
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
    model, inputs, _ = attached(method, arch)
    perturb(model, "default")
    expected = logits(model, inputs)
    dt.save(model, tmp_path / "delta")
    fresh = tiny_model(arch).eval()
    assert dt.load(fresh, tmp_path / "delta") == ["default"]
    torch.testing.assert_close(logits(fresh, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_disabled_equals_base(method, arch):
    model, inputs, base = attached(method, arch)
    perturb(model, "default")
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)
    if merge_refused(method, model):
        return
    dt.merge(model)
    with dt.disabled(model):
        torch.testing.assert_close(logits(model, inputs), base, **(CPU_PACKED_TOL if is_cpu_packed(arch) else TOL))
    assert (logits(model, inputs) - base).abs().max() > 1e-3


@pytest.mark.parametrize("method,arch", CASES, ids=IDS)
def test_mixed_batch_equals_separate_runs(method, arch):
    model = tiny_model(arch).eval()
    inputs = tiny_inputs(arch, model, batch=3)
    for i, name in enumerate(("a", "b")):
        dt.attach(model, METHODS[method](), name)
        perturb(model, name, seed=i + 1)
    if not mixed_batches(method):
        with pytest.raises(dt.ConfigError, match="mixed batches"):
            with dt.route(model, ["b", None, "a"]):
                pass
        return
    separate = {}
    for name in ("a", "b"):
        dt.activate(model, name)
        separate[name] = logits(model, inputs)
    with dt.disabled(model):
        separate[None] = logits(model, inputs)
    with dt.route(model, ["b", None, "a"]):
        mixed = logits(model, inputs)
    # only real tokens are compared: outputs at padding positions mean nothing, and a prompt
    # that adds keys to a left-padded row changes what its fully masked pad query averages
    real = inputs["attention_mask"].bool() if not is_seq2seq(arch) else torch.ones(mixed.shape[:2], dtype=torch.bool)
    for row, name in enumerate(["b", None, "a"]):
        torch.testing.assert_close(mixed[row][real[row]], separate[name][row][real[row]],
                                   **(INT8_TOL if arch.endswith("+int8") else CPU_PACKED_TOL if is_cpu_packed(arch) else TOL))


@pytest.mark.parametrize("method,arch", [c for c in CASES if supports_generate(c[1])],
                         ids=[i for c, i in zip(CASES, IDS) if supports_generate(c[1])])
def test_generate_with_delta(method, arch):
    model, inputs, _ = attached(method, arch)
    perturb(model, "default")
    kwargs = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
    with torch.no_grad():
        plain = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
        dt.attach(model, METHODS[method](), "other")
        perturb(model, "other", seed=5)
        dt.activate(model, "default")
        one = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
        dt.activate(model, "other")
        other = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
        if mixed_batches(method):
            with dt.route(model, ["default", "other"]):
                routed = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
            assert same_generation(model, routed[0], one[0]) and same_generation(model, routed[1], other[1])
    assert torch.equal(plain, one)
    assert plain.shape[1] > kwargs["input_ids"].shape[1] or is_seq2seq(arch)
