"""Bottleneck adapters: Houlsby, Pfeiffer and parallel placements of one small module.

The adapter (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"):

    A(h) = h + W_up f(W_down h + b_down) + b_up,    W_down ∈ R^{m×d}, W_up ∈ R^{d×m}

a down-projection to m ≪ d, a nonlinearity f, an up-projection back to d and an internal skip
connection: 2md + d + m parameters per adapter. Initialised near the identity: both weights
drawn from N(0, 10⁻²) truncated at two standard deviations, zero biases (``init="near_identity"``,
the paper's), or with W_up = 0 so A is exactly the identity (``init="zero_up"``). An optional
new LayerNorm (``layer_norm=True``) adds 2d parameters per adapter, on the adapter's input
(``layer_norm_position="input"``) or on the up-projection's output (``"output"``:
A(h) = h + LN(W_up f(W_down h)), the adapter that HyperFormer's hypernetworks generate, see
:mod:`deltatune.methods.hyper`); to re-train the model's own LayerNorms per task, as the paper
also does, attach ``ln_tuning`` beside it.

Where each one sits. Every transformer sublayer (attention, feed-forward) ends in an output
projection (roles ``attn.o`` and ``ffn.down``) whose result goes, after dropout, into the
residual add — directly in pre-LN models (Llama, GPT-2: ``x + sublayer(LN(x))``) and under the
LayerNorm in post-LN ones (BERT: ``LN(x + sublayer(x))``). The adapters are placed relative to
that projection, so they mean the same thing in both families:

* **Houlsby** (``houlsby``): serial, after the attention output projection and after the FFN
  output projection, before dropout and the residual add: ``W_o z ↦ A(W_o z)``.
* **Pfeiffer** (``pfeiffer``; Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task
  Composition for Transfer Learning"): the same serial adapter after the FFN output projection
  only, half the adapters for nearly the same quality.
* **Parallel** (``parallel``; He et al., 2022, "Towards a Unified View of Parameter-Efficient
  Transfer Learning"): beside the sublayer, reading the sublayer's *input* x and adding to its
  output before the residual add: ``h ↦ h + s · W_up f(W_down x + b_down) + b_up`` with a fixed
  or learned scale s. Beside the FFN by default (the paper's best placement, s = 4), or the
  attention (``targets=["attn.o"]``) or both. The input is handed over from the sublayer's
  first projection by :mod:`deltatune.sublayers`.

None of these is mergeable (f is nonlinear); all of them support mixed batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import Backend, backend_for
from ..config import DeltaConfig, PARAM_DTYPES, check_choice, check_number, check_positive_int, param_dtype, register
from ..errors import ConfigError
from ..layer import Delta
from ..sublayers import BesideSublayer, InputTap, link_pairs, with_readers

ACTIVATIONS: dict[str, Any] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
INITS = ("near_identity", "zero_up")
NORM_POSITIONS = ("input", "output")
DEFAULT_REDUCTION = 16
NEAR_IDENTITY_STD = 1e-2


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(DeltaConfig):
    """What every bottleneck adapter shares; the placements below subclass it.

    Size: ``bottleneck`` (m) or ``reduction_factor`` (m = d / factor, at least 1); with neither,
    the factor is 16. Subclasses choose the projections' parameterisation through
    :meth:`make_projections` (Compacter uses PHM layers there).
    """

    adapts: ClassVar[str] = "the output projections of attention and feed-forward sublayers (attn.o, ffn.down)"
    supports_mixed_batch: ClassVar[bool] = True
    default_lr: ClassVar[float] = 2e-3

    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    init: str = "near_identity"
    layer_norm: bool = False
    layer_norm_position: str = "input"
    param_dtype: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_bottleneck_options(self.bottleneck, self.reduction_factor)
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_choice("init", self.init, INITS)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        check_choice("layer_norm_position", self.layer_norm_position, NORM_POSITIONS)

    def bottleneck_size(self, width: int) -> int:
        return bottleneck_size(width, self.bottleneck, self.reduction_factor)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.is_linear_map and backend.takes_activations

    def make_projections(
        self, width: int, size: int, dtype: torch.dtype, device: torch.device | None
    ) -> tuple[nn.Module, nn.Module]:
        """(down: width → size, up: size → width), uninitialised; :meth:`initialize` fills them."""
        kwargs = dict(dtype=dtype, device=device)
        return nn.Linear(width, size, **kwargs), nn.Linear(size, width, **kwargs)

    @torch.no_grad()
    def initialize(self, down: nn.Module, up: nn.Module) -> None:
        if self.init == "near_identity":
            for projection in (down, up):
                nn.init.trunc_normal_(
                    projection.weight, std=NEAR_IDENTITY_STD, a=-2 * NEAR_IDENTITY_STD, b=2 * NEAR_IDENTITY_STD
                )
        else:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            up.weight.zero_()
        down.bias.zero_()
        up.bias.zero_()

    def bottleneck_module(self, width: int, backend: Backend, options: dict[str, Any], initialize: bool) -> "Bottleneck":
        dtype = param_dtype(self.param_dtype, backend.dtype)
        device = options.get("device") or backend.device
        down, up = self.make_projections(width, self.bottleneck_size(width), dtype, device)
        if initialize:
            self.initialize(down, up)
        norm = nn.LayerNorm(width, dtype=dtype, device=device) if self.layer_norm else None
        return Bottleneck(down, up, ACTIVATIONS[self.activation], norm, norm_on_output=self.layer_norm_position == "output")


def check_bottleneck_options(bottleneck: int | None, reduction_factor: float | None) -> None:
    """The adapter size is given as ``bottleneck`` (m) or ``reduction_factor`` (d / m), not both."""
    if bottleneck is not None and reduction_factor is not None:
        raise ConfigError(f"give bottleneck ({bottleneck}) or reduction_factor ({reduction_factor}), not both")
    if bottleneck is not None:
        check_positive_int("bottleneck", bottleneck, "the adapter's hidden size m")
    if reduction_factor is not None:
        check_number("reduction_factor", reduction_factor, low=1)


def bottleneck_size(width: int, bottleneck: int | None, reduction_factor: float | None) -> int:
    """m: ``bottleneck``, or the width over ``reduction_factor`` (16 when neither is given), at least 1."""
    if bottleneck is not None:
        return bottleneck
    return max(1, round(width / (reduction_factor or DEFAULT_REDUCTION)))


class Bottleneck(nn.Module):
    """W_up f(W_down LN?(h) + b_down) + b_up, or LN(W_up f(W_down h + b_down) + b_up) with the
    norm on the output; computed in the parameters' dtype."""

    def __init__(self, down: nn.Module, up: nn.Module, activation, norm: nn.LayerNorm | None,
                 norm_on_output: bool = False):
        super().__init__()
        self.norm = norm
        self.down = down
        self.up = up
        self.activation = activation
        self.norm_on_output = norm_on_output

    def forward(self, h: Tensor) -> Tensor:
        dtype = next(self.parameters()).dtype
        z = h.to(dtype)
        if self.norm is not None and not self.norm_on_output:
            z = self.norm(z)
        out = self.up(self.activation(self.down(z)))
        return self.norm(out) if self.norm is not None and self.norm_on_output else out


