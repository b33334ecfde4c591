"""The training loop behind ``deltatune train``: attach a delta, tune it, prove it helped.

Built on accelerate and written for several processes (each takes every n-th batch, only the
main process evaluates, prints and writes files), though multi-process runs are not tested yet.

Nothing is lost: the output directory is checked and held before any work
(:mod:`deltatune.outputs`); Ctrl-C (or SIGTERM) writes a checkpoint of the delta, the
optimizer, the schedule and the step, and in any other phase says what is on disk; the trained
delta is saved before the evaluation after training; ``--resume`` continues from the newest
readable checkpoint with the same data order, and refuses other settings.

Several tasks train in one run when the data names them (several ``--data`` files, one task
each, or a task field in the records): with ``--method hyperformer`` one shared hypernetwork
serves them all (each batch mixes tasks through :func:`deltatune.task_route`); with any other
method each task gets its own delta, named after the task, and each batch routes every sample
to its task's delta (:func:`deltatune.route`). Evaluation is per task. ``--from-delta`` starts
from saved deltas; a hyperformer delta given tasks it does not know learns only their new task
embeddings, everything else frozen.

``--task classify|multilabel|regression|tag`` trains an encoder (or a decoder used as a
classifier) on labelled data instead: the base is loaded as a sequence or token
classification model, the delta gets a task head (:mod:`deltatune.heads`) sized to the
training data's labels, and evaluation reports the task's metrics (:mod:`.labelled`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import pickle
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.memory import peak_memory_bytes, reset_peak_memory
from ..api import activate, after_optimizer_step, attach, calibrate, deltas, route, trainable_parameters
from ..config import check_field_types, config as make_config, config_class, did_you_mean, methods, read_mapping
from ..errors import ConfigError, DataError, Interrupted
from ..heads import TASKS, TaskHead, model_kind
from ..io import load as load_delta
from ..io import save as save_delta
from ..layer import delta_layers
from ..outputs import RunLock, check_output_dir, clear_run, write_atomically, write_text_atomically
from ..quant import check_scheme, prepare_for_kbit_training, quantized_storage
from ..report import plan, summary
from .data import (
    IGNORE_INDEX,
    Example,
    PadCollator,
    batch_indices,
    empty_answers,
    build_prompt,
    demo_data_path,
    load_examples,
    tokenize_examples,
)
from .evaluate import evaluate_loss, exact_match, generate_completions
from .labelled import (
    HEADLINE_METRIC,
    LabelledCollator,
    check_labels,
    describe_label,
    evaluate_task,
    label_set,
    load_labelled,
    majority_share,
    target_scale,
    task_loss,
    tokenize_labelled,
)
from .optim import OptimizerFallbackWarning, check_optimizer, make_optimizer

SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainSettings:
    """Every option of ``deltatune train``; the field names are the CLI flags."""

    model: str | None = None
    task: str | None = None  # classify | multilabel | regression | tag: an encoder task; None: language modelling
    data: str | list[str] | None = None  # several files: one task each (unless records name theirs)
    eval_data: str | list[str] | None = None
    task_field: str = "task"
    text_field: str | None = None  # encoder tasks: the fields holding the text, its pair and its label
    pair_field: str | None = None
    label_field: str | None = None
    from_delta: str | None = None  # start from saved deltas instead of new ones
    eval_fraction: float = 0.1
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    name: str = "default"
    output_dir: str = "runs/deltatune"
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float | None = None  # None: the method's default_lr
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    completion_only: bool = True
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    quantize: str | None = None  # nf4 | fp4 | int8: train on a quantized base (QLoRA with nf4)
    optim: str = "adamw"
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False  # replace an earlier run's results in output_dir
    seed: int = 0
    bf16: bool = False
    max_new_tokens: int = 24
    eval_limit: int | None = None
    samples: int = 3

    def __post_init__(self) -> None:
        check_field_types(self)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "max_length": self.max_length,
                    "max_new_tokens": self.max_new_tokens, "keep_checkpoints": self.keep_checkpoints}
        for name in ("lr", "max_steps", "eval_every", "save_every", "eval_limit"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not valid; allowed: {', '.join(SCHEDULES)}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(f"weight_decay and max_grad_norm must be >= 0, got {self.weight_decay!r} and {self.max_grad_norm!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.quantize is not None:
            check_scheme(self.quantize)
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not valid; allowed: {', '.join(TASKS)}")
        check_optimizer(self.optim)
        # fail now, not after the model has loaded, on a bad method or option
        self.delta_config()

    def delta_config(self):
        return make_config(self.method, **self.method_options)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else config_class(self.method).default_lr

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], /, **overrides: Any) -> "TrainSettings":
        """Settings from a flat mapping (a YAML/JSON file): training fields and method options
        side by side (``lr: 1e-3``, ``r: 16``); ``overrides`` (the CLI flags) win."""
        own = {f.name for f in dataclasses.fields(cls)}
        merged = {**mapping, **{k: v for k, v in overrides.items() if v is not None}}
        method = merged.get("method", cls.method)
        method_fields = set(config_class(method).option_names())
        settings: dict[str, Any] = {}
        options = dict(merged.pop("method_options", None) or {})
        for key, value in merged.items():
            if key in own:
                settings[key] = value
            elif key in method_fields:
                options[key] = value
            else:
                raise ConfigError(
                    f"unknown option {key!r}: not a training setting nor an option of method {method!r}."
                    + did_you_mean(key, sorted(own | method_fields))
                )
        return cls(**settings, method_options=options)

    @classmethod
    def from_file(cls, path: str | Path, /, **overrides: Any) -> "TrainSettings":
        return cls.from_mapping(read_mapping(path), **overrides)


@dataclass
class Evaluation:
    """Held-out results; with several tasks, the means over tasks and each task's own."""

    exact_match: float | None
    loss: float
    samples: list[dict[str, str]]
    per_task: dict[str, dict[str, float | None]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # an encoder task's (accuracy, F1...)


@dataclass
class TrainResult:
    settings: TrainSettings
    before: Evaluation
    after: Evaluation
    steps: int
    train_seconds: float
    total_seconds: float
    tokens_per_second: float
    delta_dir: Path
    summary_line: str
    interrupted: bool = False
    optimizer: str = "adamw"  # the one used (a paged optimizer without CUDA runs unpaged)
    peak_memory_bytes: int = 0  # whole run, loading included (see peak_memory_bytes())
    training_peak_memory_bytes: int = 0  # from the first training step on: weights, activations, optimizer
    train_losses: list[float] = field(default_factory=list)  # each optimizer step's mean loss, this process's steps
    baseline: dict[str, Any] = field(default_factory=dict)  # an encoder task's floor (majority class)


def _files(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _read_files(files: list[str], task_field: str, single_task: str | None = None) -> list[Example]:
    """Examples of every file. A record without a task gets its file's name when there are
    several files, else ``single_task`` (which may be None: no task)."""
    examples = []
    for path in files:
        default = Path(path).stem if len(files) > 1 else single_task
        examples.extend(load_examples(path, task_field=task_field, default_task=default))
    return examples


def _hold_out(examples: list[Example], settings: TrainSettings, what: str) -> tuple[list[Example], list[Example]]:
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    held = max(1, int(len(examples) * settings.eval_fraction))
    if held >= len(examples):
        raise DataError(f"{what} has {len(examples)} example(s): too few to hold some out for evaluation")
    return [examples[i] for i in order[held:]], [examples[i] for i in order[:held]]


def _split_data(settings: TrainSettings) -> tuple[list[Example], list[Example]]:
    if settings.data is None:
        return load_examples(demo_data_path("train")), load_examples(demo_data_path("test"))
    files = _files(settings.data)
    # a delta serving every task always conditions on one: one file is one task, named like the file
    named = Path(files[0]).stem if config_class(settings.method).serves_all_tasks else None
    train = _read_files(files, settings.task_field, named)
    tasks = task_names(train)
    if settings.eval_data is not None:
        held_out = _read_files(_files(settings.eval_data), settings.task_field, tasks[0] if len(tasks) == 1 else None)
        unknown = sorted(set(task_names(held_out)) - set(tasks))
        if unknown:
            raise DataError(f"the held-out data has tasks {unknown} that the training data has not; training tasks: {tasks}")
        return train, held_out
    if not tasks:
        return _hold_out(train, settings, ", ".join(files))
    # every task keeps its own held-out share
    parts = [_hold_out([e for e in train if e.task == task], settings, f"task {task!r}") for task in tasks]
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


def _keeps_logits_subset(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], subset: bool) -> torch.Tensor:
    """Mean cross-entropy over label tokens.

    With ``subset`` the LM head runs only on the columns holding labels (the answer span of
    the batch): on instruction data most tokens are prompt, and a 50k-word head is a large
    share of a small model's compute.
    """
    labels = batch["labels"]
    if subset:
        columns = (labels != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        first = max(int(columns.min()), 1)
        last = int(columns.max())
        keep = torch.arange(first - 1, last, device=labels.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep, use_cache=False).logits
        targets = labels[:, first : last + 1]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1]
        targets = labels[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def evaluate(model, tokenizer, examples: list[Example], features, settings: TrainSettings,
             tasks: "TaskDeltas | None" = None) -> Evaluation:
    """Held-out loss and exact match; with several tasks, each task's with its own delta
    selected, and their means."""
    if tasks is None or not tasks.names:
        return _evaluate_one(model, tokenizer, examples, features, settings)
    per_task = {}
    for task in tasks.names:
        tasks.select(model, task)
        per_task[task] = _evaluate_one(model, tokenizer, [e for e in examples if e.task == task],
                                       [f for f in features if f.get("task") == task], settings)
    tasks.select_all(model)
    scores = [r.exact_match for r in per_task.values()]
    return Evaluation(
        exact_match=None if None in scores else sum(scores) / len(scores),
        loss=sum(r.loss for r in per_task.values()) / len(per_task),
        samples=[{"task": task, **sample} for task, r in per_task.items() for sample in r.samples],
        per_task={task: {"exact_match": r.exact_match, "loss": r.loss} for task, r in per_task.items()},
    )


def _evaluate_one(model, tokenizer, examples: list[Example], features, settings: TrainSettings) -> Evaluation:
    loss = held_out_loss(model, tokenizer, features)
    chosen = examples[: settings.eval_limit] if settings.eval_limit else examples
    score = None
    samples: list[dict[str, str]] = []
    if all(e.completion for e in chosen):
        prompts = [build_prompt(tokenizer, e) for e in chosen]
        predictions = generate_completions(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens)
        score = exact_match(predictions, [e.completion for e in chosen])
        for example, prediction in list(zip(chosen, predictions))[: settings.samples]:
            question = example.prompt[-1]["content"] if example.is_chat else example.prompt
            samples.append({"prompt": question, "reference": example.completion, "prediction": prediction})
    return Evaluation(score, loss, samples)


def micro_batches(lengths: list[int], settings: TrainSettings, rank: int, world: int) -> Iterator[list[int]]:
    """Endless, seeded stream of this process's micro-batches; epoch e uses seed + e."""
    epoch = 0
    while True:
        batches = batch_indices(lengths, settings.batch_size, seed=settings.seed + epoch,
                                group_by_length=settings.group_by_length)
        yield from batches[rank::world]
        epoch += 1


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


class LanguageModeling:
    """What ``deltatune train`` optimises on instruction data: next-token cross-entropy on the
    answers; evaluation by held-out loss and greedy exact match."""

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        self.subset = False
        self.baseline: dict[str, Any] = {}
        self.notes: list[str] = []  # about the data, for the run's log

    @property
    def model_name(self) -> str:
        return self.settings.model or "smollm2-135m-instruct (bundled)"

    def split(self) -> tuple[list[Example], list[Example]]:
        train, held_out = _split_data(self.settings)
        tasks = task_names(train)
        groups = [(f"task {t!r}", [e for e in train if e.task == t]) for t in tasks] or [("the training data", train)]
        self.notes = [note for what, examples in groups if (note := empty_answers(examples, what))]
        return train, held_out

    def delta_config(self, train_examples: list) -> Any:
        return self.settings.delta_config()

    def load(self) -> tuple[nn.Module, Any]:
        from ..models import load_model_and_tokenizer

        return load_model_and_tokenizer(self.settings.model, quantize=self.settings.quantize)

    def attached(self, model: nn.Module, names: list[str]) -> None:
        self.subset = _keeps_logits_subset(model)

    def features(self, tokenizer, examples: list[Example], what: str) -> list[dict]:
        return tokenize_examples(tokenizer, examples, self.settings.max_length, self.settings.completion_only)

    def collator(self, tokenizer) -> Callable:
        return PadCollator(tokenizer.pad_token_id)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(model, batch, self.subset)

    def evaluate(self, model, tokenizer, examples, features, task_deltas: "TaskDeltas") -> Evaluation:
        return evaluate(model, tokenizer, examples, features, self.settings, task_deltas)

    def held_out_loss(self, model, tokenizer, features) -> float:
        return held_out_loss(model, tokenizer, features)


class LabelledTask:
    """What ``deltatune train --task ...`` optimises: the task head's loss on labelled data
    (:mod:`.labelled`); evaluation by the task's metrics. The head's labels come from the
    training data, or from the delta ``--from-delta`` continues."""

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        self.head: TaskHead | None = None
        self.baseline: dict[str, Any] = {}
        self.notes: list[str] = []  # about the data, for the run's log

    @property
    def model_name(self) -> str:
        from ..models import DEFAULT_ENCODER

        return self.settings.model or f"{DEFAULT_ENCODER} (bundled)"

    def _read(self, path: str) -> list:
        s = self.settings
        return load_labelled(path, s.task, text_field=s.text_field, pair_field=s.pair_field, label_field=s.label_field)

    def split(self) -> tuple[list, list]:
        s = self.settings
        if s.data is None:
            return self._read(encoder_data_path(s.task, "train")), self._read(encoder_data_path(s.task, "test"))
        files = _files(s.data)
        if len(files) > 1:
            raise ConfigError(
                f"--task {s.task} trains one task per run, but {len(files)} --data files were given; train one "
                "run per task and load their deltas side by side (deltatune.load), switching or routing them"
            )
        train = self._read(files[0])
        if s.eval_data is None:
            return _hold_out(train, s, files[0])
        return train, [e for path in _files(s.eval_data) for e in self._read(path)]

    def delta_config(self, train_examples: list) -> Any:
        s = self.settings
        config = s.delta_config()
        if s.from_delta is not None:
            from ..io import delta_directories, read_config

            saved = [read_config(d) for d in delta_directories(s.from_delta)]
            heads = [c.task_head for c in saved if c.task_head is not None]
            if not heads:
                raise ConfigError(f"--from-delta {s.from_delta} has no task head; a --task run continues a delta that has one")
            self.head = heads[0]
        elif config.task_head is not None:
            self.head = config.task_head
        else:
            self.head = TaskHead(s.task, labels=label_set(s.task, train_examples),
                                 **(target_scale(train_examples) if s.task == "regression" else {}))
            config = config.replace(task_head=self.head)
        if self.head.task != s.task:
            raise ConfigError(f"the delta's head is for task {self.head.task!r}, not {s.task!r}")
        check_labels(self.head, train_examples, "training data")
        majority = majority_share(self.head, train_examples)
        if majority is not None:
            self.baseline = {"majority_class": majority[0], "majority_train_share": round(majority[1], 4)}
        return config

    def load(self) -> tuple[nn.Module, Any]:
        from ..models import DEFAULT_ENCODER, load_model_and_tokenizer

        s = self.settings
        return load_model_and_tokenizer(s.model or DEFAULT_ENCODER, task=model_kind(s.task), quantize=s.quantize,
                                        num_labels=self.head.num_outputs)

    def attached(self, model: nn.Module, names: list[str]) -> None:
        # the resolved head (its module paths) is the one the delta holds
        self.head = deltas(model)[names[0]].config.task_head

    def features(self, tokenizer, examples: list, what: str) -> list[dict]:
        check_labels(self.head, examples, what)
        return tokenize_labelled(tokenizer, self.head, examples, self.settings.max_length)

    def collator(self, tokenizer) -> Callable:
        return LabelledCollator(tokenizer.pad_token_id, self.head.task)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(model, self.head, batch)

    def evaluate(self, model, tokenizer, examples, features, task_deltas: "TaskDeltas") -> Evaluation:
        s = self.settings
        limit = s.eval_limit or len(features)
        result = evaluate_task(model, self.head, features[:limit], self.collator(tokenizer))
        headline = HEADLINE_METRIC[self.head.task]
        metrics = dict(sorted(result.metrics.items(), key=lambda item: item[0] != headline))
        if "majority_class" in self.baseline:
            held = [e.label for e in examples[:limit]]
            metrics["majority_baseline"] = held.count(self.baseline["majority_class"]) / len(held)
        samples = [
            {"text": " ".join(e.text) if isinstance(e.text, tuple) else e.text + (f" || {e.text_pair}" if e.text_pair else ""),
             "reference": describe_label(self.head, e.label), "prediction": describe_label(self.head, p)}
            for e, p in list(zip(examples, result.predictions))[: s.samples]
        ]
        return Evaluation(exact_match=None, loss=result.loss, samples=samples, metrics=metrics)

    def held_out_loss(self, model, tokenizer, features) -> float:
        return evaluate_task(model, self.head, features, self.collator(tokenizer)).loss


def encoder_data_path(task: str, split: str) -> Path:
    """The bundled labelled data set of an encoder task (``scripts/make_encoder_data.py``)."""
    from importlib import resources

    return Path(str(resources.files("deltatune") / "data" / "encoder" / task / f"{split}.jsonl"))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted((output_dir / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


class Trainer:
    """One training run; ``run()`` does everything and returns a :class:`TrainResult`."""

    def __init__(self, settings: TrainSettings, *, log: Callable[[str], None] = print, progress: bool = True):
        self.settings = settings
        self.log = log
        self.progress = progress
        self.output_dir = Path(settings.output_dir)
        self.phase = "while loading"  # what the run is doing, for the message on interruption
        self.saved = ""  # what an interruption leaves on disk

    def run(self) -> TrainResult:
        """Check the output directory, hold it for this run, train. Ctrl-C or SIGTERM in any
        phase ends the run with a line saying what was saved."""
        from accelerate import Accelerator

        s = self.settings
        accelerator = Accelerator(mixed_precision="bf16" if s.bf16 else "no")
        if not accelerator.is_main_process:
            return self._run(accelerator)
        check_output_dir(self.output_dir, resume=s.resume, overwrite=s.overwrite)
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with RunLock(self.output_dir):
                if s.overwrite and not s.resume:
                    clear_run(self.output_dir)
                return self._run(accelerator)
        except Interrupted:  # the training loop has said which checkpoint it saved
            raise
        except KeyboardInterrupt:
            message = f"interrupted {self.phase}; {self.saved or 'nothing was trained yet, nothing saved'}"
            self.log(f"\n{message}")
            raise Interrupted(message) from None
        finally:
            signal.signal(signal.SIGTERM, previous_handler)

    def _run(self, accelerator) -> TrainResult:
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        s = self.settings
        objective = LabelledTask(s) if s.task is not None else LanguageModeling(s)
        started = time.perf_counter()
        main = accelerator.is_main_process
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        log = self.log if main else (lambda _msg: None)
        set_seed(s.seed)

        train_examples, eval_examples = objective.split()
        for note in objective.notes:
            log(f"warning: {note}")
        tasks = task_names(train_examples)
        delta_config = objective.delta_config(train_examples)
        log(f"loading model {objective.model_name}")
        model, tokenizer = objective.load()
        if s.quantize:
            prepare_for_kbit_training(model, gradient_checkpointing=s.gradient_checkpointing)
            log(f"quantized base: {quantized_storage(model)}")

        names, task_deltas = attach_for_tasks(model, s, tasks, log, delta_config)
        self.names = names
        if main:
            check_output_dir(self.output_dir, resume=True, needed_bytes=_bytes_to_write(model, names, s.keep_checkpoints))
        objective.attached(model, names)
        train_features = objective.features(tokenizer, train_examples, "training data")
        eval_features = objective.features(tokenizer, eval_examples, "held-out data")
        log(f"data: {len(train_features)} training examples, {len(eval_features)} held out")
        if "majority_class" in objective.baseline:
            log(f"majority class {objective.baseline['majority_class']!r}: "
                f"{objective.baseline['majority_train_share']:.1%} of the training data")
        if s.gradient_checkpointing and not s.quantize:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        collate = objective.collator(tokenizer)
        if not (s.resume and latest_checkpoint(Path(s.output_dir))):  # a resumed delta has its structure
            self._calibrate(model, delta_config, train_features, collate, objective.loss)
        log(str(summary(model)))

        params = trainable_parameters(model, names)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OptimizerFallbackWarning)
            optimizer, optimizer_used = make_optimizer(s.optim, params, lr=s.learning_rate,
                                                       weight_decay=s.weight_decay)
        for warning in caught:
            log(f"optimizer: {warning.message}")
        micro_per_epoch = math.ceil(len(train_features) / s.batch_size / accelerator.num_processes)
        steps_per_epoch = max(1, micro_per_epoch // s.grad_accum)
        total_steps = s.max_steps or max(1, math.ceil(s.epochs * steps_per_epoch))
        scheduler = get_scheduler(s.schedule, optimizer, num_warmup_steps=int(s.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        plain_model = accelerator.unwrap_model(model)

        # before the resumed state loads, so that "before" scores what an uninterrupted run's did
        self.phase = "during the evaluation before training"
        before = objective.evaluate(plain_model, tokenizer, eval_examples, eval_features, task_deltas) if main else None
        if main:
            log(_describe("before", before))

        step = 0
        if s.resume:
            step = self._resume(plain_model, optimizer, scheduler)
            log(f"resumed from step {step}")

        stream = micro_batches([len(f["input_ids"]) for f in train_features], s,
                               accelerator.process_index, accelerator.num_processes)
        for _ in range(step * s.grad_accum):
            next(stream)  # same data order as an uninterrupted run

        bar = None
        if main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
        interrupted = False
        self.phase = "training"
        run_peak_memory = peak_memory_bytes(accelerator.device)
        reset_peak_memory(accelerator.device)
        train_started = time.perf_counter()
        tokens_seen = 0
        smoothed = None
        train_losses: list[float] = []
        model.train()
        try:
            while step < total_steps:
                step_loss = 0.0
                for _ in range(s.grad_accum):
                    chosen = [train_features[i] for i in next(stream)]
                    batch = {k: v.to(accelerator.device) for k, v in collate(chosen).items()}
                    with accelerator.autocast(), task_deltas.batch(plain_model, [f.get("task") for f in chosen]):
                        loss = objective.loss(model, batch)
                    accelerator.backward(loss / s.grad_accum)
                    tokens_seen += int(batch["attention_mask"].sum())
                    smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
                    step_loss += loss.item() / s.grad_accum
                if s.max_grad_norm:
                    accelerator.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                train_losses.append(step_loss)
                after_optimizer_step(plain_model, step, total_steps)
                elapsed = time.perf_counter() - train_started
                if bar is not None:
                    bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    tok_s=f"{tokens_seen * accelerator.num_processes / elapsed:.0f}")
                    bar.update(1)
                if main and s.eval_every and step % s.eval_every == 0 and step < total_steps:
                    log(f"step {step}: held-out loss {objective.held_out_loss(plain_model, tokenizer, eval_features):.4f}")
                    model.train()
                if main and s.save_every and step % s.save_every == 0:
                    try:
                        self._checkpoint(plain_model, optimizer, scheduler, step)
                    except (OSError, ConfigError) as exc:  # training goes on; the final save still comes
                        log(f"step {step}: checkpoint not written ({exc}); training continues")
        except KeyboardInterrupt:
            interrupted = True
            if main:
                path = self._checkpoint(plain_model, optimizer, scheduler, step)
                message = f"interrupted at step {step}; saved {path}. Continue with the same command plus --resume"
                log(f"\n{message}")
                raise Interrupted(message) from None
            raise
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - train_started
        training_peak_memory = peak_memory_bytes(accelerator.device)
        self.phase = "while saving the trained delta"

        accelerator.wait_for_everyone()
        delta_dir = self.output_dir / "delta"
        if main:
            # the trained delta exists from here on: whatever happens next, it is saved first
            delta_dir = self._save_final(plain_model, delta_dir)
            self.saved = f"the trained delta is saved in {delta_dir}"
            tokenizer.save_pretrained(self.output_dir / "tokenizer")
        self.phase = "during the evaluation after training"
        after = objective.evaluate(plain_model, tokenizer, eval_examples, eval_features, task_deltas) if main else None
        if main:
            log(_describe("after", after))
        result = TrainResult(
            settings=s, before=before, after=after, steps=step, train_seconds=train_seconds,
            total_seconds=time.perf_counter() - started,
            tokens_per_second=tokens_seen * accelerator.num_processes / max(train_seconds, 1e-9),
            delta_dir=delta_dir, summary_line=summary(plain_model).headline(), interrupted=interrupted,
            optimizer=optimizer_used, training_peak_memory_bytes=training_peak_memory, train_losses=train_losses,
            peak_memory_bytes=max(run_peak_memory, peak_memory_bytes(accelerator.device)),
            baseline=objective.baseline,
        )
        if main:
            self._write_summary(result)
        return result

    def _calibrate(self, model, delta_config, features, collate, loss_fn) -> None:
        """Deltas that choose their structure from data (FAR, gradient-pruned SparseAdapter)
        see the first few training batches before the optimizer is built."""
        count = delta_config.calibration_batches
        if not count:
            return
        s = self.settings
        device = next(model.parameters()).device
        batches = (
            {k: v.to(device) for k, v in collate([features[i] for i in range(start, min(start + s.batch_size, len(features)))]).items()}
            for start in range(0, min(count * s.batch_size, len(features)), s.batch_size)
        )
        done = calibrate(model, batches, loss_fn=loss_fn, names=self.names)
        if done:
            self.log(f"calibrated {done} modules on {count} batches")

    def _save_final(self, model, delta_dir: Path) -> Path:
        """Save the trained delta; if the output directory fails (full, gone read-only), save it
        in a fresh temporary directory instead and say where, then report the failure."""
        try:
            try:
                save_delta(model, delta_dir, self.names)
            except KeyboardInterrupt:  # the save is what keeps the training: finish it, then stop
                self.log("\ninterrupted while saving the trained delta; finishing the save first "
                         "(interrupt again to abandon it)")
                save_delta(model, delta_dir, self.names)
                message = f"interrupted after training; the trained delta is saved in {delta_dir}"
                self.log(message)
                raise Interrupted(message) from None
            return delta_dir
        except (OSError, ConfigError) as exc:
            rescue = Path(tempfile.mkdtemp(prefix="deltatune-rescued-")) / "delta"
            save_delta(model, rescue, self.names)
            raise ConfigError(f"could not save the delta in {delta_dir} ({exc}); it is safe in {rescue}") from None

    def _checkpoint(self, model, optimizer, scheduler, step: int) -> Path:
        """Write a checkpoint atomically (temp dir, then rename); keep the newest few."""
        root = self.output_dir / CHECKPOINTS
        target = root / f"step-{step:06d}"
        staging = root / f".tmp-step-{step:06d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_delta(model, staging / "delta", self.names)
        # the delta directory holds the inference form (folded prompt encoders); resuming needs
        # the training form, whose parameters the optimizer state belongs to
        training_form = {
            name: {path: layer.deltas[name].state_dict() for path, layer in delta_layers(model).items() if name in layer.deltas}
            for name in self.names
        }
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "delta": training_form,
                 "settings": json.dumps(_resumed_settings(self.settings))}
        write_atomically(staging / STATE_FILE, lambda temporary: torch.save(state, temporary))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        # the one just written always stays, whatever other runs left in the directory
        older = [p for p in sorted(root.glob("step-*")) if p != target]
        for old in older[: max(0, len(older) - (self.settings.keep_checkpoints - 1))]:
            shutil.rmtree(old)
        self.saved = f"checkpoint {target} holds step {step}"
        return target

    def _readable_checkpoint(self) -> tuple[Path, dict]:
        """The newest checkpoint whose state reads back whole; damaged newer ones are named and skipped."""
        found = sorted((self.output_dir / CHECKPOINTS).glob("step-*"), reverse=True)
        if not found:
            raise ConfigError(f"--resume: no checkpoint under {self.output_dir / CHECKPOINTS}")
        for checkpoint in found:
            try:
                state = torch.load(checkpoint / STATE_FILE, weights_only=True)
                if all(key in state for key in ("step", "optimizer", "scheduler", "torch_rng", "delta")):
                    return checkpoint, state
                problem = "an incomplete state"
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
                problem = " ".join(str(exc).split())[:120]
            self.log(f"--resume: skipping {checkpoint.name}, which cannot be read ({problem})")
        raise ConfigError(f"--resume: none of the checkpoints under {self.output_dir / CHECKPOINTS} can be read")

    def _resume(self, model, optimizer, scheduler) -> int:
        checkpoint, state = self._readable_checkpoint()
        if "settings" in state:
            saved, now = json.loads(state["settings"]), _resumed_settings(self.settings)
            changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
            if changed:
                raise ConfigError(
                    f"--resume: {checkpoint} was trained with other settings ({'; '.join(changed)}); "
                    "resume with the same ones, or start a new run in another directory (or with --overwrite)"
                )
        layers = delta_layers(model)
        if set(state["delta"]) != set(self.names):
            raise ConfigError(f"--resume: {checkpoint} holds deltas {sorted(state['delta'])}, this run has {self.names}")
        for name, per_path in state["delta"].items():
            if set(per_path) != {p for p, layer in layers.items() if name in layer.deltas}:
                raise ConfigError(f"--resume: {checkpoint} adapts other modules than this run's delta {name!r}")
            for path, tensors in per_path.items():
                layers[path].deltas[name].load_state_dict(tensors)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])

    def _write_summary(self, result: TrainResult) -> None:
        data = {
            "settings": dataclasses.asdict(result.settings),
            "before": dataclasses.asdict(result.before),
            "after": dataclasses.asdict(result.after),
            "steps": result.steps,
            "train_seconds": round(result.train_seconds, 2),
            "total_seconds": round(result.total_seconds, 2),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "optimizer": result.optimizer,
            "peak_memory_mib": round(result.peak_memory_bytes / 2**20, 1),
            "training_peak_memory_mib": round(result.training_peak_memory_bytes / 2**20, 1),
            "train_losses": [round(loss, 5) for loss in result.train_losses],
            **({"baseline": result.baseline} if result.baseline else {}),
            "parameters": result.summary_line,
            "delta": str(result.delta_dir),
        }
        write_text_atomically(self.output_dir / "summary.json", json.dumps(data, indent=2) + "\n")


def held_out_loss(model, tokenizer, features) -> float:
    """Mean loss per label token over tokenised held-out examples, in batches of 16."""
    collate = PadCollator(tokenizer.pad_token_id)
    return evaluate_loss(model, [collate(features[i : i + 16]) for i in range(0, len(features), 16)])


def _describe(when: str, evaluation: Evaluation) -> str:
    if evaluation.metrics:
        scores = ", ".join(f"{name} {value:.3f}" for name, value in evaluation.metrics.items())
        return f"{when} training: held-out {scores}; loss {evaluation.loss:.4f}"
    score = "n/a" if evaluation.exact_match is None else f"{evaluation.exact_match:.3f}"
    return f"{when} training: held-out exact match {score}, loss {evaluation.loss:.4f}"


#: settings a resumed run may change: how long it goes on, how often it evaluates and saves
_MAY_CHANGE_ON_RESUME = frozenset({
    "epochs", "max_steps", "eval_every", "save_every", "keep_checkpoints", "resume", "overwrite",
    "output_dir", "eval_limit", "max_new_tokens", "samples",
})


def _resumed_settings(settings: TrainSettings) -> dict[str, Any]:
    """The settings a checkpoint must be resumed with, as JSON values."""
    values = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    return {k: v for k, v in values.items() if k not in _MAY_CHANGE_ON_RESUME}


def _bytes_to_write(model: nn.Module, names: list[str], checkpoints: int) -> int:
    """About what the run writes: the delta, and per checkpoint the delta again plus the
    optimizer's two fp32 moments of every trainable value."""
    params = trainable_parameters(model, names)
    values = sum(p.numel() for p in params)
    delta = sum(p.numel() * p.element_size() for p in params)
    return delta + checkpoints * (2 * delta + 8 * values)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
