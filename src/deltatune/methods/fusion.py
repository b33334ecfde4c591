"""AdapterFusion: a trained attention over the outputs of several frozen adapters.

Pfeiffer, Kamath, Rücklé, Cho & Gurevych, 2021, "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning". Adapters trained on separate tasks stay frozen; a fusion
layer beside them learns, per token, how much of each one's output to use. With h the layer's
output before the adapters (the query) and zᵢ = cᵢ(h) − h the change adapter i would make
(for a bottleneck adapter, its up-projection's output):

    o = h + Σᵢ αᵢ V(zᵢ),    αᵢ = softmaxᵢ( Q(h) · K(zᵢ) / T ),

where Q, K, V are d × d linear maps with biases (d the layer's output width) and T the
temperature (1, as in the paper). V starts at the identity (plus 10⁻⁶ off the diagonal, as
AdapterHub does) so that the fused output starts as a convex mix of the adapters' changes;
Q and K start small, N(0, 0.02²), with zero biases, so the initial mix is near uniform:
3(d² + d) parameters per fused layer.

``dt.attach(model, dt.FusionConfig(adapters=["a", "b", "c"]), "f")`` puts one fusion delta on
every layer that holds any of the named adapters, freezes those adapters (their parameters'
``requires_grad`` is switched off, so ``dt.trainable_parameters(model)`` yields the fusion's
alone; switch it back on to train them again) and activates ``dt.Fuse("a", "b", "c",
fusion="f")`` (:mod:`deltatune.composition`). The fusion runs only inside a Fuse block. It
saves and loads like any delta; loading it needs its adapters attached first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..backends import Backend, backend_for
from ..config import DeltaConfig, NAME, PARAM_DTYPES, check_choice, check_number, param_dtype, register
from ..errors import ConfigError, TargetError
from ..layer import Delta
from ..sublayers import InputTap

QUERY_KEY_STD = 0.02
VALUE_OFF_DIAGONAL = 1e-6


class Fusion(Delta):
    """Q, K, V of one fused layer; :meth:`fuse` is the equation of the module docstring."""

    def __init__(self, config: "FusionConfig", width: int, dtype: torch.dtype, device, initialize: bool):
        super().__init__()
        self.config = config
        kwargs = dict(dtype=dtype, device=device)
        self.query = nn.Linear(width, width, **kwargs)
        self.key = nn.Linear(width, width, **kwargs)
        self.value = nn.Linear(width, width, **kwargs)
        if initialize:
            with torch.no_grad():
                for projection in (self.query, self.key):
                    nn.init.normal_(projection.weight, std=QUERY_KEY_STD)
                self.value.weight.fill_(VALUE_OFF_DIAGONAL).fill_diagonal_(1.0)
                for projection in (self.query, self.key, self.value):
                    projection.bias.zero_()

    def fuse(self, h: Tensor, changes: Sequence[Tensor]) -> Tensor:
        """h + Σᵢ αᵢ V(zᵢ) for the changes zᵢ, computed in the fusion's dtype."""
        dtype = self.query.weight.dtype
        z = torch.stack([c.to(dtype) for c in changes], dim=-2)  # (..., n, d)
        scores = (self.key(z) @ self.query(h.to(dtype)).unsqueeze(-1)).squeeze(-1)  # (..., n)
        weights = torch.softmax(scores / self.config.temperature, dim=-1)
        return h + (weights.unsqueeze(-1) * self.value(z)).sum(-2).to(h.dtype)

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        raise RuntimeError(
            "an AdapterFusion delta runs only inside a Fuse block: "
            f"dt.activate(model, dt.Fuse({', '.join(map(repr, self.config.adapters))}, fusion=<its name>))"
        )


@register
@dataclasses.dataclass(frozen=True)
class FusionConfig(DeltaConfig):
    """AdapterFusion over the attached adapters named in ``adapters`` (module docstring).

    It goes wherever those adapters are, so ``targets``, ``exclude``, ``layers``,
    ``modules_to_save`` and ``task_head`` are not options here. ``temperature`` is T.
    """

    method: ClassVar[str] = "fusion"
    adapts: ClassVar[str] = "the layers that hold the adapters it fuses"
    default_lr: ClassVar[float] = 5e-5  # the paper's learning rate for the fusion stage
    standalone: ClassVar[bool] = False

    adapters: tuple[str, ...] = ()
    temperature: float = 1.0
    param_dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.adapters, str):
            object.__setattr__(self, "adapters", tuple(a.strip() for a in self.adapters.split(",") if a.strip()))
        elif isinstance(self.adapters, (list, tuple)):
            object.__setattr__(self, "adapters", tuple(self.adapters))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.adapters, tuple) or not all(isinstance(a, str) and NAME.match(a) for a in self.adapters):
            raise ConfigError(f"adapters must be a list of delta names, got {self.adapters!r}")
        if len(set(self.adapters)) != len(self.adapters):
            raise ConfigError(f"adapters names one adapter twice: {list(self.adapters)}")
        for option in ("targets", "layers"):
            if getattr(self, option) is not None:
                raise ConfigError(f"fusion takes no {option}: it goes on every layer that holds its adapters")
        for option in ("exclude", "modules_to_save", "task_head"):
            if getattr(self, option):
                raise ConfigError(f"fusion takes no {option}: it goes on every layer that holds its adapters")
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)

    def paths_from_attached(self, layers: Mapping[str, Any], paths: Sequence[str] | None) -> list[str]:
        """The layers (path -> DeltaLayer of the model) the fusion goes on: those whose output
        one of its adapters changes (not a parallel adapter's input tap). ``paths`` (from a
        checkpoint) must be such layers."""
        if not self.adapters:
            raise ConfigError("fusion needs adapters=[...]: the names of the attached adapters it fuses")
        attached = {n for layer in layers.values() for n in layer.deltas}
        missing = [a for a in self.adapters if a not in attached]
        if missing:
            have = ", ".join(repr(n) for n in attached) or "none"
            raise ConfigError(
                f"fusion: adapter(s) {', '.join(map(repr, missing))} are not attached to this model "
                f"(attached deltas: {have}); attach or load the adapters before their fusion"
            )
        fused = [
            path for path, layer in layers.items()
            if any(a in layer.deltas and not isinstance(layer.deltas[a], InputTap) for a in self.adapters)
        ]
        if paths is None:
            return fused
        outside = [p for p in paths if p not in fused]
        if outside:
            raise TargetError(f"fusion on {outside[0]}, where none of the adapters {list(self.adapters)} is attached")
        return list(paths)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.is_linear_map and backend.takes_activations

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Fusion:
        backend = backend_for(module)
        device = options.get("device") or backend.device
        return Fusion(self, backend.out_features, param_dtype(self.param_dtype, backend.dtype), device, initialize)

    def builds_on(self) -> tuple[str, ...]:
        """The fused adapters: loaded before the fusion, frozen while it trains."""
        return self.adapters

    def activation_block(self, name: str):
        """The Fuse block that runs the fusion delta called ``name`` over its adapters."""
        from ..composition import Fuse

        return Fuse(*self.adapters, fusion=name)
