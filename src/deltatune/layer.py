"""The one wrapper: a base module and the named deltas attached to it.

``attach`` puts a :class:`DeltaLayer` where a target module was, holding that very module as
``.base``; ``detach`` puts the module back, so the model's own objects (and their bits) are
restored. Which deltas exist, which are active and which are merged is stored here, on the
layers, and nowhere else.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .backends import Backend, backend_for

_HALF = (torch.float16, torch.bfloat16)


class Delta(nn.Module):
    """One named delta on one base layer; each method subclasses it.

    ``forward(x, base_out, backend)`` returns the layer's new output given its input and the
    base layer's output. A mergeable delta also implements :meth:`merge_update`.
    """

    #: merging changes W by an amount that depends on W itself (DoRA), so unmerging must
    #: restore a copy rather than subtract
    merge_depends_on_weight = False

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def merge_update(self, backend: Backend) -> tuple[Tensor, Tensor | None]:
        """(ΔW as (out, in), Δbias or None) such that the merged layer equals this delta's forward."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")


class Routing:
    """Which samples of a batch each delta applies to (set by :func:`deltatune.route`).

    Generation may expand the batch (beams, several sequences per prompt) by repeating each
    sample in place; rows are then mapped back to their sample by integer division.
    """

    def __init__(self, names_per_sample: list[str | None]):
        self.names_per_sample = list(names_per_sample)
        self._cache: dict[tuple[int, torch.device], dict[str, Tensor]] = {}

    def rows_for(self, rows: int, device: torch.device) -> dict[str, Tensor]:
        key = (rows, device)
        if key not in self._cache:
            samples = len(self.names_per_sample)
            if rows % samples:
                raise ValueError(
                    f"route() was given {samples} names but the layer saw a batch of {rows} rows; "
                    "give one name per sample"
                )
            repeat = rows // samples
            groups: dict[str, list[int]] = {}
            for row in range(rows):
                name = self.names_per_sample[row // repeat]
                if name is not None:
                    groups.setdefault(name, []).append(row)
            self._cache[key] = {n: torch.tensor(r, device=device) for n, r in groups.items()}
        return self._cache[key]


class DeltaLayer(nn.Module):
    """Holds ``base`` (the original module, untouched unless merged) and its named deltas."""

    is_delta_layer = True

    def __init__(self, base: nn.Module):
        super().__init__()
        backend = backend_for(base)
        if backend is None:
            raise TypeError(f"no backend for {type(base).__name__}")
        self.base = base
        self.deltas = nn.ModuleDict()
        self.backend = backend
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.routing: Routing | None = None
        self._unmerged: tuple[str, ...] = ()
        self._weights_before_merge: tuple[Tensor, Tensor | None] | None = None

    def __getattr__(self, name: str):
        # code in model files reads e.g. `self.wo.weight.dtype` or `lm_head.out_features`;
        # those must see the base layer's attributes
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def set_active(self, names: Iterable[str]) -> None:
        self.active = tuple(n for n in names if n in self.deltas)
        self._unmerged = tuple(n for n in self.active if n not in self.merged)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base(x, *args, **kwargs)
        if self.routing is not None:
            return self._routed_forward(x, out)
        for name in self._unmerged:
            out = self.deltas[name](x, out, self.backend)
        return out

    def _routed_forward(self, x: Tensor, out: Tensor) -> Tensor:
        # one gather/scatter per delta present in the batch, never a loop over samples
        result = out
        for name, rows in self.routing.rows_for(x.shape[0], x.device).items():
            delta = self.deltas[name] if name in self.deltas else None
            if delta is None:
                continue
            sub = delta(x.index_select(0, rows), out.index_select(0, rows), self.backend)
            result = result.index_copy(0, rows, sub)
        return result

    # merging ---------------------------------------------------------------------------------

    def _apply_update(self, name: str, sign: float) -> None:
        d_weight, d_bias = self.deltas[name].merge_update(self.backend)
        self.backend.add_to_weight(sign * d_weight)
        if d_bias is not None:
            with torch.no_grad():
                bias = self.backend.bias
                bias.copy_(bias.float() + sign * d_bias.float())

    def merge(self, names: Iterable[str], keep_exact: bool | None = None) -> None:
        """Add the named deltas into the base weight.

        Half-precision weights (and weight-dependent deltas such as DoRA) keep a copy of the
        weights from before the first merge, so any number of merge/unmerge cycles restores
        them bit for bit; fp32 weights unmerge by subtraction unless ``keep_exact``.
        """
        todo = [n for n in names if n in self.deltas and n not in self.merged]
        if not todo:
            return
        if keep_exact is None:
            keep_exact = self.backend.dtype in _HALF or any(
                self.deltas[n].merge_depends_on_weight for n in todo
            )
        if keep_exact and self._weights_before_merge is None:
            bias = self.backend.bias
            self._weights_before_merge = (
                self.backend.weight.detach().clone(),
                None if bias is None else bias.detach().clone(),
            )
        for name in todo:
            self._apply_update(name, 1.0)
            self.merged += (name,)
        self.set_active(self.active)

    def unmerge(self, names: Iterable[str]) -> None:
        todo = [n for n in names if n in self.merged]
        if not todo:
            return
        remaining = tuple(n for n in self.merged if n not in todo)
        if self._weights_before_merge is not None:
            weight, bias = self._weights_before_merge
            with torch.no_grad():
                self.backend.weight.copy_(weight)
                if bias is not None:
                    self.backend.bias.copy_(bias)
            self.merged = ()
            for name in remaining:
                self._apply_update(name, 1.0)
                self.merged += (name,)
            if not remaining:
                self._weights_before_merge = None
        else:
            for name in reversed(todo):
                self._apply_update(name, -1.0)
            self.merged = remaining
        self.set_active(self.active)

    def remove(self, name: str) -> None:
        self.unmerge([name])
        del self.deltas[name]
        self.set_active(n for n in self.active if n != name)

    def extra_repr(self) -> str:
        return f"deltas={list(self.deltas)}, active={list(self.active)}, merged={list(self.merged)}"


def delta_layers(model: nn.Module) -> Mapping[str, DeltaLayer]:
    """Every DeltaLayer in the model by path (the path of the module it wraps)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, DeltaLayer)}
