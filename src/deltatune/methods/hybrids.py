"""Hybrids: several method families under one config and one name.

**MAM adapter** (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", §4.5 "Mix-And-Match"): prefix tuning on the attention (a small budget, n = 30 in the
paper) plus a scaled parallel adapter beside the FFN (most of the budget), the combination the
paper's unified view finds best:

    attention: head = softmax(q [P_K; K]ᵀ · scale + [0; M]) [P_V; V]
    FFN:       h ↦ h + s · W_up f(W_down x + b_down) + b_up,   x the FFN input, s = 4

Each part is the method of its own file (:mod:`.prefix`, :mod:`.adapters`), built by this config
so that one ``attach`` gives one named delta that trains, saves, loads and routes as a unit.
Not mergeable (neither part is); mixed batches are supported (both parts are).

**UniPELT** (Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language
Model Tuning"): LoRA on the query and value projections, prefix tuning on the attention and a
serial bottleneck adapter after the FFN, each scaled by its own learned gate computed from its
input, so the model learns which submodule to use per token:

    LoRA:     h = W0 x + G_L(x) · s B A x,                  G_L(x) = σ(w_L·x + b_L)
    prefix:   o = o₀ + G_P(x) · (o_P − o₀),                 G_P(x) = σ(w_P·x + b_P)
    adapter:  A(h) = h + G_A(h) · W_up f(W_down h),         G_A(h) = σ(w_A·h + b_A)

where o_P and o₀ are the attention outputs with and without the prefix and x is the attention
input at the query's position (the paper multiplies the prefix vectors by a gate from the
layer's input; a gate per query, interpolating the two outputs, keeps that meaning while cached
and uncached decoding stay identical, at the price of a second attention computation in gated
layers). LoRA starts at B = 0 and the adapter at W_up = 0, so only the random prefix changes
the model at init. Not mergeable (the gates depend on the input); mixed batches supported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..anatomy import linear_shape
from ..attention import attention_modules, projection_children, uses_attention_interface
from ..backends import Backend, backend_for
from ..config import DeltaConfig, PARAM_DTYPES, check_choice, check_number, check_positive_int, register
from ..errors import ConfigError
from ..layer import Delta
from ..sublayers import with_readers
from .adapters import ACTIVATIONS, ParallelAdapterConfig, PfeifferConfig, SerialAdapter
from .lora import LoRAConfig, LoRADelta
from .prefix import ATTENTION_ROLES, PrefixDelta, PrefixTuningConfig

FFN_ROLES = ("ffn.down", "ffn.up", "ffn.gate")


@register
@dataclasses.dataclass(frozen=True)
class MAMConfig(DeltaConfig):
    """MAM adapter: prefix tuning on every attention, a parallel adapter beside every FFN.

    ``num_virtual_tokens`` (and ``reparameterize``...) configure the prefixes; ``bottleneck`` or
    ``reduction_factor`` (default: factor 16), ``activation`` and ``scale`` the FFN adapters.
    ``targets`` may name attention projections (``attn.q``/``attn.qkv``) and FFN output
    projections (``ffn.down``) to limit either part.
    """

    method: ClassVar[str] = "mam"
    adapts: ClassVar[str] = "attention modules (by attn.q / attn.qkv) and feed-forward output projections (ffn.down)"
    default_targets: ClassVar[tuple[str, ...]] = (*ATTENTION_ROLES, "ffn.down")
    supports_mixed_batch: ClassVar[bool] = True
    default_lr: ClassVar[float] = 2e-3

    num_virtual_tokens: int = 30
    reparameterize: bool = False
    encoder_embed_dim: int = 512
    encoder_hidden_size: int = 512
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    scale: float = 4.0
    param_dtype: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "the prefix length n")
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        check_number("scale", self.scale, low=0, low_open=True)
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ConfigError(f"give bottleneck ({self.bottleneck}) or reduction_factor ({self.reduction_factor}), not both")
        self.prefix_part()
        self.adapter_part()

    @property
    def calibration_batches(self) -> int:
        return self.prefix_part().calibration_batches

    def prefix_part(self) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            num_virtual_tokens=self.num_virtual_tokens, reparameterize=self.reparameterize,
            encoder_embed_dim=self.encoder_embed_dim, encoder_hidden_size=self.encoder_hidden_size,
            param_dtype=self.param_dtype,
        )

    def adapter_part(self) -> ParallelAdapterConfig:
        return ParallelAdapterConfig(
            bottleneck=self.bottleneck, reduction_factor=self.reduction_factor, activation=self.activation,
            scale=self.scale, param_dtype=self.param_dtype,
        )

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return role in ATTENTION_ROLES or role in FFN_ROLES or uses_attention_interface(module)

    def expand(self, paths: list[str], anatomy) -> list[str]:
        writers = [p for p in paths if anatomy.role_of.get(p) == "ffn.down"]
        attention = [p for p in paths if anatomy.role_of.get(p) not in FFN_ROLES]
        return attention_modules(attention, anatomy) + with_readers(writers, anatomy)

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Delta:
        part = self.adapter_part() if options.get("role") in FFN_ROLES else self.prefix_part()
        delta = part.build(path, module, options, initialize)
        delta.config = self  # the delta reports (and saves) the hybrid it belongs to
        return delta

    def link(self, built: dict[str, Any], anatomy) -> None:
        prefixes = {p: d for p, d in built.items() if isinstance(d, PrefixDelta)}
        if prefixes:
            self.prefix_part().link(prefixes, anatomy)
        adapters = {p: d for p, d in built.items() if not isinstance(d, PrefixDelta)}
        if adapters:
            self.adapter_part().link(adapters, anatomy)


def _gate(width: int, like: Tensor) -> nn.Linear:
    """σ(w·x + b) with default Linear init (gates start near 1/2, as in the paper)."""
    return nn.Linear(width, 1, dtype=like.dtype, device=like.device)


class GatedLoRA(LoRADelta):
    """h = W0 x + σ(w·x + b) · s B A x."""

    def attach_gate(self, width: int) -> None:
        self.gate = _gate(width, self.A)

    def low_rank_factors(self) -> None:
        return None  # the gate depends on x: not a fixed low-rank update

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        dtype = base_out.dtype
        gate = torch.sigmoid(self.gate(x.to(self.A.dtype))).to(dtype)
        return base_out + gate * (self.scale * self._low_rank(x, backend, dtype))


class GatedAdapter(SerialAdapter):
    """A(h) = h + σ(w·h + b) · bottleneck(h)."""

    def attach_gate(self, width: int) -> None:
        self.gate = _gate(width, next(self.adapter.parameters()))

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        h = base_out.to(self.gate.weight.dtype)
        return base_out + (torch.sigmoid(self.gate(h)) * self.adapter(base_out)).to(base_out.dtype)


class GatedPrefix(PrefixDelta):
    """Prefixes whose share of each query's attention output is σ(w·x + b), x the query's input."""

    def attach_gate(self, width: int) -> None:
        self.gate = _gate(width, self.prefix_keys)

    def call(self, module: nn.Module, run, args: tuple, kwargs: dict, rows):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.query_gate = torch.sigmoid(self.gate(hidden.to(self.gate.weight.dtype))).squeeze(-1)
        try:
            return super().call(module, run, args, kwargs, rows)
        finally:
            self.query_gate = None


# the three parts, building their gated deltas (unregistered: only UniPELT uses them)
@dataclasses.dataclass(frozen=True)
class _GatedLoRAPart(LoRAConfig):
    delta_class: ClassVar[type] = GatedLoRA


@dataclasses.dataclass(frozen=True)
class _GatedPrefixPart(PrefixTuningConfig):
    delta_class: ClassVar[type] = GatedPrefix


@dataclasses.dataclass(frozen=True)
class _GatedAdapterPart(PfeifferConfig):
    delta_class: ClassVar[type] = GatedAdapter


@register
@dataclasses.dataclass(frozen=True)
class UniPELTConfig(DeltaConfig):
    """UniPELT: gated LoRA (``r``, ``alpha``) on the query and value projections, gated prefixes
    (``num_virtual_tokens``) on every attention, a gated serial adapter (``bottleneck`` or
    ``reduction_factor``, ``activation``) after every FFN. ``targets`` may name attention query,
    key-value and fused projections and FFN output projections to limit the parts."""

    method: ClassVar[str] = "unipelt"
    adapts: ClassVar[str] = "attention projections (attn.q, attn.v, attn.qkv) and feed-forward output projections (ffn.down)"
    default_targets: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v", "attn.qkv", "ffn.down")
    supports_mixed_batch: ClassVar[bool] = True
    default_lr: ClassVar[float] = 2e-3

    r: int = 8
    alpha: float = 16.0
    num_virtual_tokens: int = 10
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    param_dtype: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        self.lora_part()
        self.prefix_part()
        self.adapter_part()

    def lora_part(self) -> LoRAConfig:
        return _GatedLoRAPart(r=self.r, alpha=self.alpha, param_dtype=self.param_dtype)

    @property
    def calibration_batches(self) -> int:
        return self.prefix_part().calibration_batches

    def prefix_part(self) -> PrefixTuningConfig:
        return _GatedPrefixPart(num_virtual_tokens=self.num_virtual_tokens, param_dtype=self.param_dtype)

    def adapter_part(self) -> PfeifferConfig:
        return _GatedAdapterPart(
            bottleneck=self.bottleneck, reduction_factor=self.reduction_factor, activation=self.activation,
            init="zero_up", param_dtype=self.param_dtype,
        )

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        if role in ("attn.q", "attn.v", "attn.qkv"):
            return self.lora_part().accepts(module, role)
        return role == "ffn.down" or uses_attention_interface(module)

    def expand(self, paths: list[str], anatomy) -> list[str]:
        readers = [p for p in paths if anatomy.role_of.get(p) in ATTENTION_ROLES]
        return [*attention_modules(readers, anatomy), *paths]

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Delta:
        role = options.get("role")
        if role is None:
            delta = self.prefix_part().build(path, module, options, initialize)
            width = _hidden_width(path, options["anatomy"], module)
        elif role == "ffn.down":
            delta = self.adapter_part().build(path, module, options, initialize)
            width = backend_for(module).out_features
        else:
            delta = self.lora_part().build(path, module, options, initialize)
            width = backend_for(module).in_features
        delta.attach_gate(width)
        delta.config = self
        return delta


def _hidden_width(path: str, anatomy, module: nn.Module) -> int:
    """The width of an attention module's input: its query (or fused) projection's input."""
    children = projection_children(path, anatomy)
    role = "attn.q" if "attn.q" in children else "attn.qkv"
    return linear_shape(module.get_submodule(children[role].rpartition(".")[2]))[0]
