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
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from ..attention import attention_modules, uses_attention_interface
from ..config import DeltaConfig, check_choice, check_number, check_positive_int, register
from ..errors import ConfigError
from ..layer import Delta
from ..sublayers import with_readers
from .adapters import ACTIVATIONS, ParallelAdapterConfig
from .prefix import ATTENTION_ROLES, PARAM_DTYPES, PrefixDelta, PrefixTuningConfig

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
        return attention_modules(attention, anatomy, {}) + with_readers(writers, anatomy)

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
