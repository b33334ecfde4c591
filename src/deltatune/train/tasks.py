"""The run's data and its tasks: the files read, the held-out split (per task), and how the
tasks map to deltas (one per task, routed per sample, or one delta serving every task)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import activate, attach, deltas, route
from ..config import config_class, methods
from ..errors import ConfigError, DataError
from ..io import load as load_delta
from ..report import plan
from .data import (
    Example,
    demo_data_path,
    load_examples,
)

from .settings import TrainSettings


def data_files(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def read_files(files: list[str], task_field: str, single_task: str | None = None) -> list[Example]:
    """Examples of every file. A record without a task gets its file's name when there are
    several files, else ``single_task`` (which may be None: no task)."""
    examples = []
    for path in files:
        default = Path(path).stem if len(files) > 1 else single_task
        examples.extend(load_examples(path, task_field=task_field, default_task=default))
    return examples


def hold_out(examples: list[Example], settings: TrainSettings, what: str) -> tuple[list[Example], list[Example]]:
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    held = max(1, int(len(examples) * settings.eval_fraction))
    if held >= len(examples):
        raise DataError(f"{what} has {len(examples)} example(s): too few to hold some out for evaluation")
    return [examples[i] for i in order[held:]], [examples[i] for i in order[:held]]


def split_data(settings: TrainSettings) -> tuple[list[Example], list[Example]]:
    if settings.data is None:
        return load_examples(demo_data_path("train")), load_examples(demo_data_path("test"))
    files = data_files(settings.data)
    # a delta serving every task always conditions on one: one file is one task, named like the file
    named = Path(files[0]).stem if config_class(settings.method).serves_all_tasks else None
    train = read_files(files, settings.task_field, named)
    tasks = task_names(train)
    if settings.eval_data is not None:
        held_out = read_files(data_files(settings.eval_data), settings.task_field, tasks[0] if len(tasks) == 1 else None)
        unknown = sorted(set(task_names(held_out)) - set(tasks))
        if unknown:
            raise DataError(f"the held-out data has tasks {unknown} that the training data has not; training tasks: {tasks}")
        return train, held_out
    if not tasks:
        return hold_out(train, settings, ", ".join(files))
    # every task keeps its own held-out share
    parts = [hold_out([e for e in train if e.task == task], settings, f"task {task!r}") for task in tasks]
    return [e for kept, _ in parts for e in kept], [e for _, held in parts for e in held]


def task_names(examples: list[Example]) -> list[str]:
    """The tasks of a data set in order of appearance; [] when it has none. Mixing examples
    with and without a task is an error naming one of each."""
    tasks = list(dict.fromkeys(e.task for e in examples))
    if None in tasks and len(tasks) > 1:
        with_task = next(e for e in examples if e.task is not None)
        without = next(e for e in examples if e.task is None)
        raise DataError(
            f"{without.source} has no task but {with_task.source} has task {with_task.task!r}: "
            "give every record a task, or none"
        )
    return [t for t in tasks if t is not None]


@dataclass
class TaskDeltas:
    """How the tasks of a run map to deltas: ``shared`` names the one delta serving every task
    (its config has ``serves_all_tasks``), with ``config``; otherwise each task has a delta of
    its own name. No tasks: single-task run."""

    names: list[str]
    shared: str | None = None
    config: Any = None

    def batch(self, model: nn.Module, tasks: list[str | None]):
        """The context a batch with these per-sample tasks runs in."""
        if not self.names:
            return contextlib.nullcontext()
        if self.shared is not None:
            return self.config.task_batch(model, self.shared, tasks)
        return route(model, tasks)

    def select(self, model: nn.Module, task: str) -> None:
        if self.shared is not None:
            self.config.select_task(model, self.shared, task)
        else:
            activate(model, task)

    def select_all(self, model: nn.Module) -> None:
        if self.shared is None:
            activate(model, self.names)


def attach_for_tasks(model: nn.Module, settings: TrainSettings, tasks: list[str], log,
                     delta_config=None) -> tuple[list[str], TaskDeltas]:
    """Attach the run's deltas (or load them, with ``from_delta``); returns the delta names."""
    delta_config = delta_config or settings.delta_config()
    shared = delta_config.serves_all_tasks
    if settings.from_delta is not None:
        return _load_for_tasks(model, settings, tasks, log)
    planned = delta_config.for_tasks(tasks) if shared and tasks else delta_config
    oversized = plan(model, planned).oversized()  # deltas built on the meta device: said before any allocation
    if oversized:
        log(f"warning: {oversized}")
    if not tasks:
        attach(model, delta_config, settings.name)
        return [settings.name], TaskDeltas([])
    if shared:
        attach(model, planned, settings.name)
        return [settings.name], TaskDeltas(tasks, shared=settings.name, config=planned)
    if not delta_config.supports_mixed_batch:
        serving = [m for m in methods() if config_class(m).serves_all_tasks]
        raise ConfigError(
            f"method {delta_config.method!r} cannot run mixed batches, so its {len(tasks)} task deltas "
            f"cannot train together; train one run per task, or use --method {' or '.join(serving)}"
        )
    for task in tasks:
        attach(model, delta_config, task)
    log(f"tasks: {', '.join(tasks)}: one {delta_config.method} delta each, trained together in mixed batches")
    return list(tasks), TaskDeltas(list(tasks))


def _load_for_tasks(model: nn.Module, settings: TrainSettings, tasks: list[str], log) -> tuple[list[str], TaskDeltas]:
    names = load_delta(model, settings.from_delta)
    infos = deltas(model)
    shared = [n for n in names if infos[n].config.serves_all_tasks]
    if shared:
        name, config = shared[0], infos[shared[0]].config
        known = config.known_tasks()
        new = [t for t in tasks if t not in known]
        if new and len(new) != len(tasks):
            raise ConfigError(
                f"--from-delta {settings.from_delta}: the data mixes tasks the delta has {sorted(set(tasks) - set(new))} "
                f"with new ones {new}; new tasks train alone (only their embeddings learn)"
            )
        if new:
            log(f"new tasks {', '.join(new)}: training only {config.add_tasks(model, name, new)}")
        return [name], TaskDeltas(tasks, shared=name if tasks else None, config=config)
    if tasks:
        missing = [t for t in tasks if t not in names]
        if missing:
            raise ConfigError(f"--from-delta {settings.from_delta} has no delta for tasks {missing}; it holds {names}")
        return list(tasks), TaskDeltas(list(tasks))
    if len(names) != 1:
        raise ConfigError(f"--from-delta {settings.from_delta} holds {len(names)} deltas {names}; a single-task run continues one")
    return names, TaskDeltas([])
