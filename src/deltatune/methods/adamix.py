"""AdaMix: a mixture of adaptation modules, stochastically routed while training, averaged after.

AdaMix (Wang et al., 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model
Tuning"). Each adapted layer holds M copies (``copies``, default 4) of the adapter's down- and
up-projections. In every training forward each layer draws one copy of each, independently and
uniformly (stochastic routing, no router parameters):

    i, j ~ U{1..M}:   A(h) = h + W_up⁽ʲ⁾ f(W_down⁽ⁱ⁾ h + b_down⁽ⁱ⁾) + b_up⁽ʲ⁾

Two forward passes of one batch therefore take different routes; the trainer adds the
consistency loss between them (the ``consistency_weight`` hook, λ = ``consistency``):

    L = ½ (CE₁ + CE₂) + λ · ½ (KL(p₁ ‖ p₂) + KL(p₂ ‖ p₁))

At evaluation and inference the copies' weights are averaged (adaptation-module merging),
so inference costs exactly one adapter:

    W̄_down = (1/M) Σᵢ W_down⁽ⁱ⁾,  b̄_down, W̄_up, b̄_up alike:   A(h) = h + W̄_up f(W̄_down h + b̄_down) + b̄_up

:func:`deltatune.fold` replaces the M copies by that one averaged copy (for deployment; a
checkpoint of the folded delta stores one copy and loads as such).

``adamix_lora`` is the same over LoRA's factors (the paper's AdaMix-LoRA): h = W0 x + s·B⁽ʲ⁾A⁽ⁱ⁾x
while training, h = W0 x + s·B̄ Ā x at inference, and merging adds s·B̄ Ā to W0 (the averaged
factors' product, so merged ≡ averaged copies).

The defaults (a bottleneck of 8 after ``ffn.down``; LoRA r = 8 on ``attn.q``, ``attn.v``) deploy
0.1–0.2% of a BERT-base or the bundled model; while training the M copies are M times that.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import Backend, backend_for
from ..config import check_number, check_positive_int, param_dtype, register
from ..errors import CheckpointError, ConfigError
from .adapters import ACTIVATIONS, NEAR_IDENTITY_STD, SerialAdapter, SerialAdapterConfig
from .lora import LoRAConfig, LoRADelta

#: the bottleneck m when neither ``bottleneck`` nor ``reduction_factor`` is given
DEFAULT_BOTTLENECK = 8


def route(copies: int, training: bool) -> tuple[int, int] | None:
    """(i, j): the down- and up-projection copies one training forward uses, drawn independently
    and uniformly from torch's generator; None outside training (the average is used)."""
    if not training:
        return None
    i, j = torch.randint(copies, (2,)).tolist()
    return i, j


def pick(stacked: Tensor, index: int | None) -> Tensor:
    """Copy ``index`` of a stack of M copies (leading dimension), or their mean for None."""
    return stacked.mean(0) if index is None else stacked[index]


class MixedBottleneck(nn.Module):
    """M copies of a bottleneck adapter's projections, stacked: W_down (M, m, d), b_down (M, m),
    W_up (M, d, m), b_up (M, d). Training draws one down and one up copy per forward; otherwise
    the averages are used."""

    def __init__(self, copies: int, width: int, size: int, activation, dtype: torch.dtype, device):
        super().__init__()
        kwargs = dict(dtype=dtype, device=device)
        self.down_weight = nn.Parameter(torch.empty(copies, size, width, **kwargs))
        self.down_bias = nn.Parameter(torch.zeros(copies, size, **kwargs))
        self.up_weight = nn.Parameter(torch.empty(copies, width, size, **kwargs))
        self.up_bias = nn.Parameter(torch.zeros(copies, width, **kwargs))
        self.activation = activation
        #: (i, j) of the last training forward, for tests and inspection
        self.last_route: tuple[int, int] | None = None

    @property
    def copies(self) -> int:
        return self.down_weight.shape[0]

    @torch.no_grad()
    def initialize(self, init: str) -> None:
        """Each copy as the plain adapter initialises its one (``near_identity`` or ``zero_up``)."""
        if init == "near_identity":
            for weight in (self.down_weight, self.up_weight):
                nn.init.trunc_normal_(weight, std=NEAR_IDENTITY_STD, a=-2 * NEAR_IDENTITY_STD, b=2 * NEAR_IDENTITY_STD)
        else:
            for copy in self.down_weight:
                nn.init.kaiming_uniform_(copy, a=math.sqrt(5))
            self.up_weight.zero_()
        self.down_bias.zero_()
        self.up_bias.zero_()

    def forward(self, h: Tensor) -> Tensor:
        chosen = route(self.copies, self.training)
        self.last_route = chosen
        down, up = (None, None) if chosen is None else chosen
        z = h.to(self.down_weight.dtype)
        hidden = self.activation(F.linear(z, pick(self.down_weight, down), pick(self.down_bias, down)))
        return F.linear(hidden, pick(self.up_weight, up), pick(self.up_bias, up))

    @torch.no_grad()
    def fold(self) -> None:
        """Keep only the averaged copy (M = 1); outputs at inference unchanged."""
        for name in ("down_weight", "down_bias", "up_weight", "up_bias"):
            setattr(self, name, nn.Parameter(getattr(self, name).mean(0, keepdim=True)))


