"""Sparse differences to the base weights: Diff Pruning and FISH Mask.

Both add a difference δ to each targeted weight matrix W (out × in; an embedding read as the
linear map from one-hot ids) and keep δ sparse, so that a task is a short list of (index, value)
pairs beside the shared base:

    y = (W + δ) x + b

* **Diff Pruning** (Guo, Rush & Kim, 2021, "Parameter-Efficient Transfer Learning with Diff
  Pruning"): δ = z ⊙ w, with w trained from 0 and z a hard-concrete relaxed binary mask (Louizos,
  Welling & Kingma, 2018) with parameters log α, temperature β and stretch (l, r):

      u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α) / β),  z = min(1, max(0, s (r − l) + l)),

  and, outside training, z = min(1, max(0, σ(log α) (r − l) + l)). The trainer adds
  ``l0_weight`` times the expected number of nonzeros, the differentiable L0 penalty

      E‖δ‖₀ = Σ σ(log α − β log(−l / r)),

  to the loss. The structured variant (``structured=True``) gives every output row g a mask z_g
  of its own besides the entries', δ_ij = z_ij z_g(i) w_ij, and E‖δ‖₀ = Σ_ij σ(log α_ij − β
  log(−l/r)) σ(log α_g(i) − β log(−l/r)). After ``prune_at`` of the training steps, δ is
  magnitude-pruned to the ``share`` of its entries with the largest |δ| across every targeted
  weight (the paper's 0.5%), the mask is fixed, and training goes on with the kept entries of w
  alone. While training, w and log α are each the size of the targeted weights (the paper's
  "200%" trainable); after pruning, a saved delta holds only the kept entries.

* **FISH Mask** (Sung, Nair & Raffel, 2021, "Training Neural Networks with Fixed Sparse
  Masks"): the empirical Fisher diagonal over N calibration examples,

      F̂ = (1/N) Σᵢ (∇_W ℓᵢ)²,   ℓᵢ = −log p(yᵢ | xᵢ),

  ranks every entry of every targeted weight; the k largest train (δ at those entries, from 0),
  the rest stay frozen. k is ``count``, or ``share`` of the targeted weights' entries (the
  paper's 0.01–0.5%). Gradients and optimizer state exist for the k entries only: a layer's
  trainable parameter is its vector of k_l values. :func:`deltatune.calibrate` (which ``deltatune
  train`` runs on its first ``calibration_batches`` batches) measures F̂ in one backward pass per
  batch: each layer sees its input x and the gradient g of the batch loss at its output, and
  example i's weight gradient is B·g_iᵀx_i summed over positions (B the batch size) — ∇ℓᵢ
  exactly when the batch loss is the mean of the examples' losses (labelled tasks); the
  language-modelling loss averages over tokens, which scales every example of a batch alike.
  Until calibrated, the k entries of largest |W| train. The forward computes x δᵀ from the k_l
  entries alone, O(positions · k_l) per layer, never forming a dense δ.

Both cover every weight matrix but the output head's by default: the linear layers and the token
embedding (biases, norms and position embeddings, about 1% of a transformer, stay frozen). δ is stored as values and flat indices in (out, in)
order, the indices as their low 16 bits (uint16) plus a count per block of 2¹⁶ (int32): six bytes
per kept fp32 entry, so a delta of 0.5% of a model's weights saves to 0.75% of the dense
difference's bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..backends import Backend, backend_for
from ..config import DeltaConfig, check_number, check_positive_int, master_dtype, register
from ..errors import CheckpointError, ConfigError
from ..layer import Delta

#: indices are stored as their low 16 bits plus a count of entries per block of this many
INDEX_BLOCK = 1 << 16


def pack_indices(flat: Tensor, numel: int) -> dict[str, Tensor]:
    """Sorted flat indices into a tensor of ``numel`` entries, as ``index_low`` (uint16) and
    ``index_blocks`` (int32: how many indices fall in each block of 2¹⁶)."""
    blocks = torch.bincount(flat // INDEX_BLOCK, minlength=-(-numel // INDEX_BLOCK))
    return {"index_low": (flat % INDEX_BLOCK).to(torch.int32).to(torch.uint16),
            "index_blocks": blocks.to(torch.int32)}


def unpack_indices(low: Tensor, blocks: Tensor, numel: int, where: str) -> Tensor:
    """The flat int64 indices :func:`pack_indices` stored, checked to be sorted, distinct and in range."""
    if blocks.numel() != -(-numel // INDEX_BLOCK) or int(blocks.sum()) != low.numel():
        raise CheckpointError(f"{where}: the saved indices do not describe a weight of {numel} entries")
    start = torch.arange(blocks.numel(), device=low.device).repeat_interleave(blocks.long().to(low.device))
    flat = start * INDEX_BLOCK + low.to(torch.int64)
    if flat.numel() and (flat[-1] >= numel or bool((flat[1:] <= flat[:-1]).any())):
        raise CheckpointError(f"{where}: the saved indices are not sorted, distinct entries of a weight of {numel}")
    return flat


def largest_entries(scores: Iterable[Tensor], k: int) -> list[Tensor]:
    """The k largest entries over all score tensors together, as sorted flat indices per tensor.
    Each tensor (read one at a time from ``scores``) offers its own top k first, so nothing of
    the whole model's size is built."""
    candidates, owners, positions = [], [], []
    for i, score in enumerate(scores):
        top = torch.topk(score.flatten().float(), min(k, score.numel()))
        candidates.append(top.values)
        positions.append(top.indices)
        owners.append(torch.full_like(top.indices, i))
    chosen = torch.topk(torch.cat(candidates), k).indices
    owner, position = torch.cat(owners)[chosen], torch.cat(positions)[chosen]
    return [position[owner == i].sort().values for i in range(len(candidates))]