class SerialAdapter(Delta):
    """A(h) = h + bottleneck(h) on the output h of a sublayer's output projection."""

    def __init__(self, config: BottleneckConfig, bottleneck: Bottleneck):
        super().__init__()
        self.config = config
        self.adapter = bottleneck

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        return base_out + self.adapter(base_out).to(base_out.dtype)


class ParallelAdapter(BesideSublayer):
    """h + s · bottleneck(x), x the sublayer input handed over by its :class:`InputTap`."""

    def __init__(self, config: "ParallelAdapterConfig", bottleneck: Bottleneck, device: torch.device | None):
        super().__init__()
        self.config = config
        self.adapter = bottleneck
        dtype = next(bottleneck.parameters()).dtype
        scale = torch.tensor(float(config.scale), dtype=dtype, device=device)
        if config.learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def side(self, x: Tensor) -> Tensor:
        return self.scale * self.adapter(x)


@dataclasses.dataclass(frozen=True)
class SerialAdapterConfig(BottleneckConfig):
    """A serial bottleneck adapter on each targeted output projection."""

    #: the Delta class built per module (a hybrid may build a gated subclass)
    delta_class: ClassVar[type] = SerialAdapter

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> SerialAdapter:
        backend = backend_for(module)
        return self.delta_class(self, self.bottleneck_module(backend.out_features, backend, options, initialize))


@register
@dataclasses.dataclass(frozen=True)
class HoulsbyConfig(SerialAdapterConfig):
    """Houlsby adapters: after the attention and the FFN output projections (module docstring)."""

    method: ClassVar[str] = "houlsby"
    default_targets: ClassVar[tuple[str, ...]] = ("attn.o", "ffn.down")


@register
@dataclasses.dataclass(frozen=True)
class PfeifferConfig(SerialAdapterConfig):
    """Pfeiffer adapters: after the FFN output projection only (module docstring)."""

    method: ClassVar[str] = "pfeiffer"
    default_targets: ClassVar[tuple[str, ...]] = ("ffn.down",)


@register
@dataclasses.dataclass(frozen=True)
class ParallelAdapterConfig(BottleneckConfig):
    """Parallel adapters beside the sublayers whose output projections are targeted.

    ``targets`` name the sublayers' output projections (``ffn.down``, ``attn.o``); the input
    tap on each sublayer's first projection is added automatically. ``scale`` is s (He et al.
    use 4 beside the FFN); ``learn_scale`` makes it a trained scalar per adapter.
    """

    method: ClassVar[str] = "parallel"
    default_targets: ClassVar[tuple[str, ...]] = ("ffn.down",)

    init: str = "zero_up"
    scale: float = 4.0
    learn_scale: bool = False

    def validate(self) -> None:
        super().validate()
        check_number("scale", self.scale, low=0, low_open=True)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return super().accepts(module, role) and role in ("attn.o", "ffn.down", "attn.q", "attn.qkv", "ffn.up", "ffn.gate")

    def expand(self, paths: list[str], anatomy) -> list[str]:
        return with_readers(paths, anatomy)

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Delta:
        if options.get("role") not in ("attn.o", "ffn.down"):
            return InputTap(self)
        backend = backend_for(module)
        bottleneck = self.bottleneck_module(backend.out_features, backend, options, initialize)
        return ParallelAdapter(self, bottleneck, options.get("device") or backend.device)

    def link(self, built: dict[str, Delta], anatomy) -> None:
        link_pairs(built, anatomy)
