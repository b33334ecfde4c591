"""Train several methods on one model, data and budget, and report what each cost and achieved.

This is ``deltatune compare``: each method runs the same :class:`~deltatune.train.trainer.Trainer`
(same steps, batch size, seed, data order and evaluation) at its own default learning rate,
since methods differ by orders of magnitude there (see each config's ``default_lr``). The report
is a table (trainable %, peak memory, time per step, tokens/s, final training loss, held-out
loss and exact match), two plots (training loss per step for each method; held-out metric
against trainable %), and one self-contained HTML page with the plots embedded.

A method whose run under ``output_dir/<method>`` finished with the same settings is not run
again, so an interrupted comparison continues where it stopped (``fresh=True`` retrains).
"""

from __future__ import annotations

import base64
import html
import json
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import config_class, methods as registered_methods
from ..errors import ConfigError

#: LoRA, (IA)³, prompt tuning, prefix tuning, the Houlsby adapter, BitFit, and full fine-tuning
#: of the last layers: one method per family the seed documents compare
DEFAULT_METHODS = ("lora", "ia3", "prompt", "prefix", "houlsby", "bitfit", "top_layers")
#: options that differ from a method's defaults, and why
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "bitfit": {"add_missing": True},  # Llama-style models (the bundled one) have no biases to train
}
#: settings that must match for a finished run to be reused
_SAME_RUN = ("model", "data", "eval_data", "method", "method_options", "max_steps", "batch_size",
             "eval_limit", "max_length", "seed", "lr")


@dataclass(frozen=True)
class MethodRun:
    """One method's finished run: what it trained, what it cost, what it reached."""

    method: str
    options: dict[str, Any]
    learning_rate: float
    trainable_params: int
    total_params: int
    steps: int
    train_seconds: float
    tokens_per_second: float
    peak_memory_mib: float | None  # training peak (CPU: resident set; CUDA: allocated)
    train_losses: tuple[float, ...]  # one per optimizer step
    loss_before: float
    loss_after: float
    exact_match_before: float | None
    exact_match_after: float | None

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)

    @property
    def final_train_loss(self) -> float | None:
        """Mean of the last five steps' losses: one batch's loss is too noisy to rank methods."""
        tail = self.train_losses[-5:]
        return sum(tail) / len(tail) if tail else None

    @property
    def metric(self) -> tuple[str, float]:
        """The held-out metric the plot uses: exact match where the data has answers, else loss."""
        if self.exact_match_after is not None:
            return "held-out exact match", self.exact_match_after
        return "held-out loss", self.loss_after

    @classmethod
    def from_run_dir(cls, directory: Path) -> "MethodRun":
        summary = json.loads((directory / "summary.json").read_text())
        losses = summary.get("train_losses", [])  # absent in summaries written before it was recorded
        match = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", summary["parameters"])
        if match is None:
            raise ConfigError(f"{directory / 'summary.json'} has no parameter count: {summary['parameters']!r}")
        settings = summary["settings"]
        return cls(
            method=settings["method"], options=settings["method_options"],
            learning_rate=settings["lr"] or config_class(settings["method"]).default_lr,
            trainable_params=int(match.group(1).replace(",", "")), total_params=int(match.group(2).replace(",", "")),
            steps=summary["steps"], train_seconds=summary["train_seconds"],
            tokens_per_second=summary["tokens_per_second"],
            peak_memory_mib=summary.get("training_peak_memory_mib"), train_losses=tuple(losses),
            loss_before=summary["before"]["loss"], loss_after=summary["after"]["loss"],
            exact_match_before=summary["before"]["exact_match"], exact_match_after=summary["after"]["exact_match"],
        )