def accepts_weight(module: nn.Module, role: str | None) -> bool:
    """A linear map that is not the output head: Linear, Conv1D, quantized Linear, and the token
    embedding (other id lookups, e.g. positions, and a copy no forward reads, as T5's ``shared``
    beside its stacks' own embeddings, are left out)."""
    backend = backend_for(module)
    if backend is None or not backend.is_linear_map or role == "head":
        return False
    return backend.takes_activations or role == "embed"


class WeightDifference(Delta):
    """y = base(x) + x δᵀ for a difference δ (out, in) of the layer's weight (an embedding looks
    the ids up in δ's columns); merging adds δ to W."""

    def __init__(self, config: DeltaConfig, backend: Backend, device: torch.device | None):
        super().__init__()
        self.config = config
        self.shape = (backend.out_features, backend.in_features)
        self.dtype = master_dtype(backend.dtype)
        self.device = device or backend.device
        #: the base layer as built: where a selection reads W (not a module: the layer holds it)
        self.source = backend

    def difference(self) -> Tensor:
        """δ as (out, in), in the delta's dtype."""
        raise NotImplementedError

    def difference_inputs(self) -> list[Tensor]:
        """The tensors δ is computed from (their versions tell when a kept δ is stale)."""
        return [*self.parameters(), *self.buffers()]

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        dtype = base_out.dtype
        if torch.is_grad_enabled():
            self._inference_cache = None

            def contribution(inputs: Tensor) -> Tensor:
                return backend.project_input(inputs, self.difference().to(dtype))

            # δ is rebuilt in backward rather than kept, a dense matrix per layer, until then
            return base_out + checkpoint(contribution, x, use_reentrant=False)
        return base_out + backend.project_input(x, self.inference_difference(dtype, base_out.device))

    def inference_difference(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """δ in ``dtype`` for a forward without gradients, built once while the tensors it comes
        from are unchanged (generation runs every layer once per token); a training-mode
        Diff Pruning mask is drawn anew every time."""
        key = (dtype, device, self.training, *((id(t), t._version) for t in self.difference_inputs()))
        cached = getattr(self, "_inference_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        value = self.difference().to(dtype)
        self._inference_cache = None if self.training else (key, value)
        return value

    def merge_update(self, backend: Backend) -> tuple[Tensor, None]:
        return self.difference().detach().float(), None


# Diff Pruning --------------------------------------------------------------------------------


@register
@dataclasses.dataclass(frozen=True)
class DiffPruningConfig(DeltaConfig):
    """Diff Pruning: δ = z ⊙ w under a hard-concrete mask and an L0 penalty, magnitude-pruned
    to ``share`` after ``prune_at`` of training. See the module docstring."""

    method: ClassVar[str] = "diff_pruning"
    default_targets: ClassVar[tuple[str, ...]] = ("re:.+",)
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "weight matrices (Linear / Conv1D / Embedding) other than the output head"
    default_lr: ClassVar[float] = 1e-3

    share: float = 0.005
    prune_at: float = 0.5
    l0_weight: float = 1.25e-7
    log_alpha_init: float = 5.0
    temperature: float = 1.0
    stretch_low: float = -1.5
    stretch_high: float = 1.5
    structured: bool = False

    def validate(self) -> None:
        super().validate()
        check_number("share", self.share, low=0, high=1, low_open=True)
        check_number("prune_at", self.prune_at, low=0, high=1, low_open=True, high_open=True)
        check_number("l0_weight", self.l0_weight, low=0)
        check_number("log_alpha_init", self.log_alpha_init)
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_number("stretch_low", self.stretch_low, high=0, high_open=True)
        check_number("stretch_high", self.stretch_high, low=1, low_open=True)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return accepts_weight(module, role)

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "DiffPruningDelta":
        return DiffPruningDelta(self, backend_for(module), options.get("device"))

    def link(self, built: dict[str, Any], anatomy: Any) -> None:
        group = PruningGroup([built[path] for path in sorted(built)], self.share)
        for delta in built.values():
            delta.group = group


class PruningGroup:
    """The deltas of one Diff Pruning attach, pruned together to one share of all their entries."""

    def __init__(self, deltas: list["DiffPruningDelta"], share: float):
        self.deltas = deltas
        self.share = share

    @torch.no_grad()
    def prune(self) -> None:
        """Keep the ``share`` of δ's entries of largest magnitude, over every delta together."""
        total = sum(math.prod(d.shape) for d in self.deltas)
        kept = largest_entries((d.difference(sample=False).abs() for d in self.deltas), max(1, round(self.share * total)))
        for delta, flat in zip(self.deltas, kept):
            delta.fix_mask(delta.difference(sample=False), flat)


class DiffPruningDelta(WeightDifference):
    """w and log α (and a row's log α when structured); after pruning, w on a fixed mask."""

    def __init__(self, config: DiffPruningConfig, backend: Backend, device: torch.device | None):
        super().__init__(config, backend, device)
        self.w = nn.Parameter(torch.zeros(self.shape, dtype=self.dtype, device=self.device))
        self.log_alpha = nn.Parameter(torch.full(self.shape, config.log_alpha_init, dtype=self.dtype, device=self.device))
        self.log_alpha_rows = (nn.Parameter(torch.full((self.shape[0], 1), config.log_alpha_init, dtype=self.dtype,
                                                        device=self.device)) if config.structured else None)
        # not in the state dict: a pruned delta saves its kept entries (saved_state)
        self.register_buffer("kept", torch.zeros(0, dtype=torch.bool, device=self.device), persistent=False)
        self.pruned = False
        self.group: PruningGroup | None = None

    def _gate(self, log_alpha: Tensor, sample: bool) -> Tensor:
        c = self.config
        if sample:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / c.temperature)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (c.stretch_high - c.stretch_low) + c.stretch_low).clamp(0, 1)

    def mask(self, sample: bool) -> Tensor:
        """z (z_ij z_g(i) when structured): sampled while training, its deterministic value otherwise."""
        z = self._gate(self.log_alpha, sample)
        if self.log_alpha_rows is not None:
            z = z * self._gate(self.log_alpha_rows, sample)
        return z

    def difference(self, sample: bool | None = None) -> Tensor:
        if self.pruned:
            return self.w * self.kept
        return self.mask(self.training if sample is None else sample) * self.w

    def merge_update(self, backend: Backend) -> tuple[Tensor, None]:
        return self.difference(sample=False).detach().float(), None

    def expected_l0(self) -> Tensor:
        """E‖δ‖₀ = Σ σ(log α − β log(−l/r)) (times the row's factor when structured)."""
        c = self.config
        shift = c.temperature * math.log(-c.stretch_low / c.stretch_high)
        nonzero = torch.sigmoid(self.log_alpha - shift)
        if self.log_alpha_rows is not None:
            nonzero = nonzero * torch.sigmoid(self.log_alpha_rows - shift)
        return nonzero.sum()

    def training_penalty(self) -> Tensor | None:
        if self.pruned or not self.config.l0_weight:
            return None
        return self.config.l0_weight * self.expected_l0()

    @torch.no_grad()
    def fix_mask(self, difference: Tensor, flat: Tensor) -> None:
        """Keep the entries ``flat`` of ``difference`` (the deterministic δ, folded into w)."""
        kept = torch.zeros(difference.numel(), dtype=torch.bool, device=difference.device)
        kept[flat] = True
        self.kept = kept.view(self.shape)
        self.w.copy_(difference * self.kept)
        self.pruned = True

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if not self.pruned and step >= max(1, round(self.config.prune_at * total_steps)):
            self.group.prune()

    def saved_state(self) -> dict[str, Tensor]:
        if not self.pruned:
            return dict(self.state_dict())
        flat = self.kept.flatten().nonzero().flatten()
        return {"kept_values": self.w.detach().flatten()[flat], **pack_indices(flat, self.w.numel())}

    @torch.no_grad()
    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        if "kept_values" not in state:
            super().load_saved_state(state, where)
            return
        flat = _sparse_entries(state, self.w.numel(), where)
        values = torch.zeros(self.w.numel(), dtype=self.dtype, device=self.device)
        values[flat.to(self.device)] = state["kept_values"].to(dtype=self.dtype, device=self.device)
        self.fix_mask(values.view(self.shape), flat.to(self.device))


