"""(IA)³: learned vectors that rescale keys, values and the feed-forward hidden activation.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (§3.3):

    softmax(Q (l_k ⊙ K)ᵀ / √d_k) (l_v ⊙ V),      (l_ff ⊙ γ(W_1 x)) W_2

l_k and l_v rescale the outputs of the key and value projections; l_ff rescales the FFN hidden
activation γ(W_1 x) — that is, the *input* of the down projection W_2 (``ffn.down``), not its
output, which is a different and much weaker adaptation (d rather than d_ff parameters). All
vectors start at ones, so the model is unchanged at init.

Merging folds the vectors into the weights: an output scale gives W' = diag(l) W, b' = l ⊙ b;
an input scale gives W' = W diag(l) with the bias unchanged.

Fused q/k/v projections (GPT-2 ``c_attn``, GPT-NeoX/BLOOM/Falcon ``query_key_value``) lay out
q, k and v differently per architecture, so there the whole output is rescaled. That is as
expressive as rescaling k and v alone: an attention logit Σ_i q_i k_i (l_q)_i (l_k)_i depends on
the scales only through the product l_q ⊙ l_k, which l_k alone can represent (rotary position
embeddings, which mix pairs of dimensions, are the exception). It costs d extra parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..backends import Backend, backend_for
from ..config import DeltaConfig, PARAM_DTYPES, check_choice, param_dtype, register
from ..errors import ConfigError
from ..layer import Delta
from ..targets import validate_pattern


@register
@dataclasses.dataclass(frozen=True)
class IA3Config(DeltaConfig):
    """(IA)³ vectors on keys, values (output scale) and the FFN down projection (input scale).

    ``feedforward`` lists the target patterns whose *input* is rescaled (l_ff); every other
    targeted module gets its output rescaled (l_k, l_v).
    """

    method: ClassVar[str] = "ia3"
    default_targets: ClassVar[tuple[str, ...]] = ("attn.k", "attn.v", "attn.qkv", "ffn.down")
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "Linear / Conv1D layers"
    # one scale per feature: large steps are needed to move it (the paper uses 3e-3 with
    # Adafactor on 3B-parameter T0; small models want more)
    default_lr: ClassVar[float] = 1e-2

    feedforward: tuple[str, ...] = ("ffn.down",)
    param_dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.feedforward, str):
            object.__setattr__(self, "feedforward", (self.feedforward,))
        elif isinstance(self.feedforward, list):
            object.__setattr__(self, "feedforward", tuple(self.feedforward))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.feedforward, tuple):
            raise ConfigError(f"feedforward must be a list of target patterns, got {self.feedforward!r}")
        for pattern in self.feedforward:
            validate_pattern(pattern)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.is_linear_map and backend.takes_activations

    def per_module_options(self) -> dict[str, dict[str, Any]]:
        return {"scale_input": {pattern: True for pattern in self.feedforward}}

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "IA3Delta":
        backend = backend_for(module)
        scale_input = bool(options.get("scale_input", False))
        size = backend.in_features if scale_input else backend.out_features
        dtype = param_dtype(self.param_dtype, backend.dtype)  # computed in the base dtype
        scale = torch.empty(size, dtype=dtype, device=options.get("device") or backend.device)
        if initialize:
            nn.init.ones_(scale)
        return IA3Delta(self, scale, scale_input)


class IA3Delta(Delta):
    """One learned vector l: the layer computes W (l ⊙ x) + b (input) or l ⊙ (W x + b) (output)."""

    merge_depends_on_weight = True  # W' depends on W, so unmerging restores a copy

    def __init__(self, config: IA3Config, scale: Tensor, scale_input: bool):
        super().__init__()
        self.config = config
        self.scale = nn.Parameter(scale)
        self.scale_input = scale_input
        self.acts_on = "input" if scale_input else "output"

    def transform_input(self, x: Tensor, backend: Backend) -> Tensor:
        return x * self.scale.to(x.dtype)

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        if self.scale_input:
            return base_out
        return base_out * self.scale.to(base_out.dtype)

    def merge_update(self, backend: Backend) -> tuple[Tensor, Tensor | None]:
        w = backend.dense_weight().float()
        l_minus_one = self.scale.detach().float() - 1
        if self.scale_input:
            return w * l_minus_one[None, :], None
        bias = backend.bias
        return l_minus_one[:, None] * w, None if bias is None else l_minus_one * bias.detach().float()
