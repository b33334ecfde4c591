"""S4 (Chen, Zhang, Shi, Li, Smola & Yang, 2023, "Parameter-Efficient Fine-Tuning Design Spaces"):
a design over the existing methods rather than a new layer formula.

The blocks of each stack are split into four consecutive groups G1…G4 by a *grouping
pattern* (the share of the blocks each group gets, :data:`GROUPINGS`; the paper's finding is the
*spindle*: fewer blocks in the first and last groups, more in the middle); each group gets a
*strategy*, a set of methods from {Adapter, Prefix, BitFit, LoRA} (``"-"``: the group is not
tuned), and the sizes of those methods are scaled per group by a *parameter allocation*
(:data:`ALLOCATIONS`; the paper finds *uniform*, the same sizes in every group, best). The
paper's S4 design is G1: A+L, G2: A+P, G3: A+P+B, G4: P+B+L. On a block of group g, with
h the output of one of its projections, the design computes

    every projection (BitFit, B ∈ g):       h ↦ h + Δb                      (Δb = 0 at init)
    attn.q, attn.v, attn.qkv (LoRA, L ∈ g): h ↦ h + (α / r_g) B A x         (B = 0 at init)
    ffn.down (Adapter, A ∈ g):              h ↦ h + W_up f(W_down h + b_d) + b_u   (Pfeiffer's)
    attention (Prefix, P ∈ g):              head = softmax(q [P_K; K]ᵀ · scale) [P_V; V]

in that order on a projection holding several (BitFit's bias belongs to the base output, LoRA
adds beside the base product, the adapter reads the sum), with r_g, the adapter size m_g and
the prefix length n_g the config's ``r``, ``bottleneck`` and ``num_virtual_tokens`` times the
group's allocation factor (at least 1). Each part is the delta of its own method's file, so
S4 equals attaching those methods to the groups' blocks by hand, in that order (its test
checks outputs and parameter counts); as one config it trains, saves, loads and routes as one
delta. BitFit learns zero-initialised biases where a projection has none (``add_missing``).

Not mergeable (adapters and prefixes are not); mixed batches are supported (every part is).
:mod:`deltatune.analysis.search` searches the design space on the user's data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import Tensor, nn

from ..anatomy import Anatomy
from ..attention import attention_modules, uses_attention_interface
from ..backends import Backend, backend_for
from ..config import DeltaConfig, PARAM_DTYPES, check_choice, check_number, check_positive_int, register
from ..errors import ConfigError, TargetError
from ..layer import Delta
from .adapters import PfeifferConfig
from .lora import LoRAConfig
from .prefix import ATTENTION_ROLES, PrefixTuningConfig
from .selective import BitFitConfig

#: the share of a stack's blocks in each of G1…G4 (the paper's five grouping patterns)
GROUPINGS: dict[str, tuple[int, int, int, int]] = {
    "spindle": (1, 2, 2, 1),
    "uniform": (1, 1, 1, 1),
    "increasing": (1, 2, 3, 4),
    "decreasing": (4, 3, 2, 1),
    "bottleneck": (2, 1, 1, 2),
}
#: each group's factor on the methods' sizes (r, bottleneck, prefix length); mean 1
ALLOCATIONS: dict[str, tuple[float, float, float, float]] = {
    "uniform": (1.0, 1.0, 1.0, 1.0),
    "increasing": (0.4, 0.8, 1.2, 1.6),
    "decreasing": (1.6, 1.2, 0.8, 0.4),
}
#: the strategy letters: Adapter, Prefix, BitFit, LoRA
METHODS = {"A": "adapter", "P": "prefix", "B": "bitfit", "L": "lora"}
#: the order the parts run in on a projection that holds several (see the module docstring)
PART_ORDER = ("B", "L", "A")
NOT_TUNED = "-"
#: the paper's S4 design (Chen et al. 2023, §4)
PAPER_STRATEGIES = ("A+L", "A+P", "A+P+B", "P+B+L")
LORA_ROLES = ("attn.q", "attn.v", "attn.qkv")
PROJECTION_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "ffn.up", "ffn.gate", "ffn.down")


def strategy_letters(strategy: str) -> tuple[str, ...]:
    """``"A+P+B"`` -> ("A", "P", "B"); ``"-"`` -> (); a clear error for anything else."""
    if strategy == NOT_TUNED:
        return ()
    letters = tuple(s.strip().upper() for s in strategy.split("+"))
    bad = [s for s in letters if s not in METHODS]
    if bad or len(set(letters)) != len(letters) or not letters:
        allowed = ", ".join(f"{k} ({v})" for k, v in METHODS.items())
        raise ConfigError(
            f"strategy {strategy!r} is not valid: give distinct letters joined by '+' from {allowed}, "
            f"e.g. 'A+P+B', or '{NOT_TUNED}' for a group that is not tuned"
        )
    return letters


def group_bounds(grouping: str, num_layers: int) -> list[range]:
    """The blocks of G1…G4 in a stack of ``num_layers`` blocks (a group may be empty on a
    shallow stack): group k ends at the block nearest num_layers · (its cumulative share)."""
    shares = GROUPINGS[grouping]
    total, ends, running = sum(shares), [], 0
    for share in shares:
        running += share
        ends.append(int(num_layers * running / total + 0.5))
    starts = [0, *ends[:-1]]
    return [range(start, end) for start, end in zip(starts, ends)]


class EmptyDesign(TargetError):
    """A design that adapts nothing on a model (its tuned groups hold no block there)."""


class PartsDelta(Delta):
    """Several output deltas of one projection, run in order: h ↦ pₖ(x, … p₁(x, h))."""

    def __init__(self, config: "S4Config", parts: dict[str, Delta]):
        super().__init__()
        self.config = config
        self.parts = nn.ModuleDict(parts)

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        for part in self.parts.values():
            base_out = part(x, base_out, backend)
        return base_out


@register
@dataclasses.dataclass(frozen=True)
class S4Config(DeltaConfig):
    """S4: ``grouping`` (one of :data:`GROUPINGS`), ``allocation`` (one of :data:`ALLOCATIONS`)
    and one strategy per group in ``strategies`` (letters A/P/B/L joined by '+', or '-');
    sizes ``r`` / ``alpha`` (LoRA), ``bottleneck`` (adapter) and ``num_virtual_tokens``
    (prefix), scaled per group by the allocation. ``targets`` / ``layers`` may limit the
    projections and blocks the design covers. See the module docstring."""

    method: ClassVar[str] = "s4"
    adapts: ClassVar[str] = "attention and feed-forward projections of the transformer blocks (roles attn.*, ffn.*)"
    default_targets: ClassVar[tuple[str, ...]] = ("attn", "ffn")
    supports_mixed_batch: ClassVar[bool] = True
    default_lr: ClassVar[float] = 2e-3

    grouping: str = "spindle"
    allocation: str = "uniform"
    strategies: tuple[str, ...] = PAPER_STRATEGIES
    r: int = 8
    alpha: float = 16.0
    bottleneck: int = 16
    num_virtual_tokens: int = 8
    param_dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.strategies, (list, tuple)):
            object.__setattr__(self, "strategies", tuple(self.strategies))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        check_choice("grouping", self.grouping, tuple(GROUPINGS))
        check_choice("allocation", self.allocation, tuple(ALLOCATIONS))
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if not isinstance(self.strategies, tuple) or len(self.strategies) != 4 or not all(
            isinstance(s, str) for s in self.strategies
        ):
            raise ConfigError(f"strategies must be four strategies, one per group G1…G4 (e.g. {list(PAPER_STRATEGIES)}), "
                              f"got {self.strategies!r}")
        for strategy in self.strategies:
            strategy_letters(strategy)
        if not any(strategy_letters(s) for s in self.strategies):
            raise ConfigError(f"strategies {list(self.strategies)} tune no group; give at least one group a method")
        check_positive_int("r", self.r, "the LoRA rank")
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_positive_int("bottleneck", self.bottleneck, "the adapter's hidden size m")
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "the prefix length n")

    # the parts, as the existing methods' configs -------------------------------------------

    def scaled(self, size: int, group: int) -> int:
        return max(1, int(size * ALLOCATIONS[self.allocation][group] + 0.5))

    def part(self, letter: str, group: int) -> DeltaConfig:
        """Group ``group``'s (0-based) config of the method ``letter``."""
        if letter == "L":
            return LoRAConfig(r=self.scaled(self.r, group), alpha=self.alpha, param_dtype=self.param_dtype)
        if letter == "A":
            return PfeifferConfig(bottleneck=self.scaled(self.bottleneck, group), init="near_identity",
                                  param_dtype=self.param_dtype)
        if letter == "P":
            return PrefixTuningConfig(num_virtual_tokens=self.scaled(self.num_virtual_tokens, group),
                                      param_dtype=self.param_dtype)
        return BitFitConfig(add_missing=True)

    def group_of(self, path: str, anatomy: Anatomy) -> int:
        """The group (0-based) of the block holding ``path``."""
        index = anatomy.layer_of[path]
        stack = max((s for s in anatomy.stacks if path.startswith(s + ".")), key=len)
        return next(g for g, blocks in enumerate(group_bounds(self.grouping, anatomy.num_layers[stack]))
                    if index in blocks)

    def letters_at(self, path: str, role: str | None, anatomy: Anatomy) -> tuple[str, ...]:
        """The methods of the design at ``path`` (role None: an attention module), in run order."""
        if path not in anatomy.layer_of:
            return ()
        chosen = strategy_letters(self.strategies[self.group_of(path, anatomy)])
        if role is None:
            return ("P",) if "P" in chosen else ()
        wanted = {"B": role in PROJECTION_ROLES, "L": role in LORA_ROLES, "A": role == "ffn.down"}
        return tuple(letter for letter in PART_ORDER if letter in chosen and wanted[letter])

    @property
    def calibration_batches(self) -> int:
        groups = [g for g, s in enumerate(self.strategies) if "P" in strategy_letters(s)]
        return max((self.part("P", g).calibration_batches for g in groups), default=0)

    # the strategy over the core --------------------------------------------------------------

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        if role is None:
            return uses_attention_interface(module)
        backend = backend_for(module)
        return backend is not None and backend.is_linear_map and backend.takes_activations

    def expand(self, paths: list[str], anatomy) -> list[str]:
        projections = [p for p in paths if self.letters_at(p, anatomy.role_of.get(p), anatomy)]
        queries = [p for p in paths if anatomy.role_of.get(p) in ATTENTION_ROLES and p in anatomy.layer_of]
        prefixed = [a for a in attention_modules(queries, anatomy) if self.letters_at(a, None, anatomy)]
        if not projections and not prefixed:
            raise EmptyDesign(
                f"S4 design {list(self.strategies)} with grouping {self.grouping!r} adapts nothing in the selected "
                "blocks (are its tuned groups empty on this model's few blocks?)"
            )
        return projections + prefixed

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> Delta:
        anatomy = options["anatomy"]
        letters = self.letters_at(path, options.get("role"), anatomy)
        if not letters:
            raise TargetError(f"S4 design {list(self.strategies)} puts no method on {path}")
        group = self.group_of(path, anatomy)
        parts = {METHODS[letter]: self.part(letter, group).build(path, module, options, initialize) for letter in letters}
        for delta in parts.values():
            delta.config = self  # the part reports (and saves) the design it belongs to
        return next(iter(parts.values())) if len(parts) == 1 else PartsDelta(self, parts)