def _sparse_entries(state: dict[str, Tensor], numel: int, where: str) -> Tensor:
    """The flat indices of a saved sparse δ, checked against its values."""
    expected = {"kept_values", "index_low", "index_blocks"}
    if set(state) != expected:
        raise CheckpointError(f"{where}: saved tensors are {sorted(state)}, expected {sorted(expected)}")
    flat = unpack_indices(state["index_low"], state["index_blocks"], numel, where)
    if flat.numel() != state["kept_values"].numel():
        raise CheckpointError(f"{where}: {flat.numel()} indices but {state['kept_values'].numel()} values were saved")
    return flat


# FISH Mask -----------------------------------------------------------------------------------


@register
@dataclasses.dataclass(frozen=True)
class FISHMaskConfig(DeltaConfig):
    """FISH Mask: the k entries of largest empirical Fisher information train. See the module docstring."""

    method: ClassVar[str] = "fish_mask"
    default_targets: ClassVar[tuple[str, ...]] = ("re:.+",)
    supports_merge: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    adapts: ClassVar[str] = "weight matrices (Linear / Conv1D / Embedding) other than the output head"
    default_lr: ClassVar[float] = 1e-3

    share: float = 0.005
    count: int | None = None
    calibration_batches: int = 4

    def validate(self) -> None:
        super().validate()
        check_number("share", self.share, low=0, high=1, low_open=True)
        if self.count is not None:
            check_positive_int("count", self.count, "how many weight entries train; null: share of them")
        check_positive_int("calibration_batches", self.calibration_batches)

    def accepts(self, module: nn.Module, role: str | None = None) -> bool:
        return accepts_weight(module, role)

    def build(self, path: str, module: nn.Module, options: dict[str, Any], initialize: bool = True) -> "FISHMaskDelta":
        return FISHMaskDelta(self, backend_for(module), options.get("device"), initialize)

    def entries(self, total: int) -> int:
        """k for a delta over ``total`` weight entries."""
        if self.count is not None:
            if self.count > total:
                raise ConfigError(f"count={self.count} exceeds the {total} entries of the targeted weights")
            return self.count
        return max(1, round(self.share * total))

    def link(self, built: dict[str, Any], anatomy: Any) -> None:
        group = FisherGroup([built[path] for path in sorted(built)], self)
        for delta in built.values():
            delta.group = group
        group.provisional()


