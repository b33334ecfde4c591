"""``deltatune search``: the staged search of S4's design space on the user's data and budget.

Chen et al. (2023, "Parameter-Efficient Fine-Tuning Design Spaces") refine a design space one
component at a time, keeping the best choice of each stage: (1) the layer grouping pattern,
(2) the parameter allocation over the groups, (3) which groups are tuned, (4) each group's
strategy from {Adapter, Prefix, BitFit, LoRA}. This search does the same greedily on one model
and dataset, with every trial a short ``deltatune train --method s4`` run of the same budget
(steps, batch, seed, data order; the same runs as ``deltatune compare``'s):

1. grouping: each of :data:`~deltatune.methods.s4.GROUPINGS`, starting from the paper's S4
   design (spindle, uniform, G1: A+L, G2: A+P, G3: A+P+B, G4: P+B+L); the start must give the
   groups different strategies, or every grouping would build the same delta;
2. allocation: each of :data:`~deltatune.methods.s4.ALLOCATIONS`;
3. tuned groups: all of them, or all but one;
4. strategy, group by group (G1…G4): the current set with one method added or removed.

A stage compares its candidates with the best design so far and keeps the one with the lowest
held-out loss (the one number every task has, and less coarse than accuracy or exact match on
the few examples a short search evaluates). ``trials`` caps how many designs are trained; a
design already trained is reused, not counted. Each finished trial is a run directory whose
``summary.json`` the trainer writes atomically, and the search's record (``trials.json``) is
rewritten atomically after each one, so rerunning the same command continues where it stopped.
The report (``search.md``, ``report.html``, a plot of every trial) names the design it picked,
and ``best_design.json`` trains it: ``deltatune train --config best_design.json``.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import ConfigError
from ..methods.s4 import (ALLOCATIONS, GROUPINGS, METHODS, NOT_TUNED, PAPER_STRATEGIES, EmptyDesign, S4Config,
                          strategy_letters)
from ..outputs import write_text_atomically
from .compare import MethodRun, TrainingComparison, finished_run, load_pyplot

#: the paper's S4 design: each stage re-decides one of its components on the user's data
START = {"grouping": "spindle", "allocation": "uniform", "strategies": list(PAPER_STRATEGIES)}
#: the design fields a stage changes; the rest of the S4 options stay as the user gave them
DESIGN_FIELDS = ("grouping", "allocation", "strategies")
RECORD = "trials.json"


def design_key(design: dict[str, Any]) -> str:
    """A readable directory name for a design: ``spindle-uniform-AL_AP_APB_PBL``."""
    groups = "_".join("".join(strategy_letters(s)) or "none" for s in design["strategies"])
    return f"{design['grouping']}-{design['allocation']}-{groups}"


def _toggled(strategy: str) -> Iterator[str]:
    """The strategies one method away from ``strategy`` (never the empty one)."""
    letters = strategy_letters(strategy)
    for letter in METHODS:
        changed = [m for m in letters if m != letter] if letter in letters else [*letters, letter]
        if changed:
            yield "+".join(m for m in METHODS if m in changed)


def stages(best: dict[str, Any]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(stage name, candidate designs), each stage built from the best design so far; a
    generator, so each stage sees the choice of the one before it (``best`` is updated)."""
    yield "grouping", [{**best, "grouping": g} for g in GROUPINGS]
    yield "allocation", [{**best, "allocation": a} for a in ALLOCATIONS]
    tuned = [dict(best)]
    for group in range(4):
        strategies = list(best["strategies"])
        strategies[group] = NOT_TUNED
        if any(s != NOT_TUNED for s in strategies):
            tuned.append({**best, "strategies": strategies})
    yield "tuned groups", tuned
    for group in range(4):
        if best["strategies"][group] == NOT_TUNED:
            continue
        candidates = [dict(best)]
        for strategy in _toggled(best["strategies"][group]):
            strategies = list(best["strategies"])
            strategies[group] = strategy
            candidates.append({**best, "strategies": strategies})
        yield f"strategy G{group + 1}", candidates


@dataclass(frozen=True)
class Trial:
    """One trained design: the stage that proposed it, the design, its run."""

    index: int
    stage: str
    design: dict[str, Any]
    run: MethodRun
    metrics_after: dict[str, float]

    @property
    def score(self) -> float:
        return self.run.loss_after


