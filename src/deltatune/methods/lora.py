"""LoRA and its variants.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):

    h = W0 x + s · B A x,   A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0 at init,   s = alpha / r

rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"):
s = alpha / √r, so the update's scale does not collapse as r grows.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):

    W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_row,   m initialised to ‖W0‖_row,

where the norm is taken per output unit and treated as a constant in the backward pass
(§4.3 of the paper). The norm is computed from W0 Aᵀ and A Aᵀ, never forming the (out × in)
matrix B A:  ‖W0 + sBA‖²_row = ‖W0‖²_row + 2s·rowsum((W0 Aᵀ) ⊙ B) + s²·rowsum((B A Aᵀ) ⊙ B).

PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation"):
A and B start from the top-r singular triplets of W0 (s·B0 A0 = U_r S_r V_rᵀ). Instead of
rewriting W0 as the residual W0 - s·B0 A0, the delta is kept as s·(B A - B0 A0) with the initial
factors frozen: identical gradients and outputs, the base weight stays untouched (so detach is
exact and a saved delta applies to the original model), at the cost of one more low-rank path.
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
from ..errors import ConfigError, TargetError
from ..fused import LowRankLinear
from ..layer import Delta
from ..targets import validate_pattern

INITS = ("default", "gaussian", "pissa")
BIAS_MODES = ("none", "targets")


@register
@dataclasses.dataclass(frozen=True)
class LoRAConfig(DeltaConfig):
    """Low-rank update of a weight. See the module docstring for the equations.

    ``rank_pattern`` / ``alpha_pattern`` map target patterns to a per-module r / alpha.
    ``bias="targets"`` learns a bias delta for each adapted layer (which must have a bias).
    ``param_dtype="auto"`` keeps the delta in fp32 on a half-precision base (stable optimizer
    updates) while computing in the base's dtype.
    """

    method: ClassVar[str] = "lora"
    # every linear layer but the head: QLoRA (Dettmers et al. 2023, §4) finds this is what
    # matches full fine-tuning, where attention-only LoRA falls short
    default_targets: ClassVar[tuple[str, ...]] = ("all-linear",)
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    #: the Delta class built per module (a hybrid may build a gated subclass)
    delta_class: ClassVar[type] = None  # set below, once LoRADelta exists

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "default"
    bias: str = "none"
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    param_dtype: str = "auto"

    def validate(self) -> None:
        super().validate()
        _check_rank("r", self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_choice("init", self.init, INITS)
        check_choice("bias", self.bias, BIAS_MODES)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.dora and self.init == "pissa":
            raise ConfigError("init='pissa' cannot be combined with dora=True; choose one")
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(patterns, dict):
                raise ConfigError(f"{name} must map target patterns to numbers, got {patterns!r}")
            for pattern, value in patterns.items():
                validate_pattern(pattern)
                if name == "rank_pattern":
                    _check_rank(f"rank_pattern[{pattern!r}]", value)
                else:
                    check_number(f"alpha_pattern[{pattern!r}]", value, low=0, low_open=True)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        backend = backend_for(module)
        if backend is None or not backend.is_linear_map:
            return False
        return backend.takes_activations or not (self.dora or self.init == "pissa")

    def numerics(self) -> dict[str, str]:
        return {"scale": "alpha/sqrt(r)" if self.rslora else "alpha/r"}

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "LoRADelta":
        backend = backend_for(module)
        assert backend is not None
        r = options.get("r", self.r)
        alpha = options.get("alpha", self.alpha)
        if self.bias == "targets" and backend.bias is None:
            raise TargetError(
                f"bias='targets' learns a bias delta, but {path} ({type(module).__name__}) has no bias; "
                "use bias='none' or exclude it"
            )
        if r > min(backend.in_features, backend.out_features) and self.init == "pissa":
            raise ConfigError(f"r={r} exceeds the rank of {path} ({backend.out_features}×{backend.in_features})")
        return self.delta_class(
            self, backend, r=r, scale=self.scale(r, alpha), initialize=initialize, device=options.get("device")
        )

    def per_module_options(self) -> dict[str, dict[str, Any]]:
        return {"r": self.rank_pattern, "alpha": self.alpha_pattern}


def _check_rank(name: str, value: object) -> None:
    check_positive_int(name, value, "the LoRA rank")


class LoRADelta(Delta):
    """A, B (and DoRA's magnitude m, a bias delta, PiSSA's frozen A0, B0) for one layer."""

    def __init__(
        self,
        config: LoRAConfig,
        backend: Backend,
        *,
        r: int,
        scale: float,
        initialize: bool,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.config = config
        self.r = r
        self.scale = scale
        dtype = param_dtype(config.param_dtype, backend.dtype)
        device = device or backend.device
        self.A = nn.Parameter(torch.empty(r, backend.in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(backend.out_features, r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 and backend.takes_activations else None
        self.magnitude = (
            nn.Parameter(torch.empty(backend.out_features, dtype=dtype, device=device)) if config.dora else None
        )
        self.delta_bias = (
            nn.Parameter(torch.zeros(backend.out_features, dtype=dtype, device=device))
            if config.bias == "targets"
            else None
        )
        self.pissa = config.init == "pissa"
        if self.pissa:
            self.register_buffer("A0", torch.empty_like(self.A.data))
            self.register_buffer("B0", torch.empty_like(self.B.data))
        self.merge_depends_on_weight = config.dora
        if initialize:
            self.reset_parameters(backend)

    @torch.no_grad()
    def reset_parameters(self, backend: Backend) -> None:
        if self.config.init == "default":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()
        elif self.config.init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.r)
            self.B.zero_()
        else:
            u, s, vh = torch.linalg.svd(backend.dense_weight().float(), full_matrices=False)
            root = (s[: self.r] / self.scale).sqrt()
            self.A.copy_(root[:, None] * vh[: self.r])
            self.B.copy_(u[:, : self.r] * root[None, :])
            self.A0.copy_(self.A)
            self.B0.copy_(self.B)
        if self.magnitude is not None:
            self.magnitude.copy_(torch.linalg.vector_norm(backend.dense_weight().float(), dim=1))

    def _low_rank(self, x: Tensor, backend: Backend, dtype: torch.dtype) -> Tensor:
        """B A x (minus B0 A0 x for PiSSA), unscaled, computed in ``dtype``."""
        out = F.linear(backend.project_input(x, self.A.to(dtype)), self.B.to(dtype))
        if self.pissa:
            out = out - F.linear(backend.project_input(x, self.A0.to(dtype)), self.B0.to(dtype))
        return out

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        dtype = base_out.dtype
        lora_in = self.dropout(x) if self.dropout is not None else x
        low = self._low_rank(lora_in, backend, dtype)
        if self.magnitude is None:
            out = torch.add(base_out, low, alpha=self.scale)
        else:
            # W'x + b = (m/‖W+sBA‖)·(Wx + sBAx) + b, with Wx = base_out - b
            mag_scale = (self.magnitude / self.weight_norm(backend)).to(dtype)
            bias = backend.bias
            weight_part = base_out if bias is None else base_out - bias.to(dtype)
            out = base_out + (mag_scale - 1) * weight_part + mag_scale * (self.scale * low)
        if self.delta_bias is not None:
            out = out + self.delta_bias.to(dtype)
        return out

    def fused_output(self, x: Tensor, backend: Backend) -> Tensor | None:
        # plain LoRA on a frozen dense layer; dropout in training needs the undropped input for the
        # base product, autocast its own casts; PiSSA's B A x - B0 A0 x cancels exactly at init
        # only as two separate products
        if (type(self).forward is not LoRADelta.forward  # a subclass (UniPELT's gated LoRA) computes otherwise
                or self.magnitude is not None or self.delta_bias is not None or self.pissa
                or (self.dropout is not None and self.training)):
            return None
        # on CPU the fused step saves passes over memory; on CUDA a step of this size waits on the
        # CPU, where one Python autograd function costs more than the native ops it replaces
        # (H200, bench/train_speed.py); under torch.compile the compiler fuses the products itself
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return None
        product = backend.fusable_product()
        if product is None:
            return None
        weight, bias = product
        return LowRankLinear.apply(x, weight, bias, *self.factors(), self.scale)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A', B') with B' A' the unscaled update: A, B, or for PiSSA the stacked [A; A0] and
        [B, −B0], whose product is B A − B0 A0 (rank 2r)."""
        if not self.pissa:
            return self.A, self.B
        return torch.cat([self.A, self.A0.to(self.A.dtype)]), torch.cat([self.B, -self.B0.to(self.B.dtype)], dim=1)

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float] | None:
        if self.magnitude is not None or self.delta_bias is not None or (self.dropout is not None and self.training):
            return None
        return (*self.factors(), self.scale)

    def weight_norm(self, backend: Backend) -> Tensor:
        """‖W0 + s·B A‖ per output unit, without forming B A; detached, as DoRA prescribes."""
        with torch.no_grad():
            w = backend.dense_weight().float()
            a, b, s = self.A.float(), self.B.float(), self.scale
            cross = (F.linear(w, a) * b).sum(dim=1)
            quad = ((b @ (a @ a.T)) * b).sum(dim=1)
            sq = torch.linalg.vector_norm(w, dim=1).square() + 2 * s * cross + s * s * quad
            return sq.clamp_min(0).sqrt()

    def delta_weight(self) -> Tensor:
        """s·B A (minus s·B0 A0 for PiSSA) as (out, in), in fp32."""
        dw = self.B.float() @ self.A.float()
        if self.pissa:
            dw = dw - self.B0.float() @ self.A0.float()
        return self.scale * dw

    def merge_update(self, backend: Backend) -> tuple[Tensor, Tensor | None]:
        dw = self.delta_weight()
        if self.magnitude is not None:
            w = backend.dense_weight().float()
            merged = (self.magnitude.float() / self.weight_norm(backend))[:, None] * (w + dw)
            dw = merged - w
        d_bias = None if self.delta_bias is None else self.delta_bias.detach().float()
        return dw.detach(), d_bias


LoRAConfig.delta_class = LoRADelta