class FisherGroup:
    """The deltas of one FISH Mask attach, whose k entries are chosen over all of them together."""

    def __init__(self, deltas: list["FISHMaskDelta"], config: FISHMaskConfig):
        self.deltas = deltas
        self.k = config.entries(sum(math.prod(d.shape) for d in deltas)) if deltas else 0
        self.chosen_by_fisher = False

    @torch.no_grad()
    def provisional(self) -> None:
        """Before calibration: the k entries of largest |W|; a dry run on the meta device only
        sizes each layer's share (proportional to its size); a delta being loaded waits for its
        checkpoint."""
        if not self.deltas:
            return
        if self.deltas[0].device.type == "meta":
            sizes = [math.prod(d.shape) for d in self.deltas]
            counts = _proportional(self.k, sizes)
            for delta, count in zip(self.deltas, counts):
                delta.select(torch.empty(count, dtype=torch.long, device=delta.device))
            return
        if not self.deltas[0].initialized:
            return
        chosen = largest_entries((d.source.dense_weight().abs() for d in self.deltas), self.k)
        for delta, flat in zip(self.deltas, chosen):
            delta.select(flat.to(delta.device))

    @torch.no_grad()
    def choose_by_fisher(self) -> None:
        if self.chosen_by_fisher:
            return
        blind = [d for d in self.deltas if d.fisher is None]
        if blind:
            raise RuntimeError("FISH Mask's calibration saw no gradient at some layers: the calibration batches did "
                               "not reach them")
        chosen = largest_entries((d.fisher / d.examples for d in self.deltas), self.k)
        for delta, flat in zip(self.deltas, chosen):
            delta.select(flat.to(delta.device))
            delta.fisher = None
        self.chosen_by_fisher = True