@dataclass(frozen=True)
class DesignSearch:
    """Every trial of a search, the stage winners, and the design picked."""

    trials: tuple[Trial, ...]
    best: dict[str, Any]
    options: dict[str, Any]  # the S4 options every trial shares (sizes)
    budget: str
    complete: bool  # False: stopped by the trial cap before every stage ran

    @property
    def best_trial(self) -> Trial:
        return next(t for t in self.trials if t.design == self.best)

    def best_config(self) -> dict[str, Any]:
        """What ``deltatune train --config`` reads: the method and its options."""
        return {"method": "s4", **self.options, **self.best}

    HEADER = ("#", "stage", "grouping", "allocation", "G1", "G2", "G3", "G4", "trainable %", "s/step",
              "held-out loss", "metrics after")

    def rows(self) -> list[tuple[str, ...]]:
        rows = []
        for t in self.trials:
            picked = " ◀ picked" if t.design == self.best else ""
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in t.metrics_after.items()) or (
                "n/a" if t.run.exact_match_after is None else f"exact match {t.run.exact_match_after:.2f}")
            rows.append((f"{t.index}{picked}", t.stage, t.design["grouping"], t.design["allocation"],
                         *t.design["strategies"], f"{t.run.trainable_percent:.3f}", f"{t.run.seconds_per_step:.2f}",
                         f"{t.run.loss_before:.3f} → {t.run.loss_after:.3f}", metrics))
        return rows

    def picked_sentence(self) -> str:
        b, t = self.best, self.best_trial
        groups = ", ".join(f"G{i + 1}: {s}" for i, s in enumerate(b["strategies"]))
        status = "" if self.complete else " (the trial cap stopped the search before its last stage)"
        return (f"picked design{status}: grouping {b['grouping']}, allocation {b['allocation']}, {groups} — "
                f"held-out loss {t.run.loss_after:.4f}, {t.run.trainable_percent:.3f}% trainable "
                f"({t.run.trainable_params:,} parameters), trial {t.index} of {len(self.trials)}")

    def markdown(self) -> str:
        lines = [self.budget, "", self.picked_sentence(), "",
                 "| " + " | ".join(self.HEADER) + " |", "|---:|---|---|---|---|---|---|---|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        plt = load_pyplot()
        figure, axes = plt.subplots(figsize=(8, 4.2))
        names = list(dict.fromkeys(t.stage for t in self.trials))
        for stage in names:
            chosen = [t for t in self.trials if t.stage == stage]
            axes.scatter([t.index for t in chosen], [t.score for t in chosen], s=30, label=stage)
        best = self.best_trial
        axes.scatter([best.index], [best.score], s=140, facecolors="none", edgecolors="black", label="picked")
        axes.set(xlabel="trial", ylabel="held-out loss after training", title="S4 design search: every trial")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def write_report(self, directory: Path) -> dict[str, Path]:
        """search.md, best_design.json, search_trials.png, and the compare report of every trial
        (report.html with the loss curves, results.json)."""
        directory.mkdir(parents=True, exist_ok=True)
        comparison = TrainingComparison(tuple(t.run for t in self.trials), self.budget)
        written = comparison.write_report(directory)
        plot = self.plot(directory / "search_trials.png")
        (directory / "search.md").write_text(self.markdown() + "\n")
        write_text_atomically(directory / "best_design.json", json.dumps(self.best_config(), indent=2) + "\n")
        return {**written, "search": directory / "search.md", "design": directory / "best_design.json", "plot": plot}


def _read_record(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    if record["settings"] != settings:
        changed = sorted(k for k in settings if record["settings"].get(k) != settings[k])
        raise ConfigError(
            f"{path.parent} holds a search with other settings ({', '.join(changed)} differ); "
            "rerun with the same ones to continue it, or pass --fresh (or another --output-dir) to start over"
        )
    return record["trials"]


def search_design(
    *,
    model: str | None = None,
    task: str | None = None,
    data: str | None = None,
    eval_data: str | None = None,
    steps_per_trial: int = 20,
    trials: int = 12,
    batch_size: int = 8,
    eval_limit: int = 20,
    max_length: int = 256,
    seed: int = 0,
    lr: float | None = None,
    options: dict[str, Any] | None = None,
    output_dir: str | Path = "runs/search",
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DesignSearch:
    """Search S4's design space (module docstring) with at most ``trials`` training runs of
    ``steps_per_trial`` steps each; ``options`` are S4 options every trial shares (``r``,
    ``bottleneck``, ``num_virtual_tokens``...). ``model``/``task``/``data`` as for ``deltatune train``."""
    from ..train.settings import TrainSettings
    from ..train.trainer import Trainer

    if trials < 1 or steps_per_trial < 1:
        raise ConfigError(f"--trials and --steps-per-trial must be at least 1, got {trials} and {steps_per_trial}")
    options = dict(options or {})
    fixed = [k for k in options if k in DESIGN_FIELDS]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} is what the search chooses; give only the other S4 options (sizes)")
    S4Config.check_option_names(options)
    output = Path(output_dir)
    if fresh:
        shutil.rmtree(output / "trials", ignore_errors=True)
        (output / RECORD).unlink(missing_ok=True)
    shared = dict(model=model, task=task, data=data, eval_data=eval_data, max_steps=steps_per_trial,
                  batch_size=batch_size, eval_limit=eval_limit, max_length=max_length, seed=seed, lr=lr)
    record_settings = {**shared, "options": options}
    recorded = {r["key"]: r for r in _read_record(output / RECORD, record_settings)}

    done: list[Trial] = []
    by_key: dict[str, Trial] = {}
    trained = 0
    best = {**START, "strategies": list(START["strategies"])}
    complete = True

    def run_trial(stage: str, design: dict[str, Any]) -> Trial | None:
        nonlocal trained, complete
        key = design_key(design)
        if key in by_key:
            return by_key[key]
        if trained >= trials:
            complete = False
            return None
        directory = output / "trials" / key
        settings = TrainSettings(method="s4", method_options={**options, **design}, output_dir=str(directory),
                                 samples=0, **shared)
        index = len(done) + 1
        if key in recorded and finished_run(directory, settings.__dict__):
            log(f"trial {index}, {stage}: {key} finished earlier, reusing {directory}")
        else:
            log(f"trial {index}, {stage}: {key}, {steps_per_trial} steps of batch {batch_size}")
            shutil.rmtree(directory, ignore_errors=True)
            try:
                Trainer(settings, log=log, progress=progress).run()
            except EmptyDesign as exc:  # e.g. untuning the only non-empty group of a shallow model
                log(f"trial {index} skipped: {exc}")
                shutil.rmtree(directory, ignore_errors=True)
                return None
        trained += 1
        summary = json.loads((directory / "summary.json").read_text())
        trial = Trial(index, stage, design, MethodRun.from_run_dir(directory), summary["after"].get("metrics") or {})
        done.append(trial)
        by_key[key] = trial
        recorded[key] = {"key": key, "stage": stage, "design": design}
        write_text_atomically(output / RECORD, json.dumps(
            {"settings": record_settings, "trials": list(recorded.values())}, indent=1) + "\n")
        log(f"trial {index}: held-out loss {trial.run.loss_before:.4f} → {trial.run.loss_after:.4f}, "
            f"{trial.run.trainable_percent:.3f}% trainable")
        return trial

    for stage, candidates in stages(best):
        results = [t for t in (run_trial(stage, c) for c in candidates) if t is not None]
        if results:
            winner = min(results, key=lambda t: t.score)
            best.clear()
            best.update(winner.design)
            log(f"{stage}: kept {design_key(best)}")
        if not complete:
            break
    budget = (
        f"S4 design search: {len(done)} trials of {steps_per_trial} steps of batch {batch_size} (seed {seed}), "
        f"lr {lr or S4Config.default_lr:g}, ranked by held-out loss"
        f"{'; exact match on ' + str(eval_limit) + ' held-out examples' if task is None else ''}. "
        f"{platform.machine()} {'CUDA' if torch.cuda.is_available() else 'CPU'}, torch threads: {torch.get_num_threads()}."
    )
    return DesignSearch(tuple(done), dict(best), options, budget, complete)
