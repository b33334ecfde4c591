"""The one wrapper: a base module and the named deltas attached to it.

``attach`` puts a :class:`DeltaLayer` where a target module was, holding that very module as
``.base``; ``detach`` puts the module back, so the model's own objects (and their bits) are
restored. Which deltas exist, which are active and which are merged is stored here, on the
layers, and nowhere else.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .backends import Backend, layer_backend
from .errors import CheckpointError, ConfigError

_HALF = (torch.float16, torch.bfloat16)


#: the points at which a delta changes its layer's computation (:attr:`Delta.acts_on`)
ACTS_ON = ("output", "input", "parameters", "call", "new output")


class Delta(nn.Module):
    """One named delta on one base layer; each method subclasses it.

    A delta changes its layer's computation at one point, which ``acts_on`` (one of
    :data:`ACTS_ON`, a class attribute or set per instance) declares, so the layer runs only
    what is used:

    * ``"output"``: ``forward(x, base_out, backend)`` -> the new output, given the layer's input
      and the base layer's output (LoRA, bottleneck adapters, BitFit's bias);
    * ``"input"``: ``transform_input(x, backend)``, the input the base layer (and the other
      deltas) see, e.g. (IA)³'s rescaling of the FFN hidden activation;
    * ``"parameters"``: ``parameter_values(backend)``, values the base module runs with in place
      of its own parameters (trained copies: LN tuning, top layers). Several such deltas active
      at once combine as base + Σ (values − base), in the forward and when merged;
    * ``"call"``: :meth:`call`, for a delta on a container module (an attention module, the
      model body): it runs the module's whole call, changing its arguments, its result, or what
      its attention reads (prefixes, prompts);
    * ``"new output"``: ``forward`` returns an output of its own that may differ in width from
      the base layer's (a task head, :mod:`deltatune.heads`); under :func:`deltatune.route`
      rows of different widths are padded to the widest (see :func:`padded_rows`).

    A mergeable delta implements :meth:`merge_update` (a linear layer's ΔW and Δbias) or, for
    any other parameters, :meth:`merge_parameters`.
    """

    #: merging changes W by an amount that depends on W itself (DoRA, IA3, parameter copies),
    #: so unmerging must restore a copy rather than subtract
    merge_depends_on_weight = False
    #: where the delta acts: one of ACTS_ON (class docstring)
    acts_on = "output"
    #: set (per instance) when the delta decides part of its structure from a few batches of
    #: data, in :func:`deltatune.calibrate` (FAR's columns, SparseAdapter's gradient pruning)
    needs_calibration = False
    #: True while :func:`deltatune.calibrate` runs its batches
    calibrating = False

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        return base_out

    def transform_input(self, x: Tensor, backend: Backend) -> Tensor:
        return x

    def fused_output(self, x: Tensor, backend: Backend) -> Tensor | None:
        """With ``acts_on == "output"``, when this is the layer's only active delta: the layer's
        whole output, the base product included, computed in one fused step
        (:mod:`deltatune.fused`); None (the default) where this delta cannot, and the layer then
        runs its base module and :meth:`forward`. Equal to ``forward(x, base(x), backend)``."""
        return None

    def parameter_values(self, backend: Backend) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not override its layer's parameters")

    def call(self, module: nn.Module, run, args: tuple, kwargs: dict, rows: "RowSelector"):
        """With ``acts_on == "call"``: the result of calling ``module`` (the base module), where
        ``run(*args, **kwargs)`` calls it (through the deltas wrapped inside this one). ``rows``
        says which samples of the batch this delta applies to under :func:`deltatune.route`."""
        raise NotImplementedError(f"{type(self).__name__} does not wrap its module's call")

    # merging ---------------------------------------------------------------------------------

    def merge_update(self, backend: Backend) -> tuple[Tensor | None, Tensor | None]:
        """(ΔW as (out, in) or None, Δbias or None) such that the merged layer equals this
        delta's forward."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")

    def merge_parameters(self, backend: Backend) -> dict[str, Tensor]:
        """Base parameter name -> the amount to add to it, in that parameter's stored layout."""
        d_weight, d_bias = self.merge_update(backend)
        changes = {}
        if d_weight is not None:
            changes["weight"] = backend.stored_layout(d_weight)
        if d_bias is not None:
            changes["bias"] = d_bias
        return changes

    def merge_blocker(self, backend: Backend) -> str | None:
        """Why this delta cannot be merged into this particular layer, or None when it can."""
        return None

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """(A, B, s) when this delta's forward is exactly base_out + s·B A x, so that a mixed
        batch can run it together with other such deltas in one batched product; else None."""
        return None

    # checkpoints -----------------------------------------------------------------------------

    def saved_state(self) -> dict[str, Tensor]:
        """The tensors a checkpoint stores for this delta (default: its state dict)."""
        return dict(self.state_dict())

    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        """Fill this delta from :meth:`saved_state`'s output; ``where`` names it in errors."""
        expected = self.state_dict()
        if set(state) != set(expected):
            raise CheckpointError(f"{where}: saved tensors are {sorted(state)}, but this delta has {sorted(expected)}")
        with torch.no_grad():
            for key, value in state.items():
                target = expected[key]
                if target.shape != value.shape:
                    raise CheckpointError(
                        f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(value.to(dtype=target.dtype, device=target.device))

    # data-driven structure and training schedules ---------------------------------------------

    def calibration_tensors(self, backend: Backend) -> list[Tensor]:
        """Tensors whose gradients :meth:`finish_calibration` reads (e.g. the base weight)."""
        return []

    def finish_calibration(self, backend: Backend) -> None:
        """Decide the structure from the gradients accumulated by :func:`deltatune.calibrate`."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer after every optimizer step (e.g. iterative pruning)."""

    #: with ``acts_on == "call"``: why the trainer does not pack its batches (it pads them), as
    #: the end of a sentence that starts with the method's name
    unpacked_because = "adds its own tokens or attention to every sequence"
    #: above 0: the trainer runs each training batch through the model twice (this delta's
    #: random choices differ between the passes) and adds this weight times the symmetric KL
    #: divergence between the two passes' predictions (AdaMix's consistency loss); see
    #: :func:`deltatune.consistency_weight`
    consistency_weight = 0.0

    def training_penalty(self) -> Tensor | None:
        """A term the trainer adds to the training loss (e.g. Diff Pruning's expected L0
        norm times its weight), or None (default)."""
        return None

    #: under :func:`deltatune.task_route`: the task of each sample of the batch (a delta that
    #: routes tasks itself, e.g. a hypernetwork's); None otherwise
    per_sample_tasks: list[str | None] | None = None

    def backward_activations(self, seq_len: int, attention: str) -> int | None:
        """For a delta that runs the module it wraps without autograd (a side network): the
        activation elements per token its own backward keeps, which replace the wrapped layers'
        in :func:`deltatune.analysis.memory.estimate_training_memory` (``attention``: sdpa or
        eager, whose scores add ``heads · seq_len``); None (default): the layers keep theirs."""
        return None

    def fold(self) -> bool:
        """Replace a training-time reparameterisation (prefix tuning's MLP, P-tuning's
        encoder) by the plain tensors it produces now, outputs unchanged; whether this delta
        is one that folds (default: no)."""
        return False


def rows_per_sample(rows: int, samples: int, what: str) -> int:
    """How many rows of a batch each of ``samples`` samples has: generation repeats every sample
    in place (beams, several sequences per prompt), so row r belongs to sample r // that."""
    if rows % samples:
        raise ConfigError(f"{what} covers {samples} samples but the layer saw a batch of {rows} rows; "
                          "give one per sample of the batch")
    return rows // samples


class Routing:
    """Which samples of a batch each delta applies to (set by :func:`deltatune.route`).

    Generation may expand the batch (beams, several sequences per prompt) by repeating each
    sample in place; rows are then mapped back to their sample by integer division.
    """

    def __init__(self, names_per_sample: list[str | None], stacks: dict | None = None):
        self.names_per_sample = list(names_per_sample)
        self._cache: dict[tuple, Any] = {}
        #: per layer: all its low-rank deltas' factors stacked (see stacked_factors); a caller
        #: may own this dict and hand it to later routings (see route())
        self.stacks: dict[int, _Stack] = {} if stacks is None else stacks

    def rows_for(self, rows: int, device: torch.device) -> dict[str, Tensor]:
        key = (rows, device)
        if key not in self._cache:
            repeat = rows_per_sample(rows, len(self.names_per_sample), "route()'s list of names")
            groups: dict[str, list[int]] = {}
            for row in range(rows):
                name = self.names_per_sample[row // repeat]
                if name is not None:
                    groups.setdefault(name, []).append(row)
            self._cache[key] = {n: torch.tensor(r, device=device) for n, r in groups.items()}
        return self._cache[key]

    def layer_plan(self, layer: "DeltaLayer", rows: int, device: torch.device) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """``layer``'s routed deltas with their rows, and the names of the plain low-rank ones
        among them (:meth:`Delta.low_rank_factors`) when two or more are: those run as one
        product batched over the deltas. Kept for the routing's next forwards without gradients.
        A delta the layer's kept stack holds (:meth:`stacked_factors`) is low-rank without asking
        it again, so that a new routing over stacked deltas plans each layer by set operations."""
        key = ("plan", id(layer), layer.training, rows, device)
        if key in self._cache:
            return self._cache[key]
        deltas = layer.deltas
        rows_by_name = {n: r for n, r in self.rows_for(rows, device).items() if n in deltas}
        low_rank: tuple[str, ...] = ()
        if layer.backend.takes_activations:
            held = self.stacks.get(id(layer))
            stacked = held.members if held is not None and held.training == layer.training else frozenset()
            low_rank = tuple(n for n in deltas if n in rows_by_name
                             and (n in stacked or deltas[n].low_rank_factors() is not None))
            if len(low_rank) < 2:  # a single one is cheaper on its own rows alone
                low_rank = ()
        if not torch.is_grad_enabled():
            self._cache[key] = (rows_by_name, low_rank)
        return rows_by_name, low_rank

    def stacked_factors(self, layer: "DeltaLayer", names: tuple[str, ...],
                        dtype: torch.dtype) -> tuple[tuple[str, ...], Tensor, Tensor]:
        """The low-rank factors of ``layer``'s deltas ``names`` stacked (:func:`_stack_factors`)
        and the names of their slots. When nothing needs their gradients the layer's stack is
        kept (in :attr:`stacks`) and serves every later batch whose deltas it holds: it takes
        all the layer's low-rank deltas, and a batch with few of them takes their slots out of
        it (once per routing) where the whole stack would hold more than twice as many plus
        eight (a delta without rows in the batch costs a slot of discarded products)."""
        factors = {n: layer.deltas[n].low_rank_factors() for n in names} if torch.is_grad_enabled() else None
        if factors is not None and any(t.requires_grad for a, b, _ in factors.values() for t in (a, b)):
            return (names, *_stack_factors(factors, dtype))  # fresh: the products carry their gradients
        key = ("stack", id(layer), names, dtype)
        if key in self._cache:
            return self._cache[key]
        held = self.stacks.get(id(layer))
        if held is None or held.dtype != dtype or held.training != layer.training or not held.members.issuperset(names):
            every = {n: f for n, d in layer.deltas.items() if (f := d.low_rank_factors()) is not None}
            held = _Stack(tuple(every), frozenset(every), dtype, layer.training, *_stack_factors(every, dtype))
            self.stacks[id(layer)] = held
        if len(held.names) <= 2 * len(names) + 8:
            chosen = (held.names, held.a_slots, held.b_slots)
        else:
            slots = torch.tensor([held.names.index(n) for n in names], device=held.a_slots.device)
            chosen = (names, held.a_slots.index_select(0, slots), held.b_slots.index_select(0, slots))
        self._cache[key] = chosen
        return chosen

    def slot_groups(self, names: tuple[str, ...], rows: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
        """The rows of each of ``names`` side by side for a product batched over the deltas:
        ``gather`` (len(names)·per_slot,) takes delta k's rows into places k·per_slot onwards
        (places beyond a delta's rows repeat row 0 and are dropped), ``kept`` are the places that
        hold a row and ``rows_kept`` those rows; ``per_slot`` is the most rows any delta has."""
        key = ("groups", names, rows, device)
        if key not in self._cache:
            by_name = self.rows_for(rows, device)
            members = [by_name[name].tolist() if name in by_name else [] for name in names]
            per_slot = max(1, *(len(m) for m in members))
            gather = [m[j] if j < len(m) else 0 for m in members for j in range(per_slot)]
            kept = [number * per_slot + j for number, m in enumerate(members) for j in range(len(m))]
            rows_kept = [row for m in members for row in m]
            self._cache[key] = (*(torch.tensor(t, dtype=torch.long, device=device) for t in (gather, kept, rows_kept)), per_slot)
        return self._cache[key]


class _Stack(NamedTuple):
    """A layer's low-rank deltas' factors stacked (:func:`_stack_factors`), as a routing keeps them."""

    names: tuple[str, ...]     # the deltas in slot order
    members: frozenset[str]
    dtype: torch.dtype
    training: bool             # the layer's mode when stacked: which deltas were low-rank depends on it
    a_slots: Tensor
    b_slots: Tensor


class RowSelector:
    """Which rows of a batch one delta applies to: all of them, or those :class:`Routing` gives it."""

    def __init__(self, name: str, routing: Routing | None):
        self.name = name
        self.routing = routing

    def mask(self, rows: int, device: torch.device) -> Tensor | None:
        """A (rows,) bool tensor of the rows this delta applies to; None when it applies to all."""
        if self.routing is None:
            return None
        chosen = torch.zeros(rows, dtype=torch.bool, device=device)
        index = self.routing.rows_for(rows, device).get(self.name)
        if index is not None:
            chosen[index] = True
        return chosen


class DeltaLayer(nn.Module):
    """Holds ``base`` (the original module, untouched unless merged) and its named deltas."""

    is_delta_layer = True

    def __init__(self, base: nn.Module):
        super().__init__()
        backend = layer_backend(base)
        if backend is None:
            raise TypeError(f"{type(base).__name__} holds no parameters of its own; there is nothing to adapt")
        self.base = base
        self.deltas = nn.ModuleDict()
        self.backend = backend
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.routing: Routing | None = None
        #: a composition block (:mod:`deltatune.composition`) that combines the active deltas'
        #: outputs, set by :func:`deltatune.activate`; None: they run in order
        self.composition = None
        #: AdapterDrop (:func:`deltatune.adapter_drop`): run the base module alone
        self.dropped = False
        self._unmerged: tuple[str, ...] = ()
        self._plain = True
        self._wrapping: tuple[str, ...] = ()
        self._holds_wrapping = False
        self._params_before_merge: dict[str, Tensor] | None = None
        #: the quantized module while merged deltas live in its dequantized copy
        self._quantized_base: nn.Module | None = None

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
        chosen = [self.deltas[n] for n in self._unmerged]
        # the common case (only additive deltas) keeps the fastest path
        self._plain = not any(d.acts_on in ("input", "parameters") for d in chosen)
        self._wrapping = tuple(n for n in self._unmerged if self.deltas[n].acts_on == "call")
        self._holds_wrapping = any(d.acts_on == "call" for d in self.deltas.values())

    def forward(self, *args, **kwargs):
        if self.dropped:
            return self.base(*args, **kwargs)
        if self._holds_wrapping:  # containers only: linear layers keep their path below
            wrapping = self._routed_wrapping() if self.routing is not None else self._wrapping
            if wrapping:
                return self._wrapped_call(wrapping, args, kwargs)
        if not args:  # a container whose wrapping deltas are all off: just the module
            return self.base(**kwargs)
        x, args = args[0], args[1:]
        if self.routing is not None:
            return self._routed_forward(x, args, kwargs)
        if self.composition is not None:
            return self.composition(self, x, self.base(x, *args, **kwargs))
        if self._plain:
            if len(self._unmerged) == 1 and not args and not kwargs:
                fused = self.deltas[self._unmerged[0]].fused_output(x, self.backend)
                if fused is not None:
                    return fused
            out = self.base(x, *args, **kwargs)
            for name in self._unmerged:
                out = self.deltas[name](x, out, self.backend)
            return out
        return self._forward_with(self._unmerged, x, args, kwargs)

    def _routed_wrapping(self) -> tuple[str, ...]:
        present = dict.fromkeys(n for n in self.routing.names_per_sample if n is not None)
        return tuple(n for n in present if n in self.deltas and self.deltas[n].acts_on == "call")

    def _wrapped_call(self, names: tuple[str, ...], args: tuple, kwargs: dict):
        """Each wrapping delta runs the call of the next one; the innermost runs the module."""
        run = self.base
        for name in reversed(names):
            run = _bind_call(self.deltas[name], self.base, run, RowSelector(name, self.routing))
        return run(*args, **kwargs)

    def _forward_with(self, names: tuple[str, ...], x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        chosen = [self.deltas[n] for n in names]
        for delta in chosen:
            if delta.acts_on == "input":
                x = delta.transform_input(x, self.backend)
        overriding = [d for d in chosen if d.acts_on == "parameters"]
        if overriding:
            out = functional_call(self.base, self._combined_values(overriding), (x, *args), kwargs)
        else:
            out = self.base(x, *args, **kwargs)
        for delta in chosen:
            if delta.acts_on != "parameters":
                out = delta(x, out, self.backend)
        return out

    def _combined_values(self, overriding: list[Delta]) -> dict[str, Tensor]:
        if len(overriding) == 1:
            return overriding[0].parameter_values(self.backend)
        own = self._own_parameters()
        values: dict[str, Tensor] = {}
        for delta in overriding:
            for name, value in delta.parameter_values(self.backend).items():
                values[name] = values.get(name, own[name]) + (value - own[name])
        return values

    def _routed_forward(self, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        # pure low-rank deltas (plain LoRA) all at once, by products batched over the deltas; any other
        # delta by one gather/scatter of its rows; never a loop over samples
        out = self.base(x, *args, **kwargs)
        rows_by_name, low_rank = self.routing.layer_plan(self, x.shape[0], x.device)
        result = self._low_rank_rows(x, out, low_rank) if low_rank else out
        wider: list[tuple[Tensor, Tensor]] = []
        for name, rows in rows_by_name.items():
            if name in low_rank:
                continue
            delta = self.deltas[name]
            x_rows = x.index_select(0, rows)
            if delta.acts_on in ("input", "parameters"):
                sub = self._forward_with((name,), x_rows, args, kwargs)
            else:
                sub = delta(x_rows, out.index_select(0, rows), self.backend)
            if sub.shape[-1] != out.shape[-1]:  # a task head of another width
                wider.append((rows, sub))
            else:
                result = result.index_copy(0, rows, sub)
        if wider:
            result = padded_rows([(torch.arange(x.shape[0], device=x.device), result), *wider], result)
        return result

    def _low_rank_rows(self, x: Tensor, out: Tensor, names: tuple[str, ...]) -> Tensor:
        """``out`` plus s·B A x on each delta's rows, for two or more plain low-rank deltas ``names``.

        Their factors are stacked (:meth:`Routing.stacked_factors`; kept while nothing needs their
        gradients) and each delta's rows taken side by side (:meth:`Routing.slot_groups`), so the
        update is two matrix products batched over the deltas, each reading its delta's factors
        once, whether a row holds one token (a decoding step) or many. Without gradients the
        update is added into ``out`` in place: rows of no low-rank delta are not touched."""
        routing, rows, dtype = self.routing, x.shape[0], out.dtype
        names, a_slots, b_slots = routing.stacked_factors(self, names, dtype)
        gather, kept, rows_kept, per_slot = routing.slot_groups(names, rows, x.device)
        side_by_side = x.to(dtype).index_select(0, gather).reshape(len(names), -1, x.shape[-1])
        update = torch.bmm(torch.bmm(side_by_side, a_slots), b_slots)  # (deltas, per_slot·tokens, out)
        update = update.reshape(len(names) * per_slot, *out.shape[1:]).index_select(0, kept)
        if torch.is_grad_enabled():
            return out.index_add(0, rows_kept, update)
        return out.index_add_(0, rows_kept, update)

    # merging ---------------------------------------------------------------------------------

    def _own_parameters(self) -> dict[str, Tensor]:
        return dict(self.base.named_parameters(recurse=False))

    def _merge_changes(self, name: str) -> dict[str, Tensor]:
        delta = self.deltas[name]
        if delta.acts_on != "parameters":
            return delta.merge_parameters(self.backend)
        # relative to the parameters from before any merge, as the forward combines them
        original = self._params_before_merge
        return {n: v.detach().float() - original[n].float() for n, v in delta.parameter_values(self.backend).items()}

    def _apply_update(self, name: str, sign: float) -> None:
        params = self._own_parameters()
        with torch.no_grad():
            for param_name, change in self._merge_changes(name).items():
                param = params[param_name]
                param.add_(change.to(device=param.device, dtype=param.dtype), alpha=sign)

    def merge(self, names: Iterable[str], keep_exact: bool | None = None) -> None:
        """Add the named deltas into the base parameters.

        Half-precision weights and weight-dependent deltas (DoRA, IA3, copies) keep a copy of
        the parameters from before the first merge, so any number of merge/unmerge cycles
        restores them bit for bit; fp32 weights unmerge by subtraction unless ``keep_exact``.
        A quantized base is replaced by its dequantized copy while merged, and comes back on
        unmerge.
        """
        todo = [n for n in names if n in self.deltas and n not in self.merged]
        if not todo:
            return
        if self.backend.quantized:
            # a quantized weight cannot take ΔW: merge into a dequantized copy in the compute
            # dtype (exact), keeping the quantized module to come back to on unmerge
            self._quantized_base = self.base
            self._set_base(self.backend.dequantized_module())
        depends = any(self.deltas[n].merge_depends_on_weight or self.deltas[n].acts_on == "parameters" for n in todo)
        keep_exact = depends or (self.backend.dtype in _HALF if keep_exact is None else keep_exact)
        if keep_exact and self._quantized_base is None and self._params_before_merge is None:
            if self.merged:  # merged by subtraction so far: take them out to copy the original
                already = self.merged
                for name in reversed(already):
                    self._apply_update(name, -1.0)
                self.merged = ()
                todo = [*already, *todo]
            self._params_before_merge = {n: p.detach().clone() for n, p in self._own_parameters().items()}
        for name in todo:
            self._apply_update(name, 1.0)
            self.merged += (name,)
        self.set_active(self.active)

    def unmerge(self, names: Iterable[str]) -> None:
        todo = [n for n in names if n in self.merged]
        if not todo:
            return
        remaining = tuple(n for n in self.merged if n not in todo)
        if self._quantized_base is not None:
            self._set_base(self._quantized_base)
            self._quantized_base = None
            self.merged = ()
            self.merge(remaining)
        elif self._params_before_merge is not None:
            params = self._own_parameters()
            with torch.no_grad():
                for param_name, saved in self._params_before_merge.items():
                    params[param_name].copy_(saved)
            self.merged = ()
            for name in remaining:
                self._apply_update(name, 1.0)
                self.merged += (name,)
            if not remaining:
                self._params_before_merge = None
        else:
            for name in reversed(todo):
                self._apply_update(name, -1.0)
            self.merged = remaining
        self.set_active(self.active)

    def forget_original(self) -> None:
        """Drop the copy kept for exact unmerging (the merge is final)."""
        self._params_before_merge = None
        self._quantized_base = None

    @property
    def attached_base(self) -> nn.Module:
        """The module the deltas were attached to (the quantized one while merged deltas live
        in its dequantized copy)."""
        return self._quantized_base if self._quantized_base is not None else self.base

    def _set_base(self, module: nn.Module) -> None:
        self.base = module
        self.backend = layer_backend(module)

    def remove(self, name: str) -> None:
        self.unmerge([name])
        del self.deltas[name]
        self.set_active(n for n in self.active if n != name)

    def extra_repr(self) -> str:
        composed = f", composition={self.composition!r}" if self.composition is not None else ""
        return f"deltas={list(self.deltas)}, active={list(self.active)}, merged={list(self.merged)}{composed}"


def padded_rows(pieces: list[tuple[Tensor, Tensor]], reference: Tensor) -> Tensor:
    """One tensor from (row index, rows) pieces whose last dimensions differ, later pieces
    overwriting earlier ones: each is padded on the right to the widest with the dtype's lowest
    value, which no argmax, softmax or sigmoid threshold picks."""
    width = max(rows.shape[-1] for _, rows in pieces)
    lowest = torch.finfo(reference.dtype).min
    result = reference.new_full((*reference.shape[:-1], width), lowest)
    for index, rows in pieces:
        result = result.index_copy(0, index, F.pad(rows.to(result.dtype), (0, width - rows.shape[-1]), value=lowest))
    return result


def _stack_factors(factors: dict[str, tuple[Tensor, Tensor, float]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The K deltas' Aᵀ as (K, in, r) and s·Bᵀ as (K, r, out), padded with zeros to their largest rank r."""
    rank = max(a.shape[0] for a, _, _ in factors.values())
    a_parts, b_parts = [], []
    for a, b, scale in factors.values():
        pad = rank - a.shape[0]
        a_parts.append(F.pad(a.to(dtype), (0, 0, 0, pad)).T)
        b_parts.append(F.pad(b.to(dtype) * scale, (0, pad)).T)
    return torch.stack(a_parts), torch.stack(b_parts)


def _bind_call(delta: Delta, module: nn.Module, run, rows: RowSelector):
    def call(*args, **kwargs):
        return delta.call(module, run, args, kwargs, rows)

    return call


def base_of(module: nn.Module) -> nn.Module:
    """The module itself, or the base module a :class:`DeltaLayer` wraps."""
    return module.base if isinstance(module, DeltaLayer) else module


def has_own_parameters(module: nn.Module) -> bool:
    """Whether the (base) module holds parameters directly, not only in its children."""
    return next(base_of(module).parameters(recurse=False), None) is not None


def delta_layers(model: nn.Module) -> Mapping[str, DeltaLayer]:
    """Every DeltaLayer in the model by path (the path of the module it wraps, seen through any
    wrapper around a module that contains it), in module order."""
    found: dict[str, DeltaLayer] = {}
    seen: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, DeltaLayer):
            found[prefix] = module
            module = module.base
        for name, child in module.named_children():
            if child is not None:
                walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return found
