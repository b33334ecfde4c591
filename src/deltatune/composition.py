"""Composition blocks: several deltas of one layer combined in one forward (as in AdapterHub).

A block is built from delta names and nested blocks and activated with
``dt.activate(model, block)``. On every layer that holds any of its deltas, the layer's output
is computed as ``block(x, h)`` with ``x`` the layer's input and ``h`` the base module's output;
a delta name stands for that delta's own forward ``h ↦ delta(x, h)`` (the identity on a layer
that does not hold it), and ``Δ(c) = c(x, h) − h`` is what a child c changes:

* ``Stack(a, b, ...)``: in sequence, ``b(x, a(x, h))`` — e.g. a language adapter, then a task
  adapter (Pfeiffer et al., 2020, "MAD-X"); order matters for serial adapters;
* ``Average(a, b, ..., weights=[w...])``: ``h + Σᵢ wᵢ Δ(cᵢ)``; with the default uniform
  weights 1/k (any weights summing to 1) this is the weighted mean ``Σᵢ wᵢ cᵢ(x, h)``. Weights
  are used as given, not normalised, so a negative weight subtracts a child's change;
* ``Fuse(a, b, ..., fusion="f")``: AdapterFusion (Pfeiffer et al., 2021), attention with the
  trained fusion delta ``f`` over the children's changes ``zᵢ = Δ(cᵢ)`` with ``h`` as query
  (:mod:`deltatune.methods.fusion` has the equation);
* ``BatchSplit(a, b, ..., sizes=[2, 3])``: consecutive samples of the batch go to each child
  (the first 2 to a, the next 3 to b). Generation's expanded rows (beams, several sequences
  per prompt, repeated in place) follow their sample, as in :func:`deltatune.route`;
* ``Parallel(a, b, ...)``: k children on k replicas of the batch in one forward (multi-task
  inference). Activating it makes the model repeat its batched inputs k times (a forward
  pre-hook on the model), so the output holds k·B rows, replica by replica: rows
  [i·B, (i+1)·B) are child i's. Only at the top level of a block; call the model it was
  activated on (the hook sits there), and not with a KV cache (``generate``: repeat the
  prompts and use :func:`deltatune.route`).

A block is one value for the whole model: ``dt.route`` and ``dt.merge`` are refused while one
is active, and deactivating or detaching any of its deltas switches all of it off.

Only deltas that act on their layer's output (``forward(x, base_out)``: LoRA, bottleneck
adapters, Compacter, BitFit...) can be composed; deltas that change a layer's input, run it
with other parameters or wrap a container's call have no output of their own to combine.
Blocks serialise to JSON-able dicts: ``{"stack": ["lang", {"fuse": ["a", "b"], "fusion": "f"}]}``.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .config import NAME
from .errors import ConfigError
from .layer import rows_per_sample
from .sublayers import BesideSublayer, InputTap


class Block:
    """A composition of delta names and nested blocks (see the module docstring)."""

    #: the block's key in :meth:`to_dict`, and its options besides the children
    key = ""
    option_names: tuple[str, ...] = ()

    def __init__(self, *children: str | "Block"):
        if type(self) is Block:
            raise ConfigError(f"Block is the base class; build one of {', '.join(c.__name__ for c in BLOCKS.values())}")
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])  # Stack(["a", "b"]) reads like Stack("a", "b")
        if not children:
            raise ConfigError(f"{type(self).__name__} needs at least one child (a delta name or a block)")
        for child in children:
            if isinstance(child, Parallel):
                raise ConfigError(
                    f"Parallel cannot be nested inside {type(self).__name__}: it replicates the whole batch "
                    "at the model input, so it can only be the outermost block"
                )
            if isinstance(child, str):
                if not NAME.match(child):
                    raise ConfigError(f"{child!r} is not a delta name (letters, digits, '_' or '-')")
            elif not isinstance(child, Block):
                raise ConfigError(
                    f"a block's children are delta names or blocks (Stack, Fuse, Average, BatchSplit), "
                    f"got {type(child).__name__} {child!r}"
                )
        self.children: tuple[str | Block, ...] = tuple(children)

    # what a layer runs -------------------------------------------------------------------------

    def __call__(self, layer, x: Tensor, h: Tensor) -> Tensor:
        """The layer's output under this block, given its input ``x`` and base output ``h``."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Every delta name in the block, nested ones included, in order, without repeats."""
        found: dict[str, None] = {}
        for child in self.children:
            found.update(dict.fromkeys(child.names() if isinstance(child, Block) else [child]))
        return list(found)

    def walk(self) -> Iterator["Block"]:
        """This block and every block nested in it."""
        yield self
        for child in self.children:
            if isinstance(child, Block):
                yield from child.walk()

    def count(self, name: str) -> int:
        """How many times ``name`` appears in the block."""
        return sum(child.count(name) if isinstance(child, Block) else child == name for child in self.children)

    # serialisation -----------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        children = [c.to_dict() if isinstance(c, Block) else c for c in self.children]
        return {self.key: children, **self.options()}

    @staticmethod
    def from_dict(data: Mapping[str, Any] | str) -> "Block | str":
        """The block (or delta name) that :meth:`to_dict` wrote."""
        if isinstance(data, str):
            return data
        kinds = [k for k in data if k in BLOCKS] if isinstance(data, Mapping) else []
        if len(kinds) != 1:
            raise ConfigError(
                f"a block is a mapping with exactly one of the keys {', '.join(BLOCKS)}, got {data!r}"
            )
        cls = BLOCKS[kinds[0]]
        extra = [k for k in data if k != cls.key and k not in cls.option_names]
        if extra:
            allowed = ", ".join(cls.option_names) or "none"
            raise ConfigError(f"unknown option {extra[0]!r} for a {cls.key} block; its options: {allowed}")
        children = data[cls.key]
        if not isinstance(children, (list, tuple)):
            raise ConfigError(f"the {cls.key!r} entry must be a list of children, got {children!r}")
        return cls(*(Block.from_dict(c) for c in children), **{k: data[k] for k in cls.option_names if k in data})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children] + [f"{k}={v!r}" for k, v in self.options().items()]
        return f"{type(self).__name__}({', '.join(parts)})"


