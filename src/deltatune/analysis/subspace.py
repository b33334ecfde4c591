"""How much two LoRA updates share, and how much an update amplifies its weight (Hu et al. 2021, §7).

**Subspace similarity** (§7.2, eq. 4). With A₁ (r₁×k) and A₂ (r₂×k) the down-projections of two
LoRA adapters of the same layer (ranks 8 and 64, or two seeds), and U^i_A the top-i right-singular
vectors of A (k×i),

    φ(A₁, A₂, i, j) = ‖U^{i⊤}_{A₁} U^j_{A₂}‖²_F / min(i, j)  ∈ [0, 1],

1 when one subspace contains the other, 0 when they are orthogonal; two random subspaces of
dimensions i and j in k dimensions give max(i, j)/k on average (r/k for i = j = r).

**Amplification factor** (§7.3). With U, V the top-r left and right singular vectors of
ΔW = s·B A, ‖ΔW‖_F / ‖U^⊤ W V‖_F says how strongly ΔW amplifies directions W itself barely uses
(the paper reports ≈ 21.5 for r = 4 on GPT-3's W_q, layer 48).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError


def right_singular_vectors(a: Tensor) -> Tensor:
    """The right-singular vectors of ``a`` (r×k) as columns (k×r), by decreasing singular value."""
    _, _, vh = torch.linalg.svd(a.detach().double(), full_matrices=False)
    return vh.T


def similarity_grid(a1: Tensor, a2: Tensor, ranks: tuple[int, int] | None = None) -> Tensor:
    """φ(A₁, A₂, i, j) for every 1 ≤ i ≤ r₁, 1 ≤ j ≤ r₂, as an r₁×r₂ tensor (entry [i-1, j-1]);
    ``ranks`` keeps only the top (r₁, r₂) directions (for ΔW = B A, whose rank is A's).

    ‖U^{i⊤}_1 U^j_2‖²_F is the sum of the squared entries of the top-left i×j block of U_1^⊤ U_2,
    so one product and two cumulative sums give the whole grid."""
    for a in (a1, a2):
        if not isinstance(a, Tensor) or a.dim() != 2:
            raise ConfigError(f"subspace analysis needs 2-D tensors (LoRA A matrices, r×k), got {type(a).__name__} {a!r:.60}")
    if a1.shape[-1] != a2.shape[-1]:
        raise ConfigError(f"the two matrices act on different input sizes: {a1.shape[-1]} and {a2.shape[-1]}")
    u1, u2 = right_singular_vectors(a1), right_singular_vectors(a2)
    if ranks is not None:
        u1, u2 = u1[:, : ranks[0]], u2[:, : ranks[1]]
    overlap = (u1.T @ u2) ** 2
    sums = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, sums.shape[0] + 1, dtype=sums.dtype)[:, None]
    j = torch.arange(1, sums.shape[1] + 1, dtype=sums.dtype)[None, :]
    return sums / torch.minimum(i, j)


def subspace_similarity(a1: Tensor, a2: Tensor, i: int | None = None, j: int | None = None) -> float:
    """φ(A₁, A₂, i, j) (default: the full ranks)."""
    grid = similarity_grid(a1, a2)
    i, j = i or grid.shape[0], j or grid.shape[1]
    if not (1 <= i <= grid.shape[0] and 1 <= j <= grid.shape[1]):
        raise ConfigError(f"(i, j) = ({i}, {j}) out of range; allowed: 1 ≤ i ≤ {grid.shape[0]}, 1 ≤ j ≤ {grid.shape[1]}")
    return float(grid[i - 1, j - 1])


def amplification_factor(delta_weight: Tensor, weight: Tensor, r: int | None = None) -> float:
    """‖ΔW‖_F / ‖U^⊤ W V‖_F, with U, V the top-``r`` (default: rank of ΔW) singular vectors of ΔW."""
    if delta_weight.shape != weight.shape:
        raise ConfigError(f"ΔW {tuple(delta_weight.shape)} and W {tuple(weight.shape)} differ in shape")
    delta_weight = delta_weight.detach().double()
    u, _, vh = torch.linalg.svd(delta_weight, full_matrices=False)
    r = r or max(int(torch.linalg.matrix_rank(delta_weight)), 1)
    projected = u[:, :r].T @ weight.detach().double() @ vh[:r].T
    return float(torch.linalg.matrix_norm(delta_weight) / torch.linalg.matrix_norm(projected))


def lora_amplification(model, name: str = "default") -> dict[str, float]:
    """Module path → amplification factor of the LoRA delta ``name`` attached to ``model``
    (ΔW = s·B A against the module's base weight W)."""
    from ..layer import delta_layers

    factors = {}
    for path, layer in delta_layers(model).items():
        delta = layer.deltas[name] if name in layer.deltas else None
        low_rank = delta.low_rank_factors() if delta is not None and hasattr(delta, "low_rank_factors") else None
        if low_rank is not None:
            a, b, scale = low_rank
            factors[path] = amplification_factor(scale * (b.double() @ a.double()), layer.backend.dense_weight())
    if not factors:
        raise CheckpointError(f"model has no plain LoRA delta named {name!r} to measure")
    return factors


def lora_factors(path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Module path → (A, B) of every LoRA module in a saved delta (deltatune's directory, keys
    ``<path>.A``/``.B``, or PEFT's ``adapter_model.safetensors``, keys ``…<path>.lora_A.weight``)."""
    from ..io import read_config, read_tensors
    from ..peft_format import read_tensors as peft_tensors

    root = Path(path)
    deltatune_file, peft_file = root / "delta.safetensors", root / "adapter_model.safetensors"
    if deltatune_file.is_file():
        method = read_config(root).method
        if method != "lora":
            raise CheckpointError(f"{root} holds a {method!r} delta; subspace similarity needs lora")
        tensors, (a_suffix, b_suffix), prefix = read_tensors(root), (".A", ".B"), ""
    elif peft_file.is_file():
        tensors, (a_suffix, b_suffix), prefix = peft_tensors(root), (".lora_A.weight", ".lora_B.weight"), "base_model.model."
    else:
        raise CheckpointError(f"{str(root)!r} holds neither delta.safetensors nor adapter_model.safetensors")
    found = {}
    for key, value in tensors.items():
        if key.endswith(a_suffix):
            stem = key[: -len(a_suffix)]
            found[stem[len(prefix):] if stem.startswith(prefix) else stem] = (value, tensors[stem + b_suffix])
    if not found:
        raise CheckpointError(f"{root} holds no LoRA A matrices (keys ending {a_suffix!r})")
    return found


@dataclass(frozen=True)
class SubspaceReport:
    """φ grids of every module two LoRA deltas share, and their mean."""

    grids: dict[str, Tensor]

    @property
    def mean_grid(self) -> Tensor:
        shapes = {tuple(g.shape) for g in self.grids.values()}
        if len(shapes) > 1:  # rank patterns: average over the common top-left block
            rows, cols = min(s[0] for s in shapes), min(s[1] for s in shapes)
            return torch.stack([g[:rows, :cols] for g in self.grids.values()]).mean(0)
        return torch.stack(list(self.grids.values())).mean(0)

    def table(self) -> list[tuple[str, float, float]]:
        """Per module: φ(1, 1) (do the top directions agree?) and φ(r₁, r₂)."""
        return [(path, float(g[0, 0]), float(g[-1, -1])) for path, g in self.grids.items()]

    def heatmap(self, path: Path, title: str) -> Path:
        from .compare import load_pyplot

        plt = load_pyplot()
        grid = self.mean_grid.numpy()
        figure, axes = plt.subplots(figsize=(min(2 + 0.25 * grid.shape[1], 14), min(2 + 0.25 * grid.shape[0], 10)))
        image = axes.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper",
                            extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        axes.set(xlabel="j (second delta)", ylabel="i (first delta)", title=title)
        figure.colorbar(image, ax=axes, label="φ(A₁, A₂, i, j)")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path


#: what the subspaces are taken of: the A matrices (the paper's §7.2), or the updates ΔW = B A,
#: whose row space is A's weighted by what B learned (telling early in training, while A is
#: still close to its random initialisation and B, from zero, carries what was learned)
SUBSPACE_OF = ("A", "delta")


def compare_subspaces(first: str | Path, second: str | Path, modules: str | None = None, of: str = "A") -> SubspaceReport:
    """φ grids between two saved LoRA deltas, for every module both adapt (whose path contains
    ``modules``, if given), over the right-singular subspaces of A or of ΔW (``of``)."""
    if of not in SUBSPACE_OF:
        raise ConfigError(f"of={of!r} is not valid; allowed: {', '.join(SUBSPACE_OF)}")
    a, b = lora_factors(first), lora_factors(second)
    shared = [p for p in a if p in b and (modules is None or modules in p)]
    if not shared:
        raise CheckpointError(
            f"{first} and {second} adapt no common module" + (f" matching {modules!r}" if modules else "")
            + f"; first has e.g. {next(iter(a))!r}, second {next(iter(b))!r}"
        )
    if of == "A":
        return SubspaceReport({p: similarity_grid(a[p][0], b[p][0]) for p in shared})
    return SubspaceReport({
        p: similarity_grid(a[p][1].double() @ a[p][0].double(), b[p][1].double() @ b[p][0].double(),
                           ranks=(a[p][0].shape[0], b[p][0].shape[0]))
        for p in shared
    })
