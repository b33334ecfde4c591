"""Deltas that change what attention reads: extra keys and values, extra gated prompts.

Prefix tuning adds trainable key/value vectors that every query attends to; LLaMA-Adapter adds
prompts that the queries attend to through a separate, gated softmax. Both act *inside* the
attention computation, after the projections, the rotary embedding and the KV-cache update, and
before the softmax. No per-architecture forward copy is needed for that: transformers' attention
modules hand exactly that moment to a pluggable function,

    ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)(module, q, k, v, mask, ...)

with ``k, v`` of shape (batch, kv_heads, keys, head_dim). While an :class:`AttentionDelta` runs
its attention module's call, that module's config names ``deltatune|<implementation>``, a
function registered here that prepends the active deltas' keys and values (and the matching mask
columns, T5's position bias columns included), calls the model's own eager or SDPA function, and
adds the gated prompt outputs. The name is restored when the call returns, so nothing outlives
the call and other modules never see it; the deltas in use are listed on the module itself for
the duration of the call (no global state), which gradient checkpointing re-runs as it should.

Because the extra keys never enter the KV cache, cached generation sees them at every step
exactly once, and positions (absolute or rotary) of the real tokens are never shifted.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .backends import backend_for
from .errors import ConfigError
from .layer import Delta, RowSelector

#: attribute (in the attention module's __dict__) listing the deltas of the running call
_IN_USE = "_deltatune_attention_deltas"
PREFIX = "deltatune|"
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")


#: attention module class -> whether its forward computes attention through the function it is
#: handed (True), in code of its own (False); filled by probes and by every call deltas make
_DISPATCHES: dict[type, bool] = {}
#: attribute (in an attention module's __dict__) set when our attention function ran for it
_REACHED = "_deltatune_attention_reached"


def uses_attention_interface(module: nn.Module) -> bool:
    """Whether ``module``'s forward dispatches through transformers' attention functions, as
    seen by calling it (a probe, once per class; see :func:`_probe`)."""
    return _dispatches(module) is True


def _dispatches(module: nn.Module) -> bool | None:
    """True or False as observed for ``module``'s class; None while no call could tell."""
    kind = type(module)
    if kind not in _DISPATCHES:
        observed = _probe(module)
        if observed is None:
            return None
        _DISPATCHES[kind] = observed
    return _DISPATCHES[kind]