def run(child: str | Block, layer, x: Tensor, h: Tensor) -> Tensor:
    """One child's output on ``layer``: a block, a delta's forward, or ``h`` where absent."""
    if isinstance(child, Block):
        return child(layer, x, h)
    delta = layer.deltas[child] if child in layer.deltas else None
    return h if delta is None else delta(x, h, layer.backend)


def holds(child: str | Block, layer) -> bool:
    """Whether ``layer`` holds any delta of ``child``."""
    names = child.names() if isinstance(child, Block) else [child]
    return any(n in layer.deltas for n in names)


class Stack(Block):
    """``cₖ(… c₂(x, c₁(x, h)))``: the children in sequence."""

    key = "stack"

    def __call__(self, layer, x, h):
        for child in self.children:
            h = run(child, layer, x, h)
        return h


class Average(Block):
    """``h + Σᵢ wᵢ (cᵢ(x, h) − h)``; weights default to 1/k and are used as given."""

    key = "average"
    option_names = ("weights",)

    def __init__(self, *children, weights: Sequence[float] | None = None):
        super().__init__(*children)
        k = len(self.children)
        if weights is None:
            weights = [1.0 / k] * k
        if not isinstance(weights, (list, tuple)) or len(weights) != k or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights
        ):
            raise ConfigError(f"Average needs one number per child ({k}) in weights, got {weights!r}")
        self.weights = tuple(float(w) for w in weights)

    def options(self):
        return {"weights": list(self.weights)}

    def __call__(self, layer, x, h):
        out = h
        for child, weight in zip(self.children, self.weights):
            if holds(child, layer):
                out = out + weight * (run(child, layer, x, h) - h)
        return out


class Fuse(Block):
    """AdapterFusion: the fusion delta ``fusion`` attends over the children's changes."""

    key = "fuse"
    option_names = ("fusion",)

    def __init__(self, *children, fusion: str | None = None):
        super().__init__(*children)
        if not isinstance(fusion, str) or not NAME.match(fusion):
            raise ConfigError(
                f"Fuse needs fusion='<name>', the name of an attached fusion delta "
                f"(dt.attach(model, dt.FusionConfig(adapters=[...]), name)), got {fusion!r}"
            )
        if fusion in Block.names(self):
            raise ConfigError(f"Fuse: the fusion delta {fusion!r} cannot also be one of the fused children")
        self.fusion = fusion

    def names(self):
        return [*super().names(), self.fusion]

    def count(self, name):
        return super().count(name) + (name == self.fusion)

    def options(self):
        return {"fusion": self.fusion}

    def __call__(self, layer, x, h):
        present = [c for c in self.children if holds(c, layer)]
        if self.fusion not in layer.deltas:
            # only input taps of parallel adapters get here (checked on activation): they hand
            # their input on to the fused layer and leave this one's output as it is
            return Stack(*present)(layer, x, h) if present else h
        changes = [run(child, layer, x, h) - h for child in present]
        return layer.deltas[self.fusion].fuse(h, changes)