class AdaMixAdapter(SerialAdapter):
    """A(h) = h + mixture(h) on a sublayer's output projection (module docstring)."""

    def __init__(self, config: "AdaMixConfig", bottleneck: MixedBottleneck):
        super().__init__(config, bottleneck)
        self.consistency_weight = config.consistency

    def fold(self) -> bool:
        self.adapter.fold()
        return True

    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        _fold_for_saved(self, state, "adapter.down_weight", where)
        super().load_saved_state(state, where)


def _fold_for_saved(delta, state: dict[str, Tensor], key: str, where: str) -> None:
    """A checkpoint written after :func:`deltatune.fold` holds one averaged copy: fold first."""
    saved = state.get(key)
    own = delta.state_dict()[key]
    if saved is not None and saved.shape[0] == 1 and own.shape[0] != 1:
        delta.fold()
    elif saved is not None and saved.shape[0] != own.shape[0]:
        raise CheckpointError(f"{where}: the checkpoint holds {saved.shape[0]} copies, the config says {own.shape[0]}")


def _check_mixture(copies: object, consistency: object) -> None:
    check_positive_int("copies", copies, "M, the number of copies of each projection")
    check_number("consistency", consistency, low=0)


@register
@dataclasses.dataclass(frozen=True)
class AdaMixConfig(SerialAdapterConfig):
    """AdaMix over serial bottleneck adapters (module docstring): ``copies`` M of each projection,
    the consistency loss's weight ``consistency`` (λ). The adapter's own options (placement by
    ``targets``, ``bottleneck``/``reduction_factor``, ``activation``, ``init``) apply to each copy;
    m is 8 when neither size option is given."""

    method: ClassVar[str] = "adamix"
    default_targets: ClassVar[tuple[str, ...]] = ("ffn.down",)

    copies: int = 4
    consistency: float = 1.0

    def validate(self) -> None:
        super().validate()
        _check_mixture(self.copies, self.consistency)
        if self.layer_norm:
            raise ConfigError("layer_norm=True is not available for adamix: each copy is a plain bottleneck")

    def bottleneck_size(self, width: int) -> int:
        if self.bottleneck is None and self.reduction_factor is None:
            return DEFAULT_BOTTLENECK
        return super().bottleneck_size(width)

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> AdaMixAdapter:
        backend = backend_for(module)
        width = backend.out_features
        mixture = MixedBottleneck(self.copies, width, self.bottleneck_size(width), ACTIVATIONS[self.activation],
                                  param_dtype(self.param_dtype, backend.dtype), options.get("device") or backend.device)
        if initialize:
            mixture.initialize(self.init)
        return AdaMixAdapter(self, mixture)


class AdaMixLoRADelta(LoRADelta):
    """LoRA whose A and B are stacks of M copies: one of each per training forward, their means
    otherwise (module docstring)."""

    def __init__(self, config: "AdaMixLoRAConfig", backend: Backend, *, r: int, scale: float, initialize: bool,
                 device: torch.device | None = None):
        super().__init__(config, backend, r=r, scale=scale, initialize=False, device=device)
        copies = config.copies
        self.A = nn.Parameter(self.A.data.unsqueeze(0).repeat(copies, 1, 1))
        self.B = nn.Parameter(self.B.data.unsqueeze(0).repeat(copies, 1, 1))
        self.consistency_weight = config.consistency
        self.last_route: tuple[int, int] | None = None
        if initialize:
            with torch.no_grad():
                for copy in self.A:
                    nn.init.kaiming_uniform_(copy, a=math.sqrt(5))
                self.B.zero_()

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A⁽ⁱ⁾, B⁽ʲ⁾) drawn for this training forward, or (Ā, B̄)."""
        chosen = route(self.A.shape[0], self.training)
        self.last_route = chosen
        down, up = (None, None) if chosen is None else chosen
        return pick(self.A, down), pick(self.B, up)

    def _low_rank(self, x: Tensor, backend: Backend, dtype: torch.dtype) -> Tensor:
        a, b = self.factors()
        return F.linear(backend.project_input(x, a.to(dtype)), b.to(dtype))

    def delta_weight(self) -> Tensor:
        """s·B̄ Ā as (out, in), in fp32: what merging adds."""
        return self.scale * (self.B.float().mean(0) @ self.A.float().mean(0))

    @torch.no_grad()
    def fold(self) -> bool:
        self.A = nn.Parameter(self.A.mean(0, keepdim=True))
        self.B = nn.Parameter(self.B.mean(0, keepdim=True))
        return True

    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        _fold_for_saved(self, state, "A", where)
        super().load_saved_state(state, where)


@register
@dataclasses.dataclass(frozen=True)
class AdaMixLoRAConfig(LoRAConfig):
    """AdaMix over LoRA's factors (module docstring): ``copies`` M of A and of B, consistency
    weight ``consistency``; LoRA's options otherwise (DoRA and PiSSA excluded)."""

    method: ClassVar[str] = "adamix_lora"
    default_targets: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    delta_class: ClassVar[type] = AdaMixLoRADelta

    copies: int = 4
    consistency: float = 1.0

    def validate(self) -> None:
        super().validate()
        _check_mixture(self.copies, self.consistency)
        if self.dora or self.init != "default":
            raise ConfigError(f"adamix_lora mixes plain LoRA factors; dora={self.dora!r} and init={self.init!r} "
                              "are not available (use dora=False, init='default')")
