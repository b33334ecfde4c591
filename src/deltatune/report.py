"""Counting and describing deltas: ``summary`` (what is attached) and ``plan`` (a dry run).

Both work on a model built on the meta device, so a run can be sized without its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .anatomy import analyze, check_model
from .placement import place
from .api import check_model_and_config, count_parameters, deltas
from .backends import layer_backend
from .config import DeltaConfig, config as make_config, methods
from .errors import DeltatuneError


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [header] + [tuple(f"{c:,}" if isinstance(c, int) else str(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 or not c.replace(",", "").isdigit() else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class Summary:
    trainable: int
    total: int
    rows: tuple[tuple[str, str, str, str, int, int], ...]  # delta, method, state, role, modules, params
    base_total: int = 0  # parameters of the model without any delta

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def headline(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )

    def __str__(self) -> str:
        if not self.rows:
            return self.headline()
        base = self.base_total or self.total
        rows = [(*row, f"{100.0 * row[-1] / base:.4f}") for row in self.rows]
        return self.headline() + "\n" + _table(("delta", "method", "state", "role", "modules", "params", "% of base"), rows)


def summary(model: nn.Module, *, show: bool = False) -> Summary:
    """Parameter counts: the familiar headline plus one row per delta and role."""
    check_model("summary", model)
    trainable, total = count_parameters(model)
    anatomy = analyze(model)
    rows = []
    infos = deltas(model)
    for name, info in infos.items():
        state = "merged" if info.merged else "active" if info.active else "inactive"
        per_role: dict[str, list[int]] = {}
        for path in info.paths:
            layer = model.get_submodule(path)
            role = anatomy.role_of.get(path, "other")
            entry = per_role.setdefault(role, [0, 0])
            entry[0] += 1
            entry[1] += sum(p.numel() for p in layer.deltas[name].parameters())
        for role, (count, params) in per_role.items():
            rows.append((name, info.config.method, state, role, count, params))
    result = Summary(trainable, total, tuple(rows), total - sum(i.num_params for i in infos.values()))
    if show:
        print(result)
    return result


@dataclass(frozen=True)
class PlannedModule:
    path: str
    role: str
    layer: int | None
    kind: str
    shape: tuple[int, int]
    params: int


@dataclass(frozen=True)
class Plan:
    """What attaching a config would do, computed without changing the model."""

    config: DeltaConfig
    modules: tuple[PlannedModule, ...]
    base_params: int

    @property
    def delta_params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.modules]

    def oversized(self) -> str | None:
        """A warning when the delta would hold more values than the weights of the layers it
        adapts (fine-tuning them outright would be smaller), else None."""
        linear = [m for m in self.modules if m.shape[0] and m.shape[1]]
        adapted = sum(m.shape[0] * m.shape[1] for m in linear)
        held = sum(m.params for m in linear)  # a container's delta (a side network) is no layer's
        if not linear or held <= adapted:
            return None
        full_rank = max(min(m.shape) for m in linear)
        return (
            f"the {self.config.method} delta would hold {held:,} values "
            f"({held * 4 / 2**30:.1f} GiB in fp32, before gradients and optimizer state), more than "
            f"the {adapted:,} weights of the {len(linear)} layers it adapts: fine-tuning those layers outright "
            f"would train less. A low-rank delta's rank is above what the layers can use: their full rank "
            f"(min(in, out)) is at most {full_rank}"
        )

    def __str__(self) -> str:
        per_role: dict[tuple[str, str, tuple[int, int]], list[int]] = {}
        for m in self.modules:
            entry = per_role.setdefault((m.role, m.kind, m.shape), [0, 0])
            entry[0] += 1
            entry[1] += m.params
        rows = [(role, kind, f"{shape[1]}→{shape[0]}", n, p) for (role, kind, shape), (n, p) in per_role.items()]
        total = self.base_params + self.delta_params
        lines = [
            f"plan for {self.config.method}: {len(self.modules)} modules",
            _table(("role", "kind", "in→out", "modules", "params"), rows),
            f"trainable params: {self.delta_params:,} || all params: {total:,} "
            f"|| trainable%: {100.0 * self.delta_params / total:.4f}",
        ]
        oversized = self.oversized()
        if oversized:
            lines.append(f"warning: {oversized}")
        return "\n".join(lines)


def plan(model: nn.Module, config: DeltaConfig) -> Plan:
    """Dry run: the modules ``config`` would adapt and the parameters it would add.

    Deltas are built on the meta device, so this allocates nothing and works on meta models.
    """
    check_model_and_config("plan", model, config)
    placement = place(model, config)
    built = placement.build(initialize=False, device=torch.device("meta"))
    anatomy, modules = placement.anatomy, placement.modules
    planned = []
    for path in placement.paths:
        backend = layer_backend(modules[path])
        planned.append(
            PlannedModule(
                path=path,
                role=anatomy.role_of.get(path, "other"),
                layer=anatomy.layer_of.get(path),
                kind=backend.kind if backend.is_linear_map else type(modules[path]).__name__,
                shape=(backend.out_features, backend.in_features),
                params=sum(p.numel() for p in built[path].parameters()),
            )
        )
    _, total = count_parameters(model)
    return Plan(config, tuple(planned), total)


@dataclass(frozen=True)
class Comparison:
    """Several methods planned on one model: what each would train, side by side."""

    model_params: int
    #: method, modules adapted, trainable params, and why not where the method does not apply
    rows: tuple[tuple[str, int, int, str], ...]

    def _cells(self) -> list[tuple[str, str, str, str]]:
        cells = []
        for method, modules, params, reason in self.rows:
            if reason:
                cells.append((method, "-", "-", f"n/a: {reason}"))
            else:
                cells.append((method, f"{modules:,}", f"{params:,}", f"{100.0 * params / self.model_params:.4f}"))
        return cells

    def __str__(self) -> str:
        return _table(("method", "modules", "trainable params", "% of base"), self._cells())

    def markdown(self) -> str:
        lines = ["| method | modules | trainable params | % of base |", "|---|---:|---:|---:|"]
        lines += [f"| `{m}` | {n} | {p} | {pct} |" for m, n, p, pct in self._cells()]
        return "\n".join(lines)


def compare(model: nn.Module, configs: list[DeltaConfig | str] | None = None) -> Comparison:
    """Dry-run several configs or method names (by default every registered method with its
    defaults) on one model: how many modules each adapts and how many parameters it trains. A method that cannot
    adapt this model with those settings (BitFit on a model without biases) says why."""
    check_model("compare", model)
    # a method name stands for its config with the defaults
    configs = [make_config(c) if isinstance(c, str) else c for c in (configs if configs is not None else methods())]
    _, total = count_parameters(model)
    rows = []
    for cfg in configs:
        try:
            planned = plan(model, cfg)
        except DeltatuneError as exc:
            rows.append((cfg.method, 0, 0, str(exc).split(". ")[0]))
            continue
        rows.append((cfg.method, len(planned.modules), planned.delta_params, ""))
    return Comparison(total, tuple(rows))
