"""KronA: a Kronecker-product update of a weight, and its variant beside the FFN.

Edalati et al., 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter":

    h = W0 x + s · (A ⊗ B) x,    A ∈ R^{a1×a2}, B ∈ R^{b1×b2},  a1·b1 = d_out, a2·b2 = d_in

Unlike a rank-r product B A, a Kronecker product has rank rank(A)·rank(B), so a few hundred
parameters can make a full-rank update. The forward never forms A ⊗ B (d_out × d_in): with the
input x reshaped row-major into X ∈ R^{a2×b2} (x[i·b2 + j] = X[i, j]),

    ((A ⊗ B) x)[p·b1 + q] = Σ_ij A[p, i] B[q, j] X[i, j] = (A X Bᵀ)[p, q],

so (A ⊗ B) x = vec_row(A X Bᵀ) — the row-major form of the usual identity
(A ⊗ B) vec(X) = vec(B X Aᵀ) for column-major vec. That costs a1·a2·b2 + a1·b2·b1 multiply-adds
per token instead of d_out·d_in. Factor shapes default to the divisor of each dimension closest
to its square root (fewest parameters, a1·a2 + b1·b2 ≈ 2√(d_out·d_in)) or are given by
``a_shape``. A starts Kaiming-uniform and B at zero, so the model is unchanged at init (the
LoRA convention). Mergeable: ΔW = s · (A ⊗ B).

**KronA^B_res** (``krona_res``, the paper's best variant): the same Kronecker map as a branch
*beside* the feed-forward sublayer, reading the sublayer input x and adding to its output before
the block's residual add, with a learned scale:  h = FFN(x) + s · (A ⊗ B) x,  s initialised
from ``scale``. Not mergeable (the FFN is nonlinear); the input is handed over as for parallel
adapters (:mod:`deltatune.sublayers`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..backends import Backend, backend_for
from ..config import DeltaConfig, check_number, register
from ..errors import ConfigError, TargetError
from ..layer import Delta
from ..sublayers import BesideSublayer, InputTap, link_pairs, with_readers


def _divisor_near_sqrt(n: int) -> int:
    """The divisor of n closest to √n (the smaller one on a tie)."""
    root = math.isqrt(n)
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - math.sqrt(n)), d > root))


def kronecker_apply(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """(A ⊗ B) x for x of shape (..., a2·b2), as vec_row(A X Bᵀ), never forming A ⊗ B."""
    a1, a2 = a.shape
    b1, b2 = b.shape
    blocks = x.reshape(*x.shape[:-1], a2, b2)
    return (a @ blocks @ b.T).reshape(*x.shape[:-1], a1 * b1)


@dataclasses.dataclass(frozen=True)
class _KroneckerOptions(DeltaConfig):
    """Factor shapes and scale shared by both placements."""

    a_shape: tuple[int, int] | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.a_shape, list):
            object.__setattr__(self, "a_shape", tuple(self.a_shape))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.a_shape is not None and not (
            isinstance(self.a_shape, tuple) and len(self.a_shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.a_shape)
        ):
            raise ConfigError(f"a_shape must be two positive integers (a1, a2), got {self.a_shape!r}")
        check_number("scale", self.scale, low=0, low_open=True)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.is_linear_map and backend.takes_activations

    def factor_shapes(self, path: str, d_out: int, d_in: int) -> tuple[tuple[int, int], tuple[int, int]]:
        a1, a2 = self.a_shape or (_divisor_near_sqrt(d_out), _divisor_near_sqrt(d_in))
        if d_out % a1 or d_in % a2:
            raise TargetError(
                f"a_shape={(a1, a2)} does not divide {path}'s weight ({d_out} out × {d_in} in): "
                "a1 must divide the output size and a2 the input size"
            )
        return (a1, a2), (d_out // a1, d_in // a2)

    def factors(self, path, d_out, d_in, backend, options, initialize) -> tuple[nn.Parameter, nn.Parameter]:
        a_shape, b_shape = self.factor_shapes(path, d_out, d_in)
        dtype = torch.float32 if backend.dtype in (torch.float16, torch.bfloat16) else backend.dtype
        device = options.get("device") or backend.device
        a = torch.empty(a_shape, dtype=dtype, device=device)
        b = torch.zeros(b_shape, dtype=dtype, device=device)
        if initialize:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return nn.Parameter(a), nn.Parameter(b)


@register
@dataclasses.dataclass(frozen=True)
class KronAConfig(_KroneckerOptions):
    """KronA on the targeted weights (default: the attention query and value projections, as
    the paper and LoRA adapt; fused qkv projections where those are fused)."""

    method: ClassVar[str] = "krona"
    default_targets: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v", "attn.qkv")
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "Linear / Conv1D layers"
    default_lr: ClassVar[float] = 2e-3

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "KronADelta":
        backend = backend_for(module)
        a, b = self.factors(path, backend.out_features, backend.in_features, backend, options, initialize)
        return KronADelta(self, a, b)


class KronADelta(Delta):
    """h = base_out + s · (A ⊗ B) x."""

    def __init__(self, config: KronAConfig, a: nn.Parameter, b: nn.Parameter):
        super().__init__()
        self.config = config
        self.A = a
        self.B = b

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        dtype = base_out.dtype
        update = kronecker_apply(self.A.to(dtype), self.B.to(dtype), x.to(dtype))
        return torch.add(base_out, update, alpha=self.config.scale)

    def merge_update(self, backend: Backend) -> tuple[Tensor, None]:
        return self.config.scale * torch.kron(self.A.detach().float(), self.B.detach().float()), None


@register
@dataclasses.dataclass(frozen=True)
class KronAResConfig(_KroneckerOptions):
    """KronA^B_res: a scaled Kronecker branch beside the FFN (targets name ``ffn.down``; the
    input tap on the FFN's first projection is added automatically)."""

    method: ClassVar[str] = "krona_res"
    default_targets: ClassVar[tuple[str, ...]] = ("ffn.down",)
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "the FFN output projection (ffn.down) and its input projection"
    default_lr: ClassVar[float] = 2e-3

    def expand(self, paths: list[str], anatomy) -> list[str]:
        return with_readers(paths, anatomy)

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Delta:
        if options.get("role") not in ("attn.o", "ffn.down"):
            return InputTap(self)
        backend = backend_for(module)
        d_hidden = backend.out_features  # the branch maps the sublayer input (width d) to width d
        a, b = self.factors(path, d_hidden, d_hidden, backend, options, initialize)
        return KronAResDelta(self, a, b)

    def link(self, built: dict[str, Delta], anatomy) -> None:
        link_pairs(built, anatomy)


class KronAResDelta(BesideSublayer):
    """h = FFN(x) + s · (A ⊗ B) x with a learned s."""

    def __init__(self, config: KronAResConfig, a: nn.Parameter, b: nn.Parameter):
        super().__init__()
        self.config = config
        self.A = a
        self.B = b
        self.scale = nn.Parameter(torch.tensor(float(config.scale), dtype=a.dtype, device=a.device))

    def side(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        return self.scale.to(dtype) * kronecker_apply(self.A.to(dtype), self.B.to(dtype), x)
