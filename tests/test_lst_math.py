"""Ladder Side-Tuning (Sung et al. 2022): the ladder and gate equation, nothing of the backbone
kept for backward, pruning by norms, cached generation, save/load with dropped layers, merge refused."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.layer import base_of, delta_layers
from deltatune.methods.ladder import gate
from deltatune.upstream import cache_keyword
from transformers import DynamicCache
from zoo import tiny_inputs, tiny_model


def lst_of(model):
    (layer,) = [layer for layer in delta_layers(model).values() if "default" in layer.deltas]
    return layer.deltas["default"]


def perturbed(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def test_gate_is_sigmoid_of_alpha_over_temperature():
    alpha = torch.tensor([-0.3, 0.0, 0.2])
    torch.testing.assert_close(gate(alpha, 0.1), 1 / (1 + torch.exp(-alpha / 0.1)))


def test_output_is_backbone_plus_up_projected_ladder_states():
    """y = h_L + U s_L, s₀ = D₀h₀, sᵢ = μᵢ gᵢ(sᵢ₋₁) + (1 − μᵢ) Dᵢhᵢ, computed by hand on BERT
    (whose blocks need no arguments besides the hidden states when nothing is masked)."""
    model = tiny_model("bert").eval()
    ids = tiny_inputs("bert", model)["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # h₀ .. h_L
    dt.attach(model, dt.LSTConfig(reduction=2, temperature=0.5))
    perturbed(model)
    delta = lst_of(model)
    with torch.no_grad():
        mu = torch.sigmoid(delta.alpha / 0.5)
        s = hidden[0] @ delta.down["0"].weight.T
        for i in range(len(hidden) - 1):
            side_out = delta.side[str(i)](s)
            side_out = side_out[0] if isinstance(side_out, tuple) else side_out
            s = mu[i] * side_out + (1 - mu[i]) * (hidden[i + 1] @ delta.down[str(i + 1)].weight.T)
        expected = hidden[-1] + s @ delta.up.weight.T
        got = model.bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected - hidden[-1]).abs().max() > 1e-2


def test_side_blocks_are_the_backbone_pruned_to_its_largest_norms():
    model = tiny_model("llama").eval()
    original = model.model.layers[1].self_attn
    dt.attach(model, dt.LSTConfig(reduction=2))
    delta = lst_of(model)
    plan_residual = delta.down["0"].weight.argmax(1)  # D starts as the selection of the kept dimensions
    q, k, o = (original.q_proj.weight, original.k_proj.weight, original.o_proj.weight)
    score = torch.zeros(q.shape[1])
    for block in model.model.layers:
        for name, lin in block.named_modules():
            if isinstance(lin, torch.nn.Linear):
                w = lin.weight
                score += w.square().sum(0) if name.endswith(("q_proj", "k_proj", "v_proj", "up_proj", "gate_proj")) \
                    else w.square().sum(1)
    assert torch.equal(plan_residual, torch.topk(score, q.shape[1] // 2).indices.sort().values)
    side = delta.side["1"].self_attn
    head_dim = original.head_dim
    # one of the two key/value heads, the one of larger norm, with both query heads of its group
    per_kv = (k.square().sum(1) + original.v_proj.weight.square().sum(1)).view(2, head_dim).sum(1) \
        + (q.square().sum(1) + o.square().sum(0)).view(2, 2 * head_dim).sum(1)
    kept = int(per_kv.argmax())
    rows = torch.arange(kept * 2 * head_dim, (kept + 1) * 2 * head_dim)
    torch.testing.assert_close(side.q_proj.weight, q[rows][:, plan_residual], atol=0, rtol=0)
    assert side.k_proj.weight.shape == (head_dim, q.shape[1] // 2)


def _outputs_by_pointer(modules, into: dict):
    """Forward hooks recording each module's output tensor by storage pointer (holding it, so that
    no later tensor reuses its memory)."""
    def hook(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        if torch.is_tensor(out):
            into.setdefault(out.data_ptr(), out)
    return [m.register_forward_hook(hook) for m in modules]


def _saved_activations(model, inputs):
    """The tensors autograd saves for backward in one forward, parameters left out, and the logits."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = model(**inputs).logits
    params = {p.data_ptr() for p in model.parameters()}
    return [t for t in saved if t.data_ptr() not in params], logits


