"""What a run optimises and how it is scored: language modelling on instruction data
(loss on the answers, exact match), a labelled task through a task head (the task's metrics),
or preferences between two answers (``--objective dpo|orpo|simpo``: reward accuracy and margin).

Every objective offers the trainer the same few methods (``split``, ``delta_config``, ``load``,
``attached``, ``features``, ``tokens``, ``collator``, ``choose_layout``, ``loss``, ``evaluate``,
``held_out_loss``), so checkpoints, resuming, Ctrl-C, quantized bases and multi-task routing
work alike for all; :func:`objective_for` picks the run's."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..api import deltas
from ..errors import ConfigError
from ..heads import TaskHead, model_kind
from ..layer import delta_layers
from .data import (
    IGNORE_INDEX,
    Example,
    PadCollator,
    empty_answers,
    build_prompt,
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

from .packing import PackedCollator, packed_model_inputs, packing_blocker, shared_prefix_length
from .preference import (
    PairCollator,
    PreferenceLoss,
    add_reference_logps,
    evaluate_pairs,
    load_pairs,
    preference_loss,
    tokenize_pairs,
)
from .settings import TrainSettings
from .tasks import TaskDeltas, data_files, hold_out, split_data, task_names


@dataclass
class Evaluation:
    """Held-out results; with several tasks, the means over tasks and each task's own."""

    exact_match: float | None
    loss: float
    samples: list[dict[str, str]]
    per_task: dict[str, dict[str, float | None]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # an encoder task's (accuracy, F1...)


def _keeps_logits_subset(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def symmetric_kl(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """½ (KL(p₁ ‖ p₂) + KL(p₂ ‖ p₁)) between the softmax distributions of two logit tensors of one
    shape, averaged over every position (every leading index); in fp32."""
    p = F.log_softmax(first.float().flatten(0, -2), dim=-1)
    q = F.log_softmax(second.float().flatten(0, -2), dim=-1)
    return 0.5 * (F.kl_div(q, p, log_target=True, reduction="batchmean")   # KL(p ‖ q)
                  + F.kl_div(p, q, log_target=True, reduction="batchmean"))  # KL(q ‖ p)


def two_pass_loss(objective: Any, model: nn.Module, plain_model: nn.Module, batch: Mapping[str, torch.Tensor],
                  weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For deltas with a ``consistency_weight`` (AdaMix): the batch's loss from two forward passes,
    whose random choices differ, as (the mean of the two losses, ``weight`` · the symmetric KL
    divergence between the two passes' predictions). ``plain_model`` is ``model`` without a
    distributed wrapper; its output logits are read by a forward hook."""
    logits: list[torch.Tensor] = []

    def record(module, args, output):
        logits.append(output.logits if hasattr(output, "logits") else output[0])

    hook = plain_model.register_forward_hook(record)
    try:
        losses = [objective.loss(model, batch) for _ in range(2)]
    finally:
        hook.remove()
    return (losses[0] + losses[1]) / 2, weight * symmetric_kl(logits[0], logits[1])


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], subset: bool) -> torch.Tensor:
    """Mean cross-entropy over label tokens.

    With ``subset`` the LM head runs only on the columns holding labels (the answer span of
    the batch): on instruction data most tokens are prompt, and a 50k-word head is a large
    share of a small model's compute. A packed batch (:mod:`.packing`) runs the head on exactly
    the positions that predict a label.
    """
    labels = batch["labels"]
    if "segment_ids" in batch:
        predicted = (labels != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        inputs = packed_model_inputs(model, batch)
        if subset:
            logits = model(**inputs, logits_to_keep=predicted - 1, use_cache=False).logits
        else:
            logits = model(**inputs, use_cache=False).logits.index_select(1, predicted - 1)
        targets = labels.index_select(1, predicted)
    elif subset:
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
    """Held-out loss and exact match (of every answer trained: with ``train_on`` other than
    ``last``, each assistant turn of a conversation is generated after the reference turns
    before it); with several tasks, each task's with its own delta selected, and their means."""
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
    if settings.train_on != "last":  # every answer trained is scored: one prompt per turn, the reference history before it
        examples = [turn for example in examples for turn in example.turns()]
    chosen = examples[: settings.eval_limit] if settings.eval_limit else examples
    score = None
    samples: list[dict[str, str]] = []
    if chosen and all(e.completion for e in chosen):
        prompts = [build_prompt(tokenizer, e) for e in chosen]
        predictions = generate_completions(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens)
        score = exact_match(predictions, [e.completion for e in chosen])
        for example, prediction in list(zip(chosen, predictions))[: settings.samples]:
            question = example.prompt[-1]["content"] if example.is_chat else example.prompt
            samples.append({"prompt": question, "reference": example.completion, "prediction": prediction})
    return Evaluation(score, loss, samples)


def held_out_loss(model, tokenizer, features) -> float:
    """Mean loss per label token over tokenised held-out examples, in batches of 16."""
    collate = PadCollator(tokenizer.pad_token_id)
    return evaluate_loss(model, [collate(features[i : i + 16]) for i in range(0, len(features), 16)])


class LanguageModeling:
    """What ``deltatune train`` optimises on instruction data: next-token cross-entropy on the
    answers; evaluation by held-out loss and greedy exact match."""

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        self.subset = False
        self.baseline: dict[str, Any] = {}
        self.notes: list[str] = []  # about the data, for the run's log
        self.packed: PackedCollator | None = None  # the training batches' layout, when packed
        self.packing_note = ""

    @property
    def model_name(self) -> str:
        return self.settings.model or "smollm2-135m-instruct (bundled)"

    def split(self) -> tuple[list[Example], list[Example]]:
        train, held_out = split_data(self.settings)
        tasks = task_names(train)
        groups = [(f"task {t!r}", [e for e in train if e.task == t]) for t in tasks] or [("the training data", train)]
        self.notes = [note for what, examples in groups if (note := empty_answers(examples, what))]
        return train, held_out

    def delta_config(self, train_examples: list) -> Any:
        return self.settings.delta_config()

    def load(self, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
        from ..models import load_model_and_tokenizer

        return load_model_and_tokenizer(self.settings.model, dtype=dtype, quantize=self.settings.quantize)

    def attached(self, model: nn.Module, names: list[str]) -> None:
        self.subset = _keeps_logits_subset(model)

    def features(self, tokenizer, examples: list[Example], what: str) -> list[dict]:
        return tokenize_examples(tokenizer, examples, self.settings.max_length, self.settings.train_on)

    def tokens(self, feature: dict) -> int:
        """The tokens a feature feeds the model (for the run's tokens per second)."""
        return len(feature["input_ids"])

    def collator(self, tokenizer) -> Callable:
        return self.packed or PadCollator(tokenizer.pad_token_id)

    def choose_layout(self, model: nn.Module, tokenizer, features: list[dict], tasks: TaskDeltas,
                      device: torch.device) -> str:
        """Pack the training batches (:mod:`.packing`) unless the settings, the deltas or the model
        rule it out; returns the line saying which, for the run's log."""
        packed = PackedCollator(tokenizer.pad_token_id, budget=self.settings.max_length)
        blocker = self._packing_blocker(model, tokenizer, features, tasks, packed, device)
        if blocker is None:
            self.packed = packed
            prefix = shared_prefix_length(features[: self.settings.batch_size])
            self.packing_note = "packed" + (f", a shared prompt prefix of {prefix} tokens computed once per row"
                                            if prefix else "")
        else:
            self.packing_note = f"padded ({blocker})"
        return self.packing_note

    def _packing_blocker(self, model, tokenizer, features, tasks, packed, device) -> str | None:
        if not self.settings.packing:
            return "--no-packing"
        if tasks.names:
            return "several tasks: each sample is routed to its task's delta by batch row"
        configs = deltas(model)
        calling = sorted({f"{configs[name].config.method} {delta.unpacked_because}"
                          for layer in delta_layers(model).values()
                          for name, delta in layer.deltas.items() if delta.acts_on == "call"})
        if calling:
            return "; ".join(calling)
        return packing_blocker(model, features, packed, tokenizer.pad_token_id, self.loss, device)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(model, batch, self.subset)

    def loss_terms(self, batch: Mapping[str, torch.Tensor]) -> int:
        """How many values the batch's mean loss averages: its predicted label tokens (a row's
        first token is predicted by nothing)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

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
        self.packing_note = ""  # labelled batches are padded: a task head reads whole sequences

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
        files = data_files(s.data)
        if len(files) > 1:
            raise ConfigError(
                f"--task {s.task} trains one task per run, but {len(files)} --data files were given; train one "
                "run per task and load their deltas side by side (deltatune.load), switching or routing them"
            )
        train = self._read(files[0])
        if s.eval_data is None:
            return hold_out(train, s, files[0])
        return train, [e for path in data_files(s.eval_data) for e in self._read(path)]

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

    def load(self, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
        from ..models import DEFAULT_ENCODER, load_model_and_tokenizer

        s = self.settings
        return load_model_and_tokenizer(s.model or DEFAULT_ENCODER, dtype=dtype, task=model_kind(s.task),
                                        quantize=s.quantize, num_labels=self.head.num_outputs)

    def attached(self, model: nn.Module, names: list[str]) -> None:
        # the resolved head (its module paths) is the one the delta holds
        self.head = deltas(model)[names[0]].config.task_head

    def features(self, tokenizer, examples: list, what: str) -> list[dict]:
        check_labels(self.head, examples, what)
        return tokenize_labelled(tokenizer, self.head, examples, self.settings.max_length)

    def tokens(self, feature: dict) -> int:
        return len(feature["input_ids"])

    def collator(self, tokenizer) -> Callable:
        return LabelledCollator(tokenizer.pad_token_id, self.head.task)

    def choose_layout(self, model, tokenizer, features, tasks, device) -> str:
        return ""

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(model, self.head, batch)

    def loss_terms(self, batch: Mapping[str, torch.Tensor]) -> int:
        """How many values the batch's mean loss averages: its tagged tokens (tag), else its
        examples (multilabel and regression average over outputs too, the same number per example)."""
        targets = batch["target"]
        return int((targets != IGNORE_INDEX).sum()) if self.head.task == "tag" else targets.shape[0]

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


class PreferenceTuning(LanguageModeling):
    """What ``deltatune train --objective dpo|orpo|simpo`` optimises: the preference loss of
    :mod:`.preference` on pairs of answers, the reference log-probs (DPO) from the base with its
    deltas off, computed once when the pairs are tokenised; evaluation by held-out reward
    accuracy, reward margin, loss, and the exact match of greedy answers with the chosen ones."""

    def __init__(self, settings: TrainSettings):
        super().__init__(settings)
        self.preference = PreferenceLoss.of(settings.objective, settings.beta, settings.odds_ratio_weight,
                                            settings.reward_margin, settings.chosen_nll_weight)
        self.model: nn.Module | None = None
        self.packing_note = "padded (preference pairs: each answer's log-probability is summed over its own row)"

    def split(self) -> tuple[list, list]:
        s = self.settings
        if s.data is None:
            return load_pairs(preference_data_path("train")), load_pairs(preference_data_path("test"))
        files = data_files(s.data)
        train = [p for path in files for p in load_pairs(path, task_field=s.task_field,
                                                         default_task=Path(path).stem if len(files) > 1 else None)]
        tasks = task_names(train)
        if s.eval_data is not None:
            held = [p for path in data_files(s.eval_data)
                    for p in load_pairs(path, task_field=s.task_field, default_task=tasks[0] if len(tasks) == 1 else None)]
            return train, held
        if not tasks:
            return hold_out(train, s, ", ".join(files))
        parts = [hold_out([p for p in train if p.task == task], s, f"task {task!r}") for task in tasks]
        return [p for kept, _ in parts for p in kept], [p for _, held in parts for p in held]

    def attached(self, model: nn.Module, names: list[str]) -> None:
        super().attached(model, names)
        self.model = model

    def features(self, tokenizer, pairs: list, what: str) -> list[dict]:
        features = tokenize_pairs(tokenizer, pairs, self.settings.max_length)
        if self.preference.needs_reference:
            add_reference_logps(self.model, features, self.collator(tokenizer), self.subset)
        return features

    def tokens(self, feature: dict) -> int:
        return len(feature["input_ids"]) + len(feature["rejected_input_ids"])

    def collator(self, tokenizer) -> Callable:
        return PairCollator(tokenizer.pad_token_id)

    def choose_layout(self, model, tokenizer, features, tasks, device) -> str:
        return self.packing_note

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return preference_loss(model, batch, self.preference, self.subset)[0].mean()

    def loss_terms(self, batch: Mapping[str, torch.Tensor]) -> int:
        """How many values the batch's mean loss averages: its pairs."""
        return batch["input_ids"].shape[0]

    def evaluate(self, model, tokenizer, pairs, features, task_deltas: "TaskDeltas") -> Evaluation:
        if not task_deltas.names:
            return self._evaluate_one(model, tokenizer, pairs, features)
        per_task = {}
        for task in task_deltas.names:
            task_deltas.select(model, task)
            per_task[task] = self._evaluate_one(model, tokenizer, [p for p in pairs if p.task == task],
                                                [f for f in features if f.get("task") == task])
        task_deltas.select_all(model)
        metrics = {name: sum(r.metrics[name] for r in per_task.values()) / len(per_task)
                   for name in next(iter(per_task.values())).metrics}
        return Evaluation(exact_match=None, loss=sum(r.loss for r in per_task.values()) / len(per_task),
                          samples=[{"task": t, **sample} for t, r in per_task.items() for sample in r.samples],
                          per_task={t: {"exact_match": r.metrics.get("exact_match_with_chosen"), "loss": r.loss}
                                    for t, r in per_task.items()},
                          metrics=metrics)

    def _evaluate_one(self, model, tokenizer, pairs, features) -> Evaluation:
        s = self.settings
        metrics, loss, samples = evaluate_pairs(model, tokenizer, pairs, features, self.preference,
                                                self.collator(tokenizer), self.subset, max_new_tokens=s.max_new_tokens,
                                                eval_limit=s.eval_limit, samples=s.samples)
        return Evaluation(exact_match=None, loss=loss, samples=samples, metrics=metrics)

    def held_out_loss(self, model, tokenizer, features) -> float:
        collate = self.collator(tokenizer)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = [preference_loss(model, {k: v.to(device) for k, v in collate(features[i : i + 16]).items()},
                                          self.preference, self.subset)[0] for i in range(0, len(features), 16)]
        finally:
            model.train(was_training)
        return float(torch.cat(losses).mean())


def objective_for(settings: TrainSettings):
    """The objective of a run: a task head's (``--task``), preferences (``--objective dpo|orpo|simpo``)
    or language modelling."""
    if settings.task is not None:
        return LabelledTask(settings)
    if settings.objective != "sft":
        return PreferenceTuning(settings)
    return LanguageModeling(settings)


def preference_data_path(split: str) -> Path:
    """The bundled preference pairs (``scripts/make_preference_data.py``)."""
    from importlib import resources

    return Path(str(resources.files("deltatune") / "data" / "preference" / f"{split}.jsonl"))


def encoder_data_path(task: str, split: str) -> Path:
    """The bundled labelled data set of an encoder task (``scripts/make_encoder_data.py``)."""
    from importlib import resources

    return Path(str(resources.files("deltatune") / "data" / "encoder" / task / f"{split}.jsonl"))


def describe(when: str, evaluation: Evaluation) -> str:
    if evaluation.metrics:
        scores = ", ".join(f"{name} {value:.3f}" for name, value in evaluation.metrics.items())
        return f"{when} training: held-out {scores}; loss {evaluation.loss:.4f}"
    score = "n/a" if evaluation.exact_match is None else f"{evaluation.exact_match:.3f}"
    return f"{when} training: held-out exact match {score}, loss {evaluation.loss:.4f}"
