"""Intrinsic SAID: fine-tuning in a random d-dimensional subspace of the weights.

Aghajanyan, Zettlemoyer & Gupta, 2021, "Intrinsic Dimensionality Explains the Effectiveness of
Language Model Fine-Tuning" (after Li et al., 2018, "Measuring the Intrinsic Dimension of
Objective Landscapes"). The model's weights θ^D move only along a fixed random projection of
one trained vector θ^d (d ≪ D), shared by every targeted layer:

    θ^D = θ^D_0 + P(θ^d)                       (DID, ``per_layer_scale=False``)
    θ^D_m = θ^D_0,m + λ_m P_m(θ^d)             (SAID: one trained scalar λ_m per layer m)

with θ^d = 0 and λ = 1 at init (the identity). Each layer's weight W_m (D_m entries) has its own
Fastfood transform (Le, Sarlós & Smola, 2013) P_m: R^d → R^{D_m},

    P_m v = (H G Π H B v̄)[:D_m] / (‖G‖ √D_m),

where v̄ is v zero-padded to n = 2^⌈log₂ max(D_m, d)⌉, H the n × n Walsh–Hadamard matrix (±1
entries, applied in O(n log n), never built), B a random ±1 diagonal, Π a random permutation and
G a Gaussian diagonal. The scale makes P's columns about unit length. No D × d matrix exists:
a layer keeps d signs, n gains and n permutation indices (O(D)), drawn from ``seed`` and the
layer's path, so a checkpoint stores only θ^d and the λs. The trainable share is (d + layers)
/ D: about 0.004% of BERT-base at the default d = 4000.

:func:`deltatune.analysis.intrinsic_dim` trains at a ladder of d and reports d90, the smallest
d reaching 90% of full fine-tuning's metric.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import Backend, backend_for
from ..config import DeltaConfig, check_positive_int, register
from ..errors import ConfigError
from .sparse_diff import WeightDifference, accepts_weight

#: the Walsh–Hadamard transform is applied as one dense product per group of this many index bits
_BITS_PER_PRODUCT = 5


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """Sylvester's n × n Walsh–Hadamard matrix, H[i, j] = (−1)^popcount(i & j) (n a power of 2)."""
    index = torch.arange(n, device=device)
    bits = (index[:, None] & index[None, :]).to(torch.int64)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).to(dtype)


def walsh_hadamard(v: Tensor) -> Tensor:
    """H v for a vector v of length n = 2^m, in O(n log n): H is the Kronecker product of one
    2 × 2 matrix per index bit, so each group of bits, moved to the top, is one product with a
    small Hadamard matrix, after which a transpose rotates the next group to the top; after all
    m bits the rotation is complete and the order is the original."""
    n = v.numel()
    bits = n.bit_length() - 1
    done = 0
    while done < bits:
        group = min(_BITS_PER_PRODUCT, bits - done)
        size = 1 << group
        v = (hadamard_matrix(size, v.dtype, v.device) @ v.reshape(size, n // size)).T.reshape(n)
        done += group
    return v


@register
@dataclasses.dataclass(frozen=True)
class IntrinsicSAIDConfig(DeltaConfig):
    """Intrinsic SAID: the targeted weights move along a Fastfood projection of one shared
    ``dimension``-sized vector, scaled per layer. See the module docstring."""

    method: ClassVar[str] = "intrinsic_said"
    default_targets: ClassVar[tuple[str, ...]] = ("all-linear",)
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "weight matrices (Linear / Conv1D / the token embedding) other than the output head"
    default_lr: ClassVar[float] = 2e-2

    dimension: int = 4000
    per_layer_scale: bool = True
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_positive_int("dimension", self.dimension, "d, the size of the trained vector θ^d")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return accepts_weight(module, role)

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "IntrinsicDelta":
        return IntrinsicDelta(self, backend_for(module), options.get("device"), path)

    def link(self, built: dict[str, Any], anatomy: Any) -> None:
        # the owner is found from the paths alone, so a checkpoint loads whatever order they come in
        ordered = [built[path] for path in sorted(built)]
        if not ordered:
            return
        owner = ordered[0]
        owner.theta = nn.Parameter(torch.zeros(self.dimension, dtype=owner.dtype, device=owner.device))
        for delta in ordered[1:]:
            delta.shared = (owner,)


class IntrinsicDelta(WeightDifference):
    """One layer's Fastfood transform and λ; θ^d lives in the first layer's delta (by path)."""

    def __init__(self, config: IntrinsicSAIDConfig, backend: Backend, device: torch.device | None, path: str):
        super().__init__(config, backend, device)
        out_features, in_features = self.shape
        self.entries = out_features * in_features
        self.padded = 1 << math.ceil(math.log2(max(self.entries, config.dimension)))
        # not saved: drawn again from the seed and the path when built
        for name, value in fastfood_draw(config.dimension, self.padded, config.seed, path, self.device).items():
            self.register_buffer(name, value, persistent=False)
        self.scale = (nn.Parameter(torch.ones((), dtype=self.dtype, device=self.device))
                      if config.per_layer_scale else None)
        #: the delta holding θ^d, when it is not this one (a reference, not a submodule)
        self.shared: tuple["IntrinsicDelta"] | None = None

    @property
    def intrinsic(self) -> Tensor:
        """θ^d."""
        return self.shared[0].theta if self.shared is not None else self.theta

    def difference_inputs(self) -> list[Tensor]:
        return [self.intrinsic, *([] if self.scale is None else [self.scale])]

    def projection(self) -> Tensor:
        """P_m(θ^d) as (out, in)."""
        v = F.pad(self.intrinsic.float() * self.signs, (0, self.padded - self.config.dimension))
        v = walsh_hadamard(v)
        v = walsh_hadamard(v.index_select(0, self.permutation) * self.gains)
        return (v[: self.entries] / (self.gains.norm() * math.sqrt(self.entries))).view(self.shape)

    def difference(self) -> Tensor:
        projected = self.projection().to(self.dtype)
        return projected if self.scale is None else self.scale * projected

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x, base_out, backend)
        # λ · (x P(θ)ᵀ): λ's gradient then needs the layer's output, not a second dense matrix
        dtype = base_out.dtype
        out = backend.project_input(x, self.projection().to(dtype))
        return base_out + (out if self.scale is None else self.scale.to(dtype) * out)


def fastfood_draw(dimension: int, padded: int, seed: int, path: str, device: torch.device) -> dict[str, Tensor]:
    """B's d signs, G's n gains and Π's n indices for the layer at ``path`` (empty on the meta device)."""
    if device.type == "meta":
        return {"signs": torch.empty(dimension, device=device), "gains": torch.empty(padded, device=device),
                "permutation": torch.empty(padded, dtype=torch.int32, device=device)}
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
    signs = torch.randint(0, 2, (dimension,), generator=generator).float() * 2 - 1
    gains = torch.randn(padded, generator=generator)
    permutation = torch.randperm(padded, generator=generator).to(torch.int32)
    return {"signs": signs.to(device), "gains": gains.to(device), "permutation": permutation.to(device)}