def _proportional(k: int, sizes: list[int]) -> list[int]:
    """k split in proportion to ``sizes``, largest remainders first, summing to k."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: counts[i] - exact[i])[: k - sum(counts)]:
        counts[i] += 1
    return counts


class FISHMaskDelta(WeightDifference):
    """The k_l trained values of one layer and their flat indices in W (out, in)."""

    def __init__(self, config: FISHMaskConfig, backend: Backend, device: torch.device | None, initialize: bool):
        super().__init__(config, backend, device)
        self.initialized = initialize
        self.needs_calibration = initialize
        for name in ("index", "rows", "cols"):  # flat indices, and the (row, column) of each
            self.register_buffer(name, torch.zeros(0, dtype=torch.long, device=self.device), persistent=False)
        self.values = nn.Parameter(torch.zeros(0, dtype=self.dtype, device=self.device))
        self.group: FisherGroup | None = None
        #: Σ over calibration examples of (∇_W ℓᵢ)², while calibrating
        self.fisher: Tensor | None = None
        self.examples = 0

    def select(self, flat: Tensor) -> None:
        """Train the entries ``flat`` of W (sorted flat indices), from δ = 0."""
        self.index = flat
        self.rows, self.cols = flat // self.shape[1], flat % self.shape[1]
        self.values = nn.Parameter(torch.zeros(flat.numel(), dtype=self.dtype, device=flat.device))

    def difference(self) -> Tensor:
        flat = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.index,), self.values).view(self.shape)

    def sparse_product(self, x: Tensor, dtype: torch.dtype, backend: Backend) -> Tensor:
        """x δᵀ from the k_l entries alone (O(positions · k_l), no dense δ): each entry (i, j, v)
        adds v·x_j to output i; for token ids, a table of δ's columns for the batch's ids."""
        values = self.values.to(dtype)
        if backend.takes_activations:
            gathered = x.index_select(-1, self.cols) * values
            return gathered.new_zeros((*x.shape[:-1], self.shape[0])).index_add(-1, self.rows, gathered)
        present, position = torch.unique(x, return_inverse=True)
        hit = torch.isin(self.cols, present)
        table = values.new_zeros((present.numel(), self.shape[0]))
        table = table.index_put((torch.searchsorted(present, self.cols[hit]), self.rows[hit]), values[hit])
        return F.embedding(position, table)

    def forward(self, x: Tensor, base_out: Tensor, backend: Backend) -> Tensor:
        if not self.calibrating:
            dtype = base_out.dtype
            if torch.is_grad_enabled():
                # the (positions × k_l) gathered inputs are rebuilt in backward, not kept until then
                return base_out + checkpoint(self.sparse_product, x, dtype, backend, use_reentrant=False)
            return base_out + self.sparse_product(x, dtype, backend)
        # a zero that requires grad: the backward reaches this layer even though nothing before
        # it trains, and hands over the gradient at its output
        out = base_out + torch.zeros((), dtype=base_out.dtype, device=base_out.device, requires_grad=True)
        inputs = x.detach()
        out.register_hook(lambda grad: self.add_fisher(inputs, grad, backend))
        return out

    @torch.no_grad()
    def add_fisher(self, x: Tensor, grad: Tensor, backend: Backend) -> None:
        """Add Σᵢ (B·g_iᵀx_i)² over the batch's examples to the Fisher sum (module docstring)."""
        batch = x.shape[0]
        grad = grad.float().reshape(batch, -1, grad.shape[-1]) * batch
        if self.fisher is None:
            self.fisher = torch.zeros(self.shape, dtype=torch.float32, device=grad.device)
        if backend.takes_activations:
            inputs = x.float().reshape(batch, -1, x.shape[-1])
            self.fisher += torch.bmm(grad.transpose(1, 2), inputs).square().sum(0)
        else:  # token ids: example i's gradient of column v sums g over the positions holding v
            for ids, g in zip(x.reshape(batch, -1), grad):
                columns = torch.zeros(self.shape[1], self.shape[0], device=g.device).index_add_(0, ids, g)
                self.fisher += columns.T.square()
        self.examples += batch

    def finish_calibration(self, backend: Backend) -> None:
        self.group.choose_by_fisher()

    def saved_state(self) -> dict[str, Tensor]:
        return {"kept_values": self.values.detach(), **pack_indices(self.index, math.prod(self.shape))}

    @torch.no_grad()
    def load_saved_state(self, state: dict[str, Tensor], where: str) -> None:
        flat = _sparse_entries(state, math.prod(self.shape), where)
        self.select(flat.to(self.device))
        self.values.copy_(state["kept_values"].to(dtype=self.dtype, device=self.device))
        self.needs_calibration = False
