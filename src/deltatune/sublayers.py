"""Deltas that sit *beside* a sublayer: they read the sublayer's input and add to its output.

A parallel adapter (He et al. 2022) or KronA's residual variant computes ``h + s·f(x)`` where
``x`` is the input of the attention or feed-forward sublayer and ``h`` its output, before the
residual add. No single module sees both in every architecture (BERT's FFN is split across
``intermediate.dense`` and ``output.dense``; OPT and BART keep ``fc1``/``fc2`` directly on the
block), but two always do: the sublayer's first projection reads ``x`` and its last one writes
``h``. So such a delta is two deltas in the module tree:

* an :class:`InputTap` on the reading projection (``attn.q`` / ``attn.qkv``, ``ffn.up`` /
  ``ffn.gate``), which hands its input over and changes nothing;
* a :class:`BesideSublayer` delta on the writing projection (``attn.o``, ``ffn.down``), which
  takes that input and adds ``f(x)`` to the output.

The hand-over lives on the two delta objects (no global state): within one block the reader
always runs before the writer, also when gradient checkpointing re-runs the block, and under
:func:`deltatune.route` both see the same rows.
"""

from __future__ import annotations

from torch import Tensor

from .anatomy import Anatomy
from .backends import Backend
from .errors import TargetError
from .layer import Delta

#: sublayer kind -> (roles whose input is the sublayer input, the role that writes its output)
SUBLAYERS: dict[str, tuple[tuple[str, ...], str]] = {
    "attn": (("attn.q", "attn.qkv"), "attn.o"),
    "ffn": (("ffn.up", "ffn.gate"), "ffn.down"),
}
WRITER_ROLES = {writer: kind for kind, (_, writer) in SUBLAYERS.items()}


class Handoff:
    """One tensor passed from a sublayer's reading projection to its writing projection."""

    def __init__(self, where: str):
        self.where = where
        self._value: Tensor | None = None

    def put(self, x: Tensor) -> None:
        self._value = x

    def take(self) -> Tensor:
        value, self._value = self._value, None  # never keep an activation alive past its use
        if value is None:
            raise RuntimeError(
                f"the sublayer input for {self.where} was not seen: its reading projection did not run "
                "before it in this forward pass"
            )
        return value


class InputTap(Delta):
    """Hands the layer's input to the :class:`BesideSublayer` delta of the same sublayer."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.handoff: Handoff | None = None

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        self.handoff.put(x)
        return base_out


class BesideSublayer(Delta):
    """Adds ``side(x)`` to the output of a sublayer's writing projection, where ``x`` is the
    sublayer's input. Subclasses implement :meth:`side`."""

    def __init__(self) -> None:
        super().__init__()
        self.handoff: Handoff | None = None

    def side(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        return base_out + self.side(self.handoff.take()).to(base_out.dtype)


def _block_of(path: str, anatomy: Anatomy) -> tuple[str, int] | None:
    if path not in anatomy.layer_of:
        return None
    stack = max((s for s in anatomy.stacks if path.startswith(s + ".")), key=len)
    return stack, anatomy.layer_of[path]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def sublayer_pairs(writers: list[str], anatomy: Anatomy) -> dict[str, str]:
    """writer path -> path of the projection reading the same sublayer's input.

    The reader is searched in the writer's block among the roles of :data:`SUBLAYERS`; with
    several sublayers of a kind in one block (BART's self- and cross-attention) the one sharing
    the longest path prefix wins; then the first role listed (the same input either way).
    """
    pairs = {}
    for writer in writers:
        kind = WRITER_ROLES.get(anatomy.role_of.get(writer, ""))
        block = _block_of(writer, anatomy)
        if kind is None or block is None:
            raise TargetError(
                f"{writer} is not the output projection of an attention or feed-forward sublayer "
                f"(its role is {anatomy.role_of.get(writer)!r}); a delta beside a sublayer targets "
                "the roles attn.o or ffn.down"
            )
        reader_roles = SUBLAYERS[kind][0]
        candidates = [
            p for p, role in anatomy.role_of.items()
            if role in reader_roles and _block_of(p, anatomy) == block
        ]
        if not candidates:
            raise TargetError(f"no {' / '.join(reader_roles)} projection found in the block of {writer}")
        # closest sublayer first, then the role order of SUBLAYERS (ffn.up before ffn.gate)
        pairs[writer] = max(
            candidates, key=lambda p: (_common_prefix(p, writer), -reader_roles.index(anatomy.role_of[p]))
        )
    return pairs


def with_readers(writers: list[str], anatomy: Anatomy) -> list[str]:
    """``writers`` plus the reading projection of each one's sublayer, in model order."""
    readers = set(sublayer_pairs(writers, anatomy).values())
    wanted = set(writers) | readers
    order = {p: i for i, p in enumerate(anatomy.layer_of)}
    return sorted(wanted, key=lambda p: order.get(p, -1))


def link_pairs(built: dict[str, Delta], anatomy: Anatomy) -> None:
    """Give each writer and its reader one shared :class:`Handoff`."""
    writers = [p for p, d in built.items() if isinstance(d, BesideSublayer)]
    for writer, reader in sublayer_pairs(writers, anatomy).items():
        tap = built.get(reader)
        if not isinstance(tap, InputTap):
            raise TargetError(f"{writer} needs an input tap on {reader}, which this delta does not adapt")
        handoff = Handoff(writer)
        built[writer].handoff = handoff
        tap.handoff = handoff
    orphans = [p for p, d in built.items() if isinstance(d, InputTap) and d.handoff is None]
    if orphans:
        raise TargetError(
            f"{orphans[0]} would only hand its input to a sublayer output projection, but none is "
            "targeted beside it; target the output projections (attn.o, ffn.down) instead"
        )
