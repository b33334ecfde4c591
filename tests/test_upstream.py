"""What deltatune assumes of transformers holds however upstream wraps or renames things."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.models.llama import modeling_llama

import deltatune as dt
from deltatune import attention, upstream
from zoo import tiny_inputs, tiny_model


def _renaming(forward):
    """A decorator in the style of transformers' deprecate_kwarg: a wrapper with other code."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if "old_cache" in kwargs:
            kwargs["cache"] = kwargs.pop("old_cache")
        return forward(self, *args, **kwargs)

    return wrapper


class DecoratedAttention(modeling_llama.LlamaAttention):
    forward = _renaming(modeling_llama.LlamaAttention.forward)


class OwnCodeAttention(modeling_llama.LlamaAttention):
    """Computes attention itself, and takes an argument no probe can make up."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None, *, token_table: dict, **kwargs):
        if not isinstance(token_table, dict):
            raise TypeError("token_table must be a dict")
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None


def _with_attention_class(model, cls):
    for layer in model.model.layers:
        layer.self_attn.__class__ = cls
    attention._DISPATCHES.pop(cls, None)
    return model


def test_a_decorated_attention_forward_still_takes_prefixes():
    model = _with_attention_class(tiny_model("llama"), DecoratedAttention)
    inputs = tiny_inputs("llama", model)
    with torch.no_grad():
        base = model(**inputs).logits
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=2))
    with torch.no_grad():
        assert (model(**inputs).logits - base).abs().max() > 1e-4
    assert attention._DISPATCHES[DecoratedAttention] is True


def test_attention_in_own_code_that_no_probe_can_call_is_refused_at_its_first_call_then_at_attach():
    model = _with_attention_class(tiny_model("llama"), OwnCodeAttention)
    for layer in model.model.layers:  # the decoder layer passes the extra argument on
        layer.forward = functools.partial(type(layer).forward, layer, token_table={})
    assert attention._dispatches(model.model.layers[0].self_attn) is None
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(dt.ConfigError, match="OwnCodeAttention computes attention in its own code"):
        model(**tiny_inputs("llama", model))
    dt.detach(model)
    with pytest.raises(dt.TargetError, match="OwnCodeAttention computes attention in its own code"):
        dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=2))


def test_the_cache_is_read_under_either_name_and_passed_under_the_installed_one():
    cache = object()
    assert upstream.passed_cache({"cache": cache}) is cache
    assert upstream.passed_cache({"past_key_values": cache}) is cache
    assert upstream.passed_cache({"input_ids": 1}) is None
    model = tiny_model("llama")
    keyword = upstream.cache_keyword(model.forward)
    assert keyword in upstream.CACHE_ARGUMENTS
    assert keyword in __import__("inspect").signature(model.forward).parameters

    def old_style(input_ids, past_key_values=None):
        return input_ids

    assert upstream.cache_keyword(old_style) == "past_key_values"


def test_versions_outside_the_tested_range_are_named_with_the_range():
    oldest, newest = upstream.TESTED["transformers"]
    assert upstream.untested({"transformers": newest, "bitsandbytes": upstream.TESTED["bitsandbytes"][0]}) == []
    assert upstream.untested({"transformers": newest + ".dev0"}) == []
    found = upstream.untested({"transformers": "99.0.0"})
    assert found == [f"transformers 99.0.0 (tested {oldest} to {newest})"]


def test_the_untested_warning_is_one_line_once(monkeypatch, capsys):
    monkeypatch.setattr(upstream, "_warned", False)
    monkeypatch.setattr(upstream, "untested", lambda: ["transformers 99.0.0 (tested 1 to 2)"])
    upstream.warn_if_untested()
    upstream.warn_if_untested()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformers 99.0.0" in err


def test_the_probe_changes_nothing_in_the_module_it_calls():
    """No layer switches to bitsandbytes' CPU-packed inference layout because of the probe (its
    input requires grad), and every train/eval flag comes back."""
    pytest.importorskip("bitsandbytes")
    from deltatune.backends import backend_for

    model = tiny_model("llama-wide+nf4:cpu-packed")  # in eval mode: its layers would pack at a no-grad call
    attention_module = model.model.layers[0].self_attn
    attention_module.q_proj.train()  # a mixed mode, which must come back as it was
    modes = [m.training for m in model.modules()]
    attention._DISPATCHES.pop(type(attention_module), None)
    assert attention._probe(attention_module) is True
    assert [m.training for m in model.modules()] == modes
    packed = [m for m in model.modules() if (b := backend_for(m)) is not None and b.kind == "linear4bit" and b.cpu_packed]
    assert not packed