def test_nothing_inside_the_backbone_is_saved_for_backward():
    """Of the backbone, autograd saves only the ladders' inputs h₀..h_L and the arguments its
    blocks were called with (the rotary cos/sin the side blocks read too): no attention score,
    FFN activation or norm input from inside a block. LoRA on the same model saves more (bench/side_memory.py measures how much)."""
    model = tiny_model("llama").train()
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.LSTConfig(reduction=2))
    perturbed(model)
    body = base_of(model.model)
    inside_blocks: dict[int, torch.Tensor] = {}
    elsewhere: dict[int, torch.Tensor] = {}
    in_blocks = {id(m) for block in body.layers for m in block.modules()}
    hooks = _outputs_by_pointer([m for m in body.modules() if id(m) in in_blocks and m not in body.layers],
                                inside_blocks)
    hooks += _outputs_by_pointer([m for m in body.modules() if id(m) not in in_blocks and m is not body], elsewhere)
    allowed: set[int] = set()

    def arguments(module, args, kwargs):
        for value in [*args, *kwargs.values()]:
            for t in (value if isinstance(value, tuple) else (value,)):
                if torch.is_tensor(t):
                    allowed.add(t.data_ptr())

    hooks += [b.register_forward_hook(lambda m, a, out: allowed.add(out.data_ptr())) for b in body.layers]
    hooks += [b.register_forward_pre_hook(arguments, with_kwargs=True) for b in body.layers]
    saved, logits = _saved_activations(model, inputs)
    for h in hooks:
        h.remove()
    pointers = {t.data_ptr() for t in saved}
    assert not pointers & set(inside_blocks)
    assert pointers & allowed and pointers & (set(elsewhere) | allowed) <= allowed
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in dt.trainable_parameters(model))

    lora = tiny_model("llama").train()
    dt.attach(lora, dt.LoRAConfig(r=2))
    saved_lora, _ = _saved_activations(lora, inputs)
    assert sum(t.numel() for t in saved_lora) > sum(t.numel() for t in saved)


def test_backbone_outputs_have_no_graph():
    model = tiny_model("llama").train()
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.LSTConfig(reduction=2))
    perturbed(model)
    graphs = []
    hooks = [b.register_forward_hook(lambda m, a, out: graphs.append(out.grad_fn)) for b in base_of(model.model).layers]
    out = model(**inputs)
    for h in hooks:
        h.remove()
    assert graphs == [None] * len(graphs) and len(graphs) == 2 and out.logits.grad_fn is not None


@pytest.mark.parametrize("drop", [(), (0,)])
def test_cached_decoding_equals_a_full_forward(drop):
    model = tiny_model("llama").eval()
    dt.attach(model, dt.LSTConfig(reduction=2, drop_layers=list(drop)))
    perturbed(model)
    ids = tiny_inputs("llama", model)["input_ids"][:1]
    cache = cache_keyword(model.forward)
    with torch.no_grad():
        state = DynamicCache()
        model(input_ids=ids[:, :-2], use_cache=True, **{cache: state})
        model(input_ids=ids[:, -2:-1], use_cache=True, **{cache: state})
        step = model(input_ids=ids[:, -1:], use_cache=True, **{cache: state})
        full = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
        cached = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        uncached = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_dropped_layers_have_no_side_block_and_round_trip(tmp_path):
    model = tiny_model("llama").eval()
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.LSTConfig(reduction=2, drop_layers=[1]))
    perturbed(model)
    delta = lst_of(model)
    assert list(delta.side) == ["0"] and list(delta.down) == ["0", "1"] and delta.alpha.shape == (1,)
    with torch.no_grad():
        expected = model(**inputs).logits
    dt.save(model, tmp_path / "lst")
    fresh = tiny_model("llama").eval()
    dt.load(fresh, tmp_path / "lst")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected, atol=0, rtol=0)


def test_merge_is_refused_with_the_reason():
    model = tiny_model("llama")
    dt.attach(model, dt.LSTConfig())
    with pytest.raises(dt.ConfigError, match="cannot be merged: its side network is a second"):
        dt.merge(model)


def test_bad_options_are_named():
    with pytest.raises(dt.ConfigError, match="reduction must be an integer >= 1"):
        dt.LSTConfig(reduction=0)
    with pytest.raises(dt.ConfigError, match="drop_layers holds 5, but the model has 2 blocks"):
        dt.attach(tiny_model("llama"), dt.LSTConfig(drop_layers=[5]))


def test_memory_estimate_prices_the_side_network_instead_of_the_backbone():
    from deltatune.analysis.memory import estimate_training_memory

    def layers_line(model):
        estimate = estimate_training_memory(model, batch_size=2, seq_len=8, attention="sdpa", allocator_retention=False)
        return next(value for name, value, _ in estimate.lines if name.startswith("activations: layers"))

    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2))
    backbone = layers_line(model)
    dt.detach(model)
    dt.attach(model, dt.LSTConfig(reduction=4))
    delta = lst_of(model)
    h, hs, q, kv, f = 32, 8, 16, 8, 16  # the tiny Llama's sizes at 1/4: one of two kv heads with its two query heads
    per_block = 2 * hs + hs + q + 2 * kv + q + hs + 4 * f + h + 2 * hs
    assert delta.backward_activations(8, "sdpa") == h + hs + 2 * per_block + hs
    assert layers_line(model) == 2 * 8 * delta.backward_activations(8, "sdpa") * 4 < backbone