def _probe(module: nn.Module) -> bool | None:
    """Call ``module`` on a two-token input with our attention function switched in and see
    whether the function ran for it. Decided by behaviour, so decorators, renamed arguments or
    refactors upstream do not change the answer. None when the module cannot be called this
    way (an unknown width, arguments the probe cannot make up): the first real call decides."""
    config = getattr(module, "config", None)
    if config is None or not isinstance(getattr(config, "_attn_implementation", None), str):
        return False  # transformers picks the attention function through the module's config
    params = list(module.parameters())
    if not params or any(p.is_meta for p in params):
        return None
    linear = next((backend_for(m) for m in module.modules() if m is not module and _is_linear(m)), None)
    if linear is None:
        return None
    hidden = torch.zeros(1, 2, linear.in_features, dtype=linear.dtype, device=linear.device)
    inputs: dict[str, Any] = {}
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_embeddings" in parameters:
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int):
            return None
        cos = torch.ones(1, 2, head_dim, dtype=hidden.dtype, device=hidden.device)
        inputs["position_embeddings"] = (cos, torch.zeros_like(cos))
    if "attention_mask" in parameters and parameters["attention_mask"].default is None:
        inputs["attention_mask"] = None
    required = [
        name for name, parameter in list(parameters.items())[1:]
        if name not in inputs and parameter.default is inspect.Parameter.empty
        and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    # any other required input (an ALiBi bias, a residual, a mask) as None or as a zero that
    # broadcasts: all None, all zero (BLOOM), or a zero mask and None for the rest (Falcon)
    zero = hidden.new_zeros(1, 1, 1)
    attempts = [dict.fromkeys(required), dict.fromkeys(required, zero),
                {name: zero if name == "attention_mask" else None for name in required}]
    # eval mode: no dropout, no running statistics updated; an input that requires grad: no
    # layer switches its storage for inference (bitsandbytes' CPU-packed 4-bit layout)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    hidden.requires_grad_(True)
    for filled in attempts:
        with _switched(module, "eager"), torch.enable_grad():  # eager: registered whatever the model runs
            try:
                module(hidden, **inputs, **filled)
                ran = True
            except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
                ran = False  # the probe's made-up arguments did not suit this module: no verdict
        # the function may have run for attention modules inside this one (a decoder block)
        reached = [m for m in module.modules() if m.__dict__.pop(_REACHED, False)]
        if ran or not required:
            break
    for m, training in modes.items():
        m.training = training
    return any(m is module for m in reached) if ran else None


def _is_linear(module: nn.Module) -> bool:
    backend = backend_for(module)
    return backend is not None and backend.is_linear_map and backend.takes_activations


class _switched:
    """While inside: ``module``'s config names our attention function for its implementation
    (or for ``implementation``)."""

    def __init__(self, module: nn.Module, implementation: str | None = None):
        self.config = module.config
        self.original = self.config._attn_implementation_internal
        self.switch = not str(self.original).startswith(PREFIX)
        self.implementation = implementation or self.original

    def __enter__(self):
        if self.switch:
            self.config._attn_implementation_internal = PREFIX + self.implementation

    def __exit__(self, *exc):
        if self.switch:
            self.config._attn_implementation_internal = self.original


def attention_support(module: nn.Module) -> str | None:
    """Why deltas inside attention cannot work on ``module``, or None when they can (or may:
    a module no probe could call is checked at its first call)."""
    if _dispatches(module) is False:
        return _OWN_CODE.format(name=type(module).__name__)
    implementation = _implementation(module)
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        return (
            f"{type(module).__name__} runs with attn_implementation={implementation!r}; load the model with "
            f"attn_implementation='sdpa' or 'eager' ({', '.join(SUPPORTED_IMPLEMENTATIONS)} are supported)"
        )
    return None


_OWN_CODE = (
    "{name} computes attention in its own code rather than through transformers' attention "
    "functions, so there is no place to add keys and values"
)


def _implementation(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    name = getattr(config, "_attn_implementation", None) if config is not None else None
    # inside another attention delta's call the name is already switched to ours
    return name[len(PREFIX):] if isinstance(name, str) and name.startswith(PREFIX) else name


@dataclass
class _InUse:
    delta: "AttentionDelta"
    rows: RowSelector


class AttentionDelta(Delta):
    """A delta on an attention module. Subclasses implement :meth:`extra_keys_values` (prefix
    tuning) and/or :meth:`extra_output` (LLaMA-Adapter)."""

    acts_on = "call"
    adds_keys = False
    adds_output = False
    #: (batch, queries) weights of this delta's keys, set for the duration of a call by gated
    #: deltas (UniPELT); None: the keys always count fully
    query_gate: Tensor | None = None

    def extra_keys_values(self, module: nn.Module, key: Tensor) -> tuple[Tensor, Tensor]:
        """(keys, values), each (kv_heads, n, head_dim), to attend to before ``key``'s."""
        raise NotImplementedError

    def extra_output(self, module: nn.Module, query: Tensor, scaling: float) -> Tensor:
        """A term (batch, heads, queries, head_dim) added to the attention output."""
        raise NotImplementedError

    def record(self, key: Tensor, value: Tensor) -> None:
        """While :func:`deltatune.calibrate` runs: see the model's own keys and values."""

    def call(self, module: nn.Module, run, args: tuple, kwargs: dict, rows: RowSelector):
        reason = attention_support(module)
        if reason:
            raise ConfigError(f"{self.config.method} cannot run here: {reason}")
        in_use = module.__dict__.setdefault(_IN_USE, [])
        in_use.append(_InUse(self, rows))
        outermost = len(in_use) == 1  # deltas on one module nest; the outermost sees the whole call
        try:
            with _switched(module):
                result = run(*args, **kwargs)
        finally:
            in_use.pop()
            if outermost:
                del module.__dict__[_IN_USE]
                reached = module.__dict__.pop(_REACHED, False)
        if outermost:
            _DISPATCHES[type(module)] = reached
            if not reached:
                raise ConfigError(f"{self.config.method} cannot run here: {_OWN_CODE.format(name=type(module).__name__)}")
        return result


def _model_function(module: nn.Module, implementation: str) -> Callable:
    if implementation == "eager":
        # every transformers model file defines its own eager function (T5's adds position bias);
        # a user's subclass of an attention class uses its parent's
        found = (getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None) for cls in type(module).__mro__)
        own = next((f for f in found if f is not None), None)
        if own is None:
            raise ConfigError(f"{type(module).__name__} has no eager attention function to call")
        return own
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _registered(implementation: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        module.__dict__[_REACHED] = True
        function = _model_function(module, implementation)
        in_use = module.__dict__.get(_IN_USE, ())
        return _attend(function, implementation, in_use, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"deltatune_{implementation}_attention"
    return attention


for _name in SUPPORTED_IMPLEMENTATIONS:
    AttentionInterface.register(PREFIX + _name, _registered(_name))


def _attend(function, implementation, in_use, module, query, key, value, attention_mask, **kwargs):
    batch = query.shape[0]
    for used in in_use:
        if used.delta.calibrating:  # it reads the model's own keys and values, adding nothing
            used.delta.record(key, value)
    adding = [u for u in in_use if u.delta.adds_keys and not u.delta.calibrating]
    always = [u for u in adding if u.delta.query_gate is None]
    output, weights = _with_keys(function, implementation, always, module, query, key, value, attention_mask, kwargs)
    for used in adding:
        if used.delta.query_gate is None:
            continue
        # a gated key set (UniPELT): out = out_without + g ⊙ (out_with − out_without), g per query
        with_keys, _ = _with_keys(
            function, implementation, [*always, used], module, query, key, value, attention_mask, kwargs
        )
        gate = used.delta.query_gate
        chosen = used.rows.mask(batch, query.device)
        if chosen is not None:
            gate = gate * chosen.view(-1, 1).to(gate.dtype)
        output = output + gate[:, :, None, None].to(output.dtype) * (with_keys - output)
    for used in in_use:
        if used.delta.adds_output and not used.delta.calibrating:
            extra = used.delta.extra_output(module, query, kwargs.get("scaling") or query.shape[-1] ** -0.5)
            chosen = used.rows.mask(batch, query.device)
            if chosen is not None:
                extra = extra * chosen.view(-1, 1, 1, 1).to(extra.dtype)
            output = output + extra.transpose(1, 2).to(output.dtype)
    return output, weights


def _with_keys(function, implementation, adding, module, query, key, value, attention_mask, kwargs):
    """The model's attention function with the key/value sets of ``adding`` in front."""
    kwargs = dict(kwargs)
    if adding:
        batch, queries = query.shape[0], query.shape[2]
        keys, values, columns = [], [], []
        for used in adding:
            extra_k, extra_v = used.delta.extra_keys_values(module, key)
            keys.append(extra_k.to(key.dtype).unsqueeze(0).expand(key.shape[0], -1, -1, -1))
            values.append(extra_v.to(value.dtype).unsqueeze(0).expand(value.shape[0], -1, -1, -1))
            columns.append((extra_k.shape[1], used.rows.mask(batch, query.device)))
        real_keys = key.shape[2]
        key = torch.cat([*keys, key], dim=2)
        value = torch.cat([*values, value], dim=2)
        attention_mask = _extended_mask(
            attention_mask, columns, module, implementation, queries, real_keys, query.dtype, kwargs
        )
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5: the extra keys have no relative position, hence no bias
            pad = bias.new_zeros((*bias.shape[:-1], key.shape[2] - real_keys))
            kwargs["position_bias"] = torch.cat([pad, bias], dim=-1)
    return function(module, query, key, value, attention_mask, **kwargs)


def _extended_mask(mask, columns, module, implementation, queries, real_keys, dtype, kwargs):
    """The attention mask with one block of columns per added key set, in front.

    A block is open for the rows its delta applies to (all rows unless routed) and closed for
    the others, so a row without that delta attends exactly as the base model does. Masks come
    as additive floats (eager), booleans (SDPA) or None (SDPA's implicit causal mask, or no
    mask at all), and are given back in the same form.
    """
    if mask is None:
        causal = (
            implementation == "sdpa" and queries > 1
            and kwargs.get("is_causal", getattr(module, "is_causal", True))
        )
        open_ = torch.ones(queries, real_keys, dtype=torch.bool, device=_device(columns, module))
        if causal:  # bottom-right aligned, as SDPA's is_causal would be with a cache in front
            open_ = open_.tril(real_keys - queries)
        mask = open_.view(1, 1, queries, real_keys)
        if implementation == "eager":
            mask = _additive(mask, dtype)
    batch_rows = max([mask.shape[0]] + [c.shape[0] for _, c in columns if c is not None])
    heads, mask_queries = mask.shape[1], mask.shape[2]
    blocks = []
    for count, chosen in columns:
        if chosen is None:
            block = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=mask.device)
        else:
            block = chosen.view(-1, 1, 1, 1)
        block = block.expand(batch_rows, heads, mask_queries, count)
        if mask.dtype != torch.bool:
            # -inf, not the dtype's minimum: a padding query whose own keys are all masked must
            # still give these columns no weight, to stay as it is without the delta
            block = torch.zeros(block.shape, dtype=mask.dtype, device=mask.device).masked_fill(~block, float("-inf"))
        blocks.append(block)
    mask = mask.expand(batch_rows, -1, -1, -1)
    return torch.cat([*blocks, mask], dim=-1)


def _additive(open_: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(open_.shape, dtype=dtype, device=open_.device).masked_fill(~open_, torch.finfo(dtype).min)


def _device(columns, module: nn.Module) -> torch.device:
    for _, chosen in columns:
        if chosen is not None:
            return chosen.device
    return next(module.parameters()).device


def attention_modules(paths: list[str], anatomy) -> list[str]:
    """The attention modules (parents of query or fused qkv projections) among or above ``paths``,
    in model order: a path that already is an attention module stays."""
    found = []
    for path in paths:
        role = anatomy.role_of.get(path)
        parent = path.rpartition(".")[0] if role in ("attn.q", "attn.qkv") else path
        if parent not in found:
            found.append(parent)
    return found


def projection_children(path: str, anatomy) -> dict[str, str]:
    """role -> path of each attention projection directly inside the module at ``path``."""
    prefix = path + "."
    return {
        role: p for p, role in anatomy.role_of.items()
        if p.startswith(prefix) and "." not in p[len(prefix):] and role.startswith("attn.")
    }
