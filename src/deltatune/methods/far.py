"""FAR — Freeze And Reconfigure: train a chosen subset of each layer's output features.

Vucetic et al., 2022, "Efficient Fine-Tuning of BERT Models on the Edge". Each targeted linear
layer y = W x + b (W ∈ R^{d_out×d_in}) is split by output feature: a set S of k rows of W is
trained, the other d_out − k rows stay frozen, and the layer output is their concatenation,

    y_i = W_i x + b_i            for i ∉ S   (frozen, the base layer)
    y_i = W'_i x + b'_i          for i ∈ S   (trainable, W'_S and b'_S initialised to W_S, b_S)

so at init the output equals the original (to the rounding of computing k rows apart from the
others; bit for bit once merged back), and backpropagation only ever needs the
gradient of k·(d_in + 1) parameters per layer. Merging writes W'_S, b'_S back into one dense
layer. The paper reconfigures the feed-forward layers (the default targets here).

Which rows form S is decided by a stated measure, k = round(``fraction`` · d_out):

* ``measure="magnitude"``: the rows with the largest L1 norm ‖W_i‖₁, decided when attached;
* ``measure="gradient"``: the rows with the largest accumulated gradient Σ_batches Σ_j |∂L/∂W_ij|
  over ``calibration_batches`` batches, decided by :func:`deltatune.calibrate` (which
  ``deltatune train`` runs on its first batches; until then the rows are those of the magnitude
  measure). The paper ranks nodes by how much they change
  during a short "priming" phase of full fine-tuning; the first-step change is proportional to
  this gradient, which is what is measured here instead of running that phase.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import Backend, backend_for
from ..config import DeltaConfig, check_choice, check_number, check_positive_int, register
from ..layer import Delta

MEASURES = ("magnitude", "gradient")


@register
@dataclasses.dataclass(frozen=True)
class FARConfig(DeltaConfig):
    """FAR on the targeted layers (default: the feed-forward projections). See module docstring."""

    method: ClassVar[str] = "far"
    default_targets: ClassVar[tuple[str, ...]] = ("ffn",)
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "Linear / Conv1D layers"
    quantized_base_blocker: ClassVar[str | None] = (
        "FAR trains rows of the base weight itself and picks them from its gradient; a quantized weight has "
        "neither a gradient nor trainable values (quantize with skip=['ffn'] to keep those layers in full precision)"
    )
    default_lr: ClassVar[float] = 1e-4  # these are the model's own weights, as in full fine-tuning

    fraction: float = 0.1
    measure: str = "magnitude"
    calibration_batches: int = 4

    def validate(self) -> None:
        super().validate()
        check_number("fraction", self.fraction, low=0, high=1, low_open=True)
        check_choice("measure", self.measure, MEASURES)
        check_positive_int("calibration_batches", self.calibration_batches)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.is_linear_map and backend.takes_activations

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "FARDelta":
        backend = backend_for(module)
        count = max(1, round(self.fraction * backend.out_features))
        return FARDelta(self, backend, count, initialize, options.get("device"))


class FARDelta(Delta):
    """The trainable rows W'_S, b'_S of one layer and their indices S (a buffer, saved)."""

    merge_depends_on_weight = True  # the merge writes values over rows of W

    def __init__(self, config: FARConfig, backend: Backend, count: int, initialize: bool, device):
        super().__init__()
        self.config = config
        device = device or backend.device
        dtype = torch.float32 if backend.dtype in (torch.float16, torch.bfloat16) else backend.dtype
        self.register_buffer("rows", torch.zeros(count, dtype=torch.long, device=device))
        self.weight = nn.Parameter(torch.empty(count, backend.in_features, dtype=dtype, device=device))
        has_bias = backend.bias is not None
        self.bias = nn.Parameter(torch.empty(count, dtype=dtype, device=device)) if has_bias else None
        self.needs_calibration = config.measure == "gradient"
        if initialize:
            scores = backend.dense_weight().detach().float().abs().sum(dim=1)
            self.select(backend, scores)

    @torch.no_grad()
    def select(self, backend: Backend, scores: Tensor) -> None:
        """Train the rows with the largest ``scores``, starting from their current values."""
        chosen = torch.topk(scores, self.rows.numel()).indices.sort().values
        self.rows.copy_(chosen)
        self.weight.copy_(backend.dense_weight()[chosen])
        if self.bias is not None:
            self.bias.copy_(backend.bias[chosen])

    def calibration_tensors(self, backend: Backend) -> list[Tensor]:
        return [backend.weight]

    def finish_calibration(self, backend: Backend) -> None:
        grad = backend.weight.grad
        if grad is None:
            raise RuntimeError("FAR's gradient measure saw no gradient: the calibration batches did not reach this layer")
        dense_grad = backend.stored_layout(grad)  # a transpose or nothing: its own inverse
        self.select(backend, dense_grad.detach().float().abs().sum(dim=1))

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        if self.calibrating:
            # the gradient measure reads the base weight's gradient on every row; the copies
            # still equal the base rows, so the output is the same
            return base_out
        dtype = base_out.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        trained = F.linear(x, self.weight.to(dtype), bias)
        return base_out.index_copy(base_out.dim() - 1, self.rows, trained)

    def merge_update(self, backend: Backend) -> tuple[Tensor, Tensor | None]:
        w = backend.dense_weight().detach().float()
        d_weight = torch.zeros_like(w)
        d_weight[self.rows] = self.weight.detach().float() - w[self.rows]
        d_bias = None
        if self.bias is not None:
            b = backend.bias.detach().float()
            d_bias = torch.zeros_like(b)
            d_bias[self.rows] = self.bias.detach().float() - b[self.rows]
        return d_weight, d_bias
