"""The intrinsic dimension of a task on a model: how small a random subspace still learns it.

Aghajanyan, Zettlemoyer & Gupta, 2021, "Intrinsic Dimensionality Explains the Effectiveness of
Language Model Fine-Tuning": train Intrinsic SAID (:mod:`deltatune.methods.intrinsic`) at a
ladder of dimensions d and report d90, the smallest d whose held-out metric reaches 90% of full
fine-tuning's. Full fine-tuning is measured as a run that trains every weight of every block
(``top_layers`` over all blocks, with the task's head), on the same data, steps and seed, unless
the caller gives its metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import check_number, check_positive_int
from ..errors import ConfigError

#: the dimensions tried by default (the paper's plots span 10 to 10⁴ and beyond)
DEFAULT_DIMENSIONS = (10, 100, 1000, 4000, 10000)
#: full fine-tuning, approximated by training a copy of every block's weights
FULL_METHOD = ("top_layers", {"k": 1_000_000})


@dataclass
class IntrinsicDimension:
    """The ladder's results: (d, metric) per dimension, and full fine-tuning's metric."""

    metric: str
    full: float
    points: list[tuple[int, float]]
    threshold: float = 0.9
    runs: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> float:
        return self.threshold * self.full

    @property
    def d90(self) -> int | None:
        """The smallest d whose metric reaches ``threshold`` × full fine-tuning's; None if none does."""
        return next((d for d, value in sorted(self.points) if value >= self.target), None)

    def __str__(self) -> str:
        lines = [f"{'d':>8}  {self.metric}"]
        lines += [f"{d:>8}  {value:.4f}{'  ✓' if value >= self.target else ''}" for d, value in sorted(self.points)]
        lines.append(f"{'full':>8}  {self.full:.4f}  (target {self.threshold:.0%}: {self.target:.4f})")
        found = self.d90
        lines.append(f"d{round(self.threshold * 100)} = {found}" if found is not None else
                     f"d{round(self.threshold * 100)} not reached: no d up to {max(d for d, _ in self.points)} "
                     f"reaches {self.target:.4f}; try larger dimensions or more steps")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "full": self.full, "threshold": self.threshold, "d90": self.d90,
                "points": [{"dimension": d, "value": v} for d, v in sorted(self.points)], "runs": self.runs}

    def plot(self, path: str | Path) -> Path:
        """Metric against d (log scale), full fine-tuning's metric and the target as lines."""
        from .compare import load_pyplot

        plt = load_pyplot()
        figure, axes = plt.subplots(figsize=(6, 4))
        dims, values = zip(*sorted(self.points))
        axes.plot(dims, values, marker="o", label="Intrinsic SAID")
        axes.axhline(self.full, color="black", linestyle="--", label="full fine-tuning")
        axes.axhline(self.target, color="grey", linestyle=":", label=f"{self.threshold:.0%} of full")
        if self.d90 is not None:
            axes.axvline(self.d90, color="tab:red", alpha=0.5, label=f"d{round(self.threshold * 100)} = {self.d90}")
        axes.set_xscale("log")
        axes.set_xlabel("intrinsic dimension d")
        axes.set_ylabel(self.metric)
        axes.legend()
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path


def metric_of(evaluation: Any, name: str | None) -> tuple[str, float]:
    """(name, value) of a held-out metric: ``name``, or the task's first metric (accuracy for
    classification), or exact match for language modelling."""
    available = dict(evaluation.metrics)
    if evaluation.exact_match is not None:
        available.setdefault("exact_match", evaluation.exact_match)
    if not available:
        raise ConfigError("the held-out evaluation reported no metric to compare (only a loss)")
    chosen = name or next(iter(available))
    if chosen not in available:
        raise ConfigError(f"metric {chosen!r} is not among this task's metrics: {', '.join(available)}")
    return chosen, float(available[chosen])


def intrinsic_dimension(
    dimensions: Sequence[int] = DEFAULT_DIMENSIONS,
    *,
    model: str | None = None,
    task: str | None = "classify",
    data: str | None = None,
    eval_data: str | None = None,
    steps: int = 100,
    batch_size: int = 8,
    lr: float | None = None,
    metric: str | None = None,
    full_metric: float | None = None,
    threshold: float = 0.9,
    seed: int = 0,
    output_dir: str | Path = "runs/intrinsic-dim",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> IntrinsicDimension:
    """Train Intrinsic SAID at each of ``dimensions`` (and full fine-tuning, unless
    ``full_metric`` gives its value) with the same data, ``steps``, ``batch_size`` and ``seed``;
    ``model``, ``task``, ``data`` are as for ``deltatune train`` (default: the bundled encoder's
    classification task). Each run goes in ``output_dir/<d>`` (``full`` for full fine-tuning)."""
    from ..train.settings import TrainSettings
    from ..train.trainer import Trainer

    if not dimensions:
        raise ConfigError("dimensions is empty; give at least one d, e.g. 10,100,1000")
    for d in dimensions:
        check_positive_int("dimensions", d, "each d of the ladder")
    check_number("threshold", threshold, low=0, high=1, low_open=True)
    check_positive_int("steps", steps)
    output = Path(output_dir)

    def train(method: str, options: dict[str, Any], where: str, rate: float | None):
        settings = TrainSettings(
            model=model, task=task, data=data, eval_data=eval_data, method=method, method_options=options,
            max_steps=steps, batch_size=batch_size, lr=rate, seed=seed, output_dir=str(output / where),
            samples=0, overwrite=True,
        )
        return Trainer(settings, log=log, progress=progress).run()

    runs: dict[str, str] = {}
    name = metric
    if full_metric is None:
        log("full fine-tuning (every block's weights)")
        result = train(*FULL_METHOD, "full", None)
        name, full_metric = metric_of(result.after, name)
        runs["full"] = str(output / "full")
    points = []
    for d in sorted(set(dimensions)):
        log(f"Intrinsic SAID, d = {d}")
        result = train("intrinsic_said", {"dimension": d}, f"d{d}", lr)
        name, value = metric_of(result.after, name)
        points.append((d, value))
        runs[str(d)] = str(output / f"d{d}")
    found = IntrinsicDimension(name, full_metric, points, threshold, runs)
    (output / "intrinsic_dim.json").write_text(json.dumps(found.to_dict(), indent=2) + "\n")
    return found