@dataclass(frozen=True)
class TrainingComparison:
    """Every method's run under one budget; renders as a table, plots and an HTML page."""

    runs: tuple[MethodRun, ...]
    budget: str  # one sentence: steps, batch, seed, evaluation, machine

    def rows(self) -> list[tuple[str, ...]]:
        def number(value: float | None, fmt: str) -> str:
            return "n/a" if value is None else format(value, fmt)

        return [
            (
                r.method + "".join(f" ({k}={v})" for k, v in r.options.items()),
                f"{r.trainable_params:,}", f"{r.trainable_percent:.3f}", f"{r.learning_rate:g}",
                number(r.peak_memory_mib, ".0f"), f"{r.seconds_per_step:.2f}", f"{r.tokens_per_second:.0f}",
                number(r.final_train_loss, ".3f"), f"{r.loss_before:.3f} → {r.loss_after:.3f}",
                "n/a" if r.exact_match_after is None else f"{r.exact_match_before:.2f} → {r.exact_match_after:.2f}",
            )
            for r in self.runs
        ]

    HEADER = ("method", "trainable params", "trainable %", "lr", "peak MiB", "s/step", "tokens/s",
              "final train loss", "held-out loss", "exact match")

    def markdown(self) -> str:
        lines = [self.budget, "", "| " + " | ".join(self.HEADER) + " |", "|---|" + "---:|" * (len(self.HEADER) - 1)]
        lines += [f"| `{r.method}`{row[0][len(r.method):]} | " + " | ".join(row[1:]) + " |" for r, row in zip(self.runs, self.rows())]
        return "\n".join(lines)

    def plot_losses(self, path: Path) -> Path:
        plt = load_pyplot()
        figure, axes = plt.subplots(figsize=(7, 4.2))
        for r in self.runs:
            if r.train_losses:
                steps = range(1, len(r.train_losses) + 1)
                line, = axes.plot(steps, r.train_losses, linewidth=0.8, alpha=0.3)
                # one batch's loss is noisy (batches group similar lengths): the trend is a 5-step mean
                window = [r.train_losses[max(0, i - 4): i + 1] for i in range(len(r.train_losses))]
                axes.plot(steps, [sum(w) / len(w) for w in window], color=line.get_color(), label=r.method, linewidth=1.8)
        axes.set(xlabel="optimizer step", ylabel="training loss (faint: per step; bold: 5-step mean)", yscale="log",
                 title="Training loss per method")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def plot_metric(self, path: Path) -> Path:
        plt = load_pyplot()
        figure, axes = plt.subplots(figsize=(7, 4.2))
        label = self.runs[0].metric[0] if self.runs else "metric"
        for r in self.runs:
            axes.scatter(r.trainable_percent, r.metric[1], s=36)
            axes.annotate(r.method, (r.trainable_percent, r.metric[1]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        axes.set(xlabel="trainable parameters (% of the model, log scale)", ylabel=label, xscale="log",
                 title=f"{label} after training vs trainable %")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def html(self, images: dict[str, Path]) -> str:
        """One page with nothing outside it: the table, and the PNG plots inlined as base64."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows())
        figures = "".join(
            f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
            f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
            for title, path in images.items()
        )
        style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}"
                 "img{max-width:100%}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>deltatune compare</title>"
                f"<style>{style}</style></head><body><h1>deltatune compare</h1><p>{html.escape(self.budget)}</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{figures}</body></html>\n")

    def write_report(self, directory: Path) -> dict[str, Path]:
        """report.md, report.html, results.json and the two PNG plots under ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        images = {
            "Training loss per step": self.plot_losses(directory / "loss_curves.png"),
            "Held-out metric vs trainable %": self.plot_metric(directory / "metric_vs_trainable.png"),
        }
        (directory / "report.md").write_text(self.markdown() + "\n")
        (directory / "report.html").write_text(self.html(images))
        results = [{**r.__dict__, "trainable_percent": r.trainable_percent, "seconds_per_step": r.seconds_per_step,
                    "final_train_loss": r.final_train_loss} for r in self.runs]
        (directory / "results.json").write_text(json.dumps({"budget": self.budget, "runs": results}, indent=2) + "\n")
        return {"markdown": directory / "report.md", "html": directory / "report.html",
                "json": directory / "results.json", **{p.stem: p for p in images.values()}}


def load_pyplot():
    """matplotlib's pyplot on a file-only backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("plots need matplotlib: pip install 'deltatune[analysis]'") from exc
    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    return plt


def finished_run(directory: Path, settings: dict[str, Any]) -> bool:
    """Whether the run in ``directory`` finished with these settings (so a rerun reuses it)."""
    summary_path = directory / "summary.json"
    if not summary_path.is_file():
        return False
    done = json.loads(summary_path.read_text())
    return all(done["settings"].get(key) == settings[key] for key in _SAME_RUN) and done["steps"] == settings["max_steps"]


def compare_training(
    methods: tuple[str, ...] | list[str] = DEFAULT_METHODS,
    *,
    model: str | None = None,
    data: str | None = None,
    eval_data: str | None = None,
    steps: int = 30,
    batch_size: int = 8,
    eval_limit: int = 30,
    max_length: int = 256,
    seed: int = 0,
    output_dir: str | Path = "runs/compare",
    method_options: dict[str, dict[str, Any]] | None = None,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainingComparison:
    """Train each of ``methods`` with the same budget (``steps`` optimizer steps of
    ``batch_size`` examples, ``seed``; held-out loss on every held-out example, exact match on
    ``eval_limit`` of them) and collect a :class:`MethodRun` each. ``model`` and ``data`` are as
    for ``deltatune train`` (default: the bundled SmolLM2-135M-Instruct and date task).
    ``method_options`` adds options per method to :data:`METHOD_OPTIONS`."""
    from ..train.settings import TrainSettings
    from ..train.trainer import Trainer

    unknown = [m for m in methods if m not in registered_methods()]
    if unknown or not methods:
        raise ConfigError(f"unknown method(s) {unknown or list(methods)!r}; allowed: {', '.join(registered_methods())}")
    output = Path(output_dir)
    runs = []
    for index, method in enumerate(methods, 1):
        options = {**METHOD_OPTIONS.get(method, {}), **(method_options or {}).get(method, {})}
        settings = TrainSettings(
            model=model, data=data, eval_data=eval_data, method=method, method_options=options, max_steps=steps,
            batch_size=batch_size, eval_limit=eval_limit, max_length=max_length, seed=seed,
            output_dir=str(output / method), samples=0,
        )
        directory = output / method
        if not fresh and finished_run(directory, settings.__dict__):
            log(f"[{index}/{len(methods)}] {method}: finished earlier, reusing {directory}")
        else:
            log(f"[{index}/{len(methods)}] {method}: {steps} steps of batch {batch_size}, lr {settings.learning_rate:g}")
            shutil.rmtree(directory, ignore_errors=True)
            Trainer(settings, log=log, progress=progress).run()
        run = MethodRun.from_run_dir(directory)
        final = "n/a" if run.final_train_loss is None else f"{run.final_train_loss:.3f}"
        log(f"[{index}/{len(methods)}] {method}: final train loss {final}, held-out loss {run.loss_after:.3f}, "
            f"{run.seconds_per_step:.2f} s/step")
        runs.append(run)
    budget = (
        f"{steps} steps of batch {batch_size} (seed {seed}) per method, each at its default learning rate; "
        f"exact match on {eval_limit} held-out examples, loss on all of them. "
        f"{platform.machine()} {'CUDA' if torch.cuda.is_available() else 'CPU'}, torch threads: {torch.get_num_threads()}, "
        f"torch {torch.__version__}."
    )
    return TrainingComparison(tuple(runs), budget)
