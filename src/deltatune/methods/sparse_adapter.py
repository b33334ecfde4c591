"""SparseAdapter: bottleneck adapters with most of their weights pruned to exact zeros.

He, Ding, Dong, Zhang & Tao, 2022, "SparseAdapter: An Easy Approach for Improving the
Parameter-Efficiency of Adapters". The adapter of :mod:`deltatune.methods.adapters` with a
binary mask M on each projection weight,

    A(h) = h + (M_up ⊙ W_up) f((M_down ⊙ W_down) h + b_down) + b_up,

pruned at init so that a ``sparsity`` fraction of each weight matrix (biases are kept) is zero;
the paper finds a larger bottleneck pruned hard ("Large-Sparse") beats a small dense one at the
same parameter count. Pruning is per weight matrix, by one of:

* ``criterion="magnitude"``: drop the smallest |w| (at attach);
* ``criterion="snip"``: drop the smallest |w ⊙ ∂L/∂w| (SNIP, Lee et al. 2019), the gradient
  accumulated over ``calibration_batches`` batches by :func:`deltatune.calibrate` (which
  ``deltatune train`` runs first); the adapter stays dense until then.

``schedule="iterative"`` instead reaches the target gradually while training, by magnitude:
every ``prune_every`` steps the sparsity becomes s·(1 − (1 − t/T)³) (the cubic schedule of Zhu &
Gupta, 2017), T being ``prune_until`` × the total steps, after which it stays at s.

Pruned weights stay exactly zero through training: the forward uses M ⊙ W, so their gradient
is zero, and they are zeroed in the parameter itself, so weight decay leaves them at zero. A
checkpoint stores only the kept values and a bit-packed mask (n/8 bytes per matrix, smaller
than int32 indices down to 1/32 density). Serial placement as Houlsby (``placement="houlsby"``)
or Pfeiffer (the default); not mergeable; mixed batches supported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import Backend, backend_for
from ..config import check_choice, check_number, check_positive_int, register
from ..errors import CheckpointError, ConfigError
from .adapters import SerialAdapter, SerialAdapterConfig

CRITERIA = ("magnitude", "snip")
SCHEDULES = ("once", "iterative")
PLACEMENTS = {"pfeiffer": ("ffn.down",), "houlsby": ("attn.o", "ffn.down")}
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as uint8, eight entries per byte (row-major, zero-padded)."""
    flat = mask.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    bits = (packed[:, None] & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.flatten()[: math.prod(shape)].view(shape)


def keep_largest(scores: Tensor, sparsity: float, allowed: Tensor) -> Tensor:
    """A mask keeping the (1 − sparsity) fraction of entries with the largest scores, among
    those ``allowed`` (pruning only ever removes)."""
    keep = scores.numel() - round(sparsity * scores.numel())
    ranked = torch.where(allowed, scores.float(), torch.tensor(-1.0, device=scores.device))
    mask = torch.zeros_like(allowed)
    mask.view(-1)[torch.topk(ranked.flatten(), keep).indices] = True
    return mask & allowed


@register
@dataclasses.dataclass(frozen=True)
class SparseAdapterConfig(SerialAdapterConfig):
    """A serial bottleneck adapter pruned to ``sparsity``. See the module docstring."""

    method: ClassVar[str] = "sparse_adapter"

    placement: str = "pfeiffer"
    sparsity: float = 0.5
    criterion: str = "magnitude"
    schedule: str = "once"
    prune_every: int = 10
    prune_until: float = 0.5
    calibration_batches: int = 4

    def validate(self) -> None:
        super().validate()
        check_choice("placement", self.placement, tuple(PLACEMENTS))
        check_number("sparsity", self.sparsity, low=0, high=1, high_open=True)
        check_choice("criterion", self.criterion, CRITERIA)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_positive_int("prune_every", self.prune_every)
        check_number("prune_until", self.prune_until, low=0, high=1, low_open=True)
        check_positive_int("calibration_batches", self.calibration_batches)
        if self.init == "zero_up":
            raise ConfigError("init='zero_up' leaves the up-projection all zeros, nothing for pruning to rank; use init='near_identity'")

    @property
    def target_spec(self) -> tuple[str, ...]:
        return self.targets if self.targets is not None else PLACEMENTS[self.placement]

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "SparseAdapterDelta":
        backend = backend_for(module)
        delta = SparseAdapterDelta(self, self.bottleneck_module(backend.out_features, backend, options, initialize))
        if initialize and self.schedule == "once":
            if self.criterion == "magnitude":
                delta.prune(self.sparsity, delta.magnitude_scores())
            else:
                delta.needs_calibration = True
        return delta


class SparseAdapterDelta(SerialAdapter):
    """The adapter with masks on its two projection weights."""

    def __init__(self, config: SparseAdapterConfig, bottleneck):
        super().__init__(config, bottleneck)
        for name in ("down", "up"):
            weight = getattr(bottleneck, name).weight
            # not in the state dict: checkpoints store the mask bit-packed (saved_state)
            self.register_buffer(f"{name}_mask", torch.ones_like(weight, dtype=torch.bool), persistent=False)

    def _projections(self) -> dict[str, tuple[nn.Linear, Tensor]]:
        return {"down": (self.adapter.down, self.down_mask), "up": (self.adapter.up, self.up_mask)}

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        a = self.adapter
        z = base_out.to(a.down.weight.dtype)
        if a.norm is not None:
            z = a.norm(z)
        hidden = a.activation(F.linear(z, a.down.weight * self.down_mask, a.down.bias))
        return base_out + F.linear(hidden, a.up.weight * self.up_mask, a.up.bias).to(base_out.dtype)

    # pruning -----------------------------------------------------------------------------------

    def magnitude_scores(self) -> dict[str, Tensor]:
        return {name: linear.weight.detach().abs() for name, (linear, _) in self._projections().items()}

    @torch.no_grad()
    def prune(self, sparsity: float, scores: dict[str, Tensor]) -> None:
        for name, (linear, mask) in self._projections().items():
            mask.copy_(keep_largest(scores[name], sparsity, mask))
            linear.weight.mul_(mask)

    def finish_calibration(self, backend: Backend) -> None:
        scores = {}
        for name, (linear, _) in self._projections().items():
            if linear.weight.grad is None:
                raise RuntimeError("SparseAdapter's SNIP criterion saw no gradient: the calibration batches did not reach this adapter")
            scores[name] = (linear.weight.detach() * linear.weight.grad).abs()
        self.prune(self.config.sparsity, scores)

    def scheduled_sparsity(self, step: int, total_steps: int) -> float:
        until = max(1, round(self.config.prune_until * total_steps))
        progress = min(1.0, step / until)
        return self.config.sparsity * (1 - (1 - progress) ** 3)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        config = self.config
        if config.schedule != "iterative":
            return
        until = max(1, round(config.prune_until * total_steps))
        if step % config.prune_every == 0 or step == until:
            if step <= until:
                self.prune(self.scheduled_sparsity(step, total_steps), self.magnitude_scores())

    def sparsity(self) -> float:
        """The fraction of pruned entries over both weight matrices."""
        masks = [mask for _, mask in self._projections().values()]
        return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    # checkpoints: kept values and packed masks ---------------------------------------------------

    def saved_state(self) -> dict[str, Tensor]:
        state = {k: v for k, v in self.state_dict().items() if not k.endswith(".weight") or ".norm." in k}
        for name, (linear, mask) in self._projections().items():
            state[f"adapter.{name}.kept_values"] = linear.weight.detach()[mask]
            state[f"adapter.{name}.mask_bits"] = pack_bits(mask)
        return state

    @torch.no_grad()
    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        dense = dict(state)
        for name, (linear, mask) in self._projections().items():
            try:
                bits, values = dense.pop(f"adapter.{name}.mask_bits"), dense.pop(f"adapter.{name}.kept_values")
            except KeyError as exc:
                raise CheckpointError(f"{where}: no {exc.args[0]} in the checkpoint") from None
            loaded = unpack_bits(bits.to(mask.device), mask.shape)
            if int(loaded.sum()) != values.numel():
                raise CheckpointError(f"{where}: the {name} mask keeps {int(loaded.sum())} entries but {values.numel()} values were saved")
            mask.copy_(loaded)
            weight = torch.zeros_like(linear.weight)
            weight[loaded] = values.to(dtype=weight.dtype, device=weight.device)
            dense[f"adapter.{name}.weight"] = weight
        super().load_saved_state(dense, where)