def _split_rows(children, sizes, layer, x, h, what) -> Tensor:
    repeat = rows_per_sample(x.shape[0], sum(sizes), what)
    pieces, start = [], 0
    for child, size in zip(children, sizes):
        rows = slice(start, start + size * repeat)
        pieces.append(run(child, layer, x[rows], h[rows]))
        start += size * repeat
    return torch.cat(pieces)


class BatchSplit(Block):
    """Child i on the i-th run of ``sizes[i]`` consecutive samples of the batch."""

    key = "batch_split"
    option_names = ("sizes",)

    def __init__(self, *children, sizes: Sequence[int] | None = None):
        super().__init__(*children)
        k = len(self.children)
        if not isinstance(sizes, (list, tuple)) or len(sizes) != k or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
        ):
            raise ConfigError(f"BatchSplit needs sizes: one positive number of samples per child ({k}), got {sizes!r}")
        self.sizes = tuple(sizes)

    def options(self):
        return {"sizes": list(self.sizes)}

    def __call__(self, layer, x, h):
        return _split_rows(self.children, self.sizes, layer, x, h, f"BatchSplit(sizes={list(self.sizes)})")


class Parallel(Block):
    """Child i on the i-th of k replicas of the batch (the model repeats its inputs k times)."""

    key = "parallel"

    def __call__(self, layer, x, h):
        k = len(self.children)
        rows_per_sample(x.shape[0], k, f"Parallel over {k} replicas")
        return _split_rows(self.children, [1] * k, layer, x, h, "Parallel")


BLOCKS: dict[str, type[Block]] = {cls.key: cls for cls in (Stack, Fuse, Average, BatchSplit, Parallel)}


#: why a delta acting elsewhere than on its layer's output (Delta.acts_on) cannot be in a block
_NOT_COMPOSABLE = {
    "call": "it wraps a whole module's call (prefixes, prompts), so it has no output of its own to combine",
    "input": "it changes its layer's input rather than its output",
    "parameters": "it runs its layer with other parameter values rather than acting on its output",
    "new output": "it is a task head, which replaces its layer's output rather than adding to it",
}


def _why_not_composable(delta) -> str | None:
    return _NOT_COMPOSABLE.get(delta.acts_on)


def check(block: Block, layers: Mapping[str, Any]) -> None:
    """Refuse, with the reason, a block that cannot run on the model's layers (path -> DeltaLayer)."""
    fuses = [b for b in block.walk() if isinstance(b, Fuse)]
    fusions = {f.fusion for f in fuses}
    for path, layer in layers.items():
        for name in block.names():
            if name not in layer.deltas:
                continue
            delta = layer.deltas[name]
            if name in layer.merged:
                raise ConfigError(f"delta {name!r} is merged into the weights of {path}; unmerge it to compose it")
            runs_in_fuse = isinstance(delta.config.activation_block(name), Fuse)
            if (name in fusions) != runs_in_fuse:
                raise ConfigError(
                    f"{name!r} is a fusion delta: use it as Fuse(..., fusion={name!r})" if name not in fusions
                    else f"Fuse(..., fusion={name!r}): {name!r} is a {delta.config.method} delta, not a fusion "
                    "(a config whose deltas run inside a Fuse block, as AdapterFusion's do)"
                )
            reason = _why_not_composable(delta)
            if reason:
                raise ConfigError(f"delta {name!r} ({delta.config.method}) cannot be part of a block: {reason}")
            if isinstance(delta, (InputTap, BesideSublayer)) and block.count(name) > 1:
                raise ConfigError(
                    f"delta {name!r} ({delta.config.method}) hands its sublayer's input from one layer to "
                    "another, so it can appear only once in a block"
                )
        for fuse in fuses:
            if fuse.fusion in layer.deltas:
                continue
            fused = [n for n in fuse.names() if n in layer.deltas and not isinstance(layer.deltas[n], InputTap)]
            if fused:
                raise ConfigError(
                    f"{path} holds {fused[0]!r} of Fuse(..., fusion={fuse.fusion!r}) but no fusion delta "
                    f"{fuse.fusion!r}; attach the fusion with adapters naming every fused adapter"
                )
