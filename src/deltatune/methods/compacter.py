"""Compacter and PHM adapters: bottleneck adapters whose projections are sums of Kronecker products.

Karimi Mahabadi, Henderson & Ruder, 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers". A parameterized hypercomplex multiplication (PHM) layer builds its weight as

    W = Σ_{i=1..n} A_i ⊗ B_i,    A_i ∈ R^{n×n},  B_i ∈ R^{(k/n)×(d/n)}     (W ∈ R^{k×d})

with n = ``phm_dim`` dividing both sizes. Compacter makes each B_i low rank, B_i = s_i t_iᵀ with
s_i ∈ R^{(k/n)×r}, t_i ∈ R^{(d/n)×r} (r = ``phm_rank``, 1 in the paper), and shares the "rule"
matrices A_i across every adapter projection of the model (one set of n matrices, n³
parameters, learned once). The adapter is the bottleneck adapter of
:mod:`deltatune.methods.adapters` with both projections made PHM layers:

* ``compacter``: Houlsby placement (after ``attn.o`` and ``ffn.down``);
* ``compacter++``: Pfeiffer placement (after ``ffn.down`` only), the paper's leaner variant.

``phm_rank=None`` gives full B_i, the paper's PHM-Adapter (kd/n parameters per projection);
``shared_rule=False`` gives each projection its own A_i.

Parameters, for L adapters of width d and bottleneck m (both projections, biases included):
n³ (shared rule) + L·(2·r·(d + m) + d + m) for Compacter, and L·(2·d·m/n + d + m) + n³ for
PHM-Adapter with a shared rule (add L·2n³ for per-projection rules). W is formed from the
factors once per forward (n·k·d multiply-adds, independent of the batch; adapter matrices are
small) and then applied with one matmul per token.

The rule is a tensor of the module tree like any other: the adapter with the first path (in
sorted order) registers it, the others keep an unregistered reference, so checkpoints store it once, the
optimizer sees it once, and its gradient sums over every layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_positive_int, register
from ..errors import TargetError
from .adapters import SerialAdapterConfig

NEAR_IDENTITY_STD = 1e-2


class PHMRule(nn.Module):
    """The n rule matrices A_i (n × n each)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | None):
        super().__init__()
        self.rule = nn.Parameter(torch.empty(n, n, n, dtype=dtype, device=device))
        with torch.no_grad():
            nn.init.normal_(self.rule, std=1 / math.sqrt(n))  # keeps Σ_i A_i ⊗ B_i at the scale of B


class PHMLinear(nn.Module):
    """y = x Wᵀ + b with W = Σ_i A_i ⊗ B_i and B_i = s_i t_iᵀ (or a full B_i)."""

    def __init__(self, in_features: int, out_features: int, n: int, rank: int | None,
                 dtype: torch.dtype, device: torch.device | None):
        super().__init__()
        self.in_features, self.out_features, self.n = in_features, out_features, n
        rows, cols = out_features // n, in_features // n
        self.full_rank = rank is None
        if self.full_rank:
            self.B = nn.Parameter(torch.empty(n, rows, cols, dtype=dtype, device=device))
        else:
            self.s = nn.Parameter(torch.empty(n, rows, rank, dtype=dtype, device=device))
            self.t = nn.Parameter(torch.empty(n, cols, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        self._shared: tuple[PHMRule] | None = None  # a reference, not a registered submodule

    def use_rule(self, rule: PHMRule, owner: bool) -> None:
        if owner:
            self.own_rule = rule
        else:
            self._shared = (rule,)

    @property
    def rule(self) -> Tensor:
        holder = self._shared[0] if self._shared is not None else self.own_rule
        return holder.rule

    def factors(self) -> Tensor:
        """The n blocks B_i."""
        return self.B if self.full_rank else self.s @ self.t.transpose(1, 2)

    def weight(self) -> Tensor:
        """W = Σ_i A_i ⊗ B_i, (out, in): kron(A, B)[a·p + q, b·c + r] = A[a, b] B[q, r]."""
        a, b = self.rule, self.factors()
        n, p, c = b.shape
        return torch.einsum("iab,iqr->aqbr", a, b).reshape(n * p, n * c)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight(), self.bias)


@dataclasses.dataclass(frozen=True)
class _CompacterOptions(SerialAdapterConfig):
    """PHM projections in a serial bottleneck adapter (see the module docstring)."""

    phm_dim: int = 4
    phm_rank: int | None = 1
    shared_rule: bool = True

    def validate(self) -> None:
        super().validate()
        check_positive_int("phm_dim", self.phm_dim, "n, the number of Kronecker terms")
        if self.phm_rank is not None:
            check_positive_int("phm_rank", self.phm_rank, "the rank of each B_i; null for full B_i")

    def bottleneck_size(self, width: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        # a size from reduction_factor is rounded to a multiple of n, which PHM layers need
        return self.phm_dim * max(1, round(super().bottleneck_size(width) / self.phm_dim))

    def make_projections(self, width, size, dtype, device):
        n = self.phm_dim
        if width % n or size % n:
            raise TargetError(
                f"phm_dim={n} must divide both the hidden size ({width}) and the bottleneck ({size}); "
                "choose another phm_dim, bottleneck or reduction_factor"
            )
        down = PHMLinear(width, size, n, self.phm_rank, dtype, device)
        up = PHMLinear(size, width, n, self.phm_rank, dtype, device)
        if not self.shared_rule:
            for projection in (down, up):
                projection.use_rule(PHMRule(n, dtype, device), owner=True)
        return down, up

    @torch.no_grad()
    def initialize(self, down: PHMLinear, up: PHMLinear) -> None:
        # Var(W) = n·Var(A)·Var(B) = Var(B) with Var(A) = 1/n; Var(s tᵀ) = r·σ⁴. Aim for W with
        # std 1e-2, the near-identity init of Houlsby adapters
        if self.phm_rank is None:
            factor_std = NEAR_IDENTITY_STD
        else:
            factor_std = math.sqrt(NEAR_IDENTITY_STD / math.sqrt(self.phm_rank))
        for projection in (down, up):
            for p in projection.parameters(recurse=False):
                if p is not projection.bias:
                    nn.init.normal_(p, std=factor_std)
            projection.bias.zero_()
        if self.init == "zero_up":
            (up.s if self.phm_rank else up.B).zero_()

    def link(self, built, anatomy) -> None:
        if not self.shared_rule:
            return
        # the owner is found from the paths alone, so a checkpoint loads whatever order they come in
        projections = [p for path in sorted(built) for p in (built[path].adapter.down, built[path].adapter.up)]
        first = projections[0].bias
        rule = PHMRule(self.phm_dim, first.dtype, first.device)
        for index, projection in enumerate(projections):
            projection.use_rule(rule, owner=index == 0)


@register
@dataclasses.dataclass(frozen=True)
class CompacterConfig(_CompacterOptions):
    """Compacter: PHM adapters in the Houlsby placement."""

    method: ClassVar[str] = "compacter"
    default_targets: ClassVar[tuple[str, ...]] = ("attn.o", "ffn.down")
    default_lr: ClassVar[float] = 3e-3


@register
@dataclasses.dataclass(frozen=True)
class CompacterPlusPlusConfig(_CompacterOptions):
    """Compacter++: PHM adapters in the Pfeiffer placement (after the FFN only)."""

    method: ClassVar[str] = "compacter++"
    default_targets: ClassVar[tuple[str, ...]] = ("ffn.down",)
    default_lr: ClassVar[float] = 3e-3
