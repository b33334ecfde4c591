"""Methods that train a selection of the model's own parameters: BitFit, LN tuning, top layers.

None of them adds new structure; each trains some existing parameters. To keep the base model
intact (so ``disabled``, ``detach`` and several deltas on one model work as for any method),
the trained values live in the delta, never in the base module:

* **BitFit** (Ben Zaken, Goldberg & Ravfogel, 2022, "BitFit: Simple Parameter-efficient
  Fine-tuning for Transformer-based Masked Language-models"): train only the bias terms,

      y = W x + (b + Δb),   Δb = 0 at init,

  i.e. an additive Δb on every module whose output ends in "+ b" (Linear, Conv1D, LayerNorm's
  β): the gradient with respect to Δb is the gradient with respect to b, so this *is* training
  b. All biases by default, or a subset by ``targets`` — the paper finds the query bias and the
  FFN intermediate bias (``targets=["attn.q", "ffn.up"]``) almost enough. Models without biases
  (Llama) need ``add_missing=True``, which learns zero-initialised biases on linear layers that
  lack one; those cannot be merged, since the base has no bias to merge into. ``head=True``
  also trains the output head, as a full copy.

* **LN tuning** (Qi, Li, Liu & Wang, 2022, "Parameter-Efficient Tuning on Layer Normalization
  for Pre-trained Language Models"): train only the normalisation layers' gain and bias,

      LN(x) = γ' ⊙ (x − μ)/σ + β',   (γ', β') initialised to the model's (γ, β).

* **Top-layer tuning** (the classic baseline): train every parameter of the last k blocks.

LN tuning, top layers and BitFit's head use a :class:`ParameterCopy`: a trainable copy of a
module's own parameters, with which the module is run in place of its originals. For top
layers that is a second copy of those blocks' weights — the memory price of leaving the base
untouched; full fine-tuning of k blocks also needs a small learning rate (``default_lr`` 1e-4).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..anatomy import is_linear_like
from ..backends import Backend, backend_for
from ..config import DeltaConfig, check_positive_int, master_dtype, register
from ..errors import TargetError
from ..layer import Delta
from ..placement import ParameterCopy


def _has_output_bias(module: nn.Module) -> bool:
    """Whether the module's output ends in "+ bias" over its last dimension."""
    bias = getattr(module, "bias", None)
    if not isinstance(bias, nn.Parameter) or bias.dim() != 1:
        return False
    return is_linear_like(module) or isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


class BiasDelta(Delta):
    """y = base(x) + Δb, with Δb = 0 at init."""

    def __init__(self, config: "BitFitConfig", size: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self.delta_bias = nn.Parameter(torch.zeros(size, dtype=master_dtype(dtype), device=device))

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        return base_out + self.delta_bias.to(base_out.dtype)

    def merge_update(self, backend: Backend) -> tuple[None, Tensor]:
        return None, self.delta_bias.detach().float()

    def merge_blocker(self, backend: Backend) -> str | None:
        if backend.bias is None:
            return (
                "its bias was added by add_missing=True and the base layer has none to merge into; "
                "keep the delta unmerged"
            )
        return None


@register
@dataclasses.dataclass(frozen=True)
class BitFitConfig(DeltaConfig):
    """BitFit: train the biases (all by default). See the module docstring."""

    method: ClassVar[str] = "bitfit"
    # every module; accepts() keeps those with an output bias
    default_targets: ClassVar[tuple[str, ...]] = ("re:.+",)
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = (
        "modules whose output ends in '+ bias' (Linear, Conv1D, LayerNorm); for a model without "
        "biases pass add_missing=True"
    )
    default_lr: ClassVar[float] = 1e-3

    add_missing: bool = False
    head: bool = False

    @property
    def target_spec(self) -> tuple[str, ...]:
        return super().target_spec + (("head",) if self.head else ())

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        if role == "head" and self.head:
            return backend_for(module) is not None
        return _has_output_bias(module) or (self.add_missing and is_linear_like(module) and role != "head")

    def expand(self, paths: list[str], anatomy) -> list[str]:
        if not paths or (self.head and paths == [anatomy.head]):
            raise TargetError(
                "no targeted module has a bias to train (Llama-style models have none); pass "
                "add_missing=True to learn zero-initialised biases on the linear layers"
            )
        return paths

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Delta:
        device = options.get("device")
        if options.get("role") == "head" and self.head:
            return ParameterCopy(self, module, initialize, device)
        backend = backend_for(module)
        return BiasDelta(self, backend.out_features, backend.dtype, device or backend.device)


@register
@dataclasses.dataclass(frozen=True)
class LNTuningConfig(DeltaConfig):
    """LN tuning: train the gain and bias of every normalisation layer (role ``norm``)."""

    method: ClassVar[str] = "ln_tuning"
    default_targets: ClassVar[tuple[str, ...]] = ("norm",)
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "modules with parameters of their own (normalisation layers)"
    default_lr: ClassVar[float] = 1e-3

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return backend_for(module) is not None

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Delta:
        return ParameterCopy(self, module, initialize, options.get("device"))


@register
@dataclasses.dataclass(frozen=True)
class TopLayersConfig(DeltaConfig):
    """Train every parameter of the last ``k`` blocks of each stack (targets default to every
    module in those blocks; ``layers`` defaults to ``"top:k"``)."""

    method: ClassVar[str] = "top_layers"
    default_targets: ClassVar[tuple[str, ...]] = ("re:.+",)
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "modules with parameters of their own"
    default_lr: ClassVar[float] = 1e-4
    quantized_base_blocker: ClassVar[str | None] = (
        "top-layer tuning trains copies of the blocks' own weights, and a quantized weight cannot be trained "
        "(quantize with skip=['re:...'] over those blocks to keep them in full precision)"
    )

    k: int = 2

    def __post_init__(self) -> None:
        check_positive_int("k", self.k, "the number of top blocks to train")
        if self.layers is None:
            object.__setattr__(self, "layers", f"top:{self.k}")
        super().__post_init__()

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return backend_for(module) is not None

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Delta:
        return ParameterCopy(self, module, initialize, options.get("device"))
