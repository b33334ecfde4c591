"""Labelled data for encoder tasks: read, find the label set, tokenise, batch, evaluate.

The files are those of :mod:`deltatune.train.data` (JSONL, JSON, CSV, Parquet); each record
holds a text (and optionally a second text, for pairs as in NLI or similarity) and a label:

==============  =====================================  ========================================
task            fields (defaults)                       label
==============  =====================================  ========================================
``classify``    ``text`` [, ``text_pair``], ``label``   a class name (or number)
``multilabel``  ``text`` [, ``text_pair``], ``labels``  a list of names, or one string with
                                                        ``,`` / ``;`` / ``|`` between them
``regression``  ``text`` [, ``text_pair``], ``score``   a number
``tag``         ``tokens``, ``tags``                    one tag per word (lists, or strings
                                                        split at whitespace)
==============  =====================================  ========================================

The label set comes from the training data (numerically sorted when every class is a number;
``O`` first among tags). A word split into several pieces is labelled at its first piece;
its other pieces, special tokens and padding get -100 and count neither in the loss nor in the
metrics, which are computed per word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import DataError
from ..heads import IGNORE_INDEX, TaskHead
from .data import read_located_records
from .metrics import task_metrics

#: label fields tried, in order, when none is given
LABEL_FIELDS = {
    "classify": ("label",),
    "multilabel": ("labels", "label"),
    "regression": ("score", "label"),
    "tag": ("tags", "labels", "ner_tags"),
}
#: the metric a run's before/after line leads with
HEADLINE_METRIC = {"classify": "accuracy", "multilabel": "micro_f1", "regression": "pearson", "tag": "span_f1"}
_LABEL_SEPARATORS = re.compile(r"[,;|]")


@dataclass(frozen=True)
class LabelledExample:
    """One record: ``text`` (a list of words for tagging), an optional ``text_pair`` and its
    ``label`` (a name, a tuple of names, a float, or a tuple of tags). ``source`` says where it
    came from (``"train.jsonl line 17"``) for messages; ``task`` is always None (one task per
    run, so the multi-task machinery of the trainer sees a single-task data set)."""

    text: str | tuple[str, ...]
    label: Any
    text_pair: str | None = None
    source: str = ""
    task: None = None


def load_labelled(path: str | Path, task: str, *, text_field: str | None = None,
                  pair_field: str | None = None, label_field: str | None = None) -> list[LabelledExample]:
    """Read a labelled data file for ``task``; field names default as the module says."""
    path = Path(path)
    located = read_located_records(path)
    first_location, first = located[0]
    text_field = text_field or ("tokens" if task == "tag" else "text")
    label_field = label_field or next((f for f in LABEL_FIELDS[task] if f in first), LABEL_FIELDS[task][0])
    if pair_field is None and task != "tag" and "text_pair" in first:
        pair_field = "text_pair"
    for name in (text_field, label_field, pair_field):
        if name is not None and name not in first:
            raise DataError(
                f"{path.name} {first_location}: no field {name!r} for a {task} task; its fields are "
                f"{sorted(first)} (choose them with --text-field / --pair-field / --label-field)"
            )
    examples = []
    for location, record in located:
        where = f"{path.name} {location}"
        missing = [n for n in (text_field, label_field, pair_field) if n is not None and record.get(n) is None]
        if missing:
            raise DataError(f"{where}: field {missing[0]!r} is missing or empty")
        text, label = record[text_field], record[label_field]
        if task == "tag":
            words, tags = _words(text, where, text_field), _words(label, where, label_field)
            if len(words) != len(tags):
                raise DataError(f"{where}: {len(words)} words but {len(tags)} tags; give one tag per word")
            examples.append(LabelledExample(words, tags, source=where))
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} must be text, got {type(text).__name__}")
        pair = record[pair_field] if pair_field else None
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"{where}: field {pair_field!r} must be text, got {type(pair).__name__}")
        examples.append(LabelledExample(text, _label(task, label, where, label_field), pair, where))
    return examples


def _words(value: Any, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise DataError(f"{where}: field {field!r} must be a list of strings or a whitespace-separated string")


def _label(task: str, value: Any, where: str, field: str) -> Any:
    if task == "regression":
        if isinstance(value, bool):
            raise DataError(f"{where}: field {field!r} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: field {field!r} must be a number, got {value!r}") from None
    if task == "multilabel":
        names = _LABEL_SEPARATORS.split(value) if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)):
            raise DataError(f"{where}: field {field!r} must be a list of label names, got {value!r}")
        return tuple(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
    if isinstance(value, (list, dict)):
        raise DataError(f"{where}: field {field!r} must be one class, got {value!r} (a list is a multilabel task)")
    return str(value)


def label_set(task: str, examples: Sequence[LabelledExample]) -> tuple[str, ...]:
    """The labels a head for ``examples`` predicts, in a stable order."""
    if task == "regression":
        return ()
    if task == "classify":
        found = {e.label for e in examples}
    else:
        found = {name for e in examples for name in e.label}
    numeric = all(re.fullmatch(r"-?\d+(\.\d+)?", name) for name in found)
    ordered = sorted(found, key=float) if numeric else sorted(found)
    if task == "tag" and "O" in found:
        ordered = ["O"] + [t for t in ordered if t != "O"]
    return tuple(ordered)


def target_scale(examples: Sequence[LabelledExample]) -> dict[str, float]:
    """Mean and standard deviation of the regression scores (σ = 1 when they are all equal)."""
    scores = torch.tensor([e.label for e in examples], dtype=torch.float64)
    std = scores.std(unbiased=False).item() if len(scores) > 1 else 0.0
    return {"target_mean": round(scores.mean().item(), 6), "target_std": round(std, 6) or 1.0}


def check_labels(head: TaskHead, examples: Sequence[LabelledExample], what: str) -> None:
    """Every label of ``examples`` must be one the head predicts."""
    known = set(head.labels)
    for example in examples:
        names = [] if head.task == "regression" else [example.label] if head.task == "classify" else example.label
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(
                f"{example.source}: label {unknown[0]!r} of the {what} is not among the head's labels {list(head.labels)}"
            )


def tokenize_labelled(tokenizer: Any, head: TaskHead, examples: Sequence[LabelledExample],
                      max_length: int) -> list[dict[str, Any]]:
    """Token ids, mask (and segment ids) per example, and its ``target`` in the head's terms."""
    index = {name: i for i, name in enumerate(head.labels)}
    features = []
    for example in examples:
        if head.task == "tag":
            if not getattr(tokenizer, "is_fast", False):
                raise DataError("tagging needs a fast tokenizer (one with word_ids()) to align tags with words")
            encoded = tokenizer(list(example.text), is_split_into_words=True, truncation=True, max_length=max_length)
            target, previous = [], None
            for word in encoded.word_ids():
                first_piece = word is not None and word != previous
                target.append(index[example.label[word]] if first_piece else IGNORE_INDEX)
                previous = word
        else:
            encoded = tokenizer(example.text, example.text_pair, truncation=True, max_length=max_length)
            if head.task == "classify":
                target = index[example.label]
            elif head.task == "multilabel":
                target = [0.0] * len(head.labels)
                for name in example.label:
                    target[index[name]] = 1.0
            else:
                target = [example.label]
        feature = {key: list(encoded[key]) for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
        feature["target"] = target
        features.append(feature)
    return features


@dataclass(frozen=True)
class LabelledCollator:
    """Right-pad a batch; targets become a tensor of the task's kind (tags padded with -100)."""

    pad_token_id: int
    task: str

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        batch = {
            key: torch.tensor([f[key] + [pad] * (length - len(f[key])) for f in features], dtype=torch.long)
            for key, pad in fill.items() if key in features[0]
        }
        targets = [f["target"] for f in features]
        if self.task == "tag":
            batch["target"] = torch.tensor([t + [IGNORE_INDEX] * (length - len(t)) for t in targets], dtype=torch.long)
        elif self.task == "classify":
            batch["target"] = torch.tensor(targets, dtype=torch.long)
        else:
            batch["target"] = torch.tensor(targets, dtype=torch.float32)
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "target"}


def task_loss(model, head: TaskHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return head.loss(model(**model_inputs(batch)).logits, batch["target"])


@dataclass
class TaskEvaluation:
    """Held-out loss, the task's metrics and each example's prediction (as label names)."""

    loss: float
    metrics: dict[str, float]
    predictions: list[Any]


def evaluate_task(model, head: TaskHead, features: list[dict[str, Any]], collate: LabelledCollator,
                  batch_size: int = 32) -> TaskEvaluation:
    """Run the held-out set once in eval mode: mean loss (per example, per word for tags),
    the task's metrics and the decoded predictions."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    predicted: list[Any] = []
    referenced: list[Any] = []
    try:
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size]).items()}
                logits = model(**model_inputs(batch)).logits
                weight = int((batch["target"] != IGNORE_INDEX).sum()) if head.task == "tag" else len(batch["target"])
                total += head.loss(logits, batch["target"]).item() * weight
                count += weight
                predictions = head.predict(logits).cpu()
                targets = batch["target"].cpu()
                if head.task == "tag":
                    for row_pred, row_true in zip(predictions, targets):
                        words = row_true != IGNORE_INDEX
                        predicted.append([head.labels[i] for i in row_pred[words].tolist()])
                        referenced.append([head.labels[i] for i in row_true[words].tolist()])
                elif head.task == "classify":
                    predicted.extend(head.labels[i] for i in predictions.tolist())
                    referenced.extend(head.labels[i] for i in targets.tolist())
                elif head.task == "multilabel":
                    predicted.extend(predictions.tolist())
                    referenced.extend(targets.long().tolist())
                else:
                    predicted.extend(predictions[:, 0].tolist())
                    referenced.extend(targets[:, 0].tolist())
    finally:
        model.train(was_training)
    if head.task == "multilabel":
        metrics = task_metrics("multilabel", torch.tensor(predicted), torch.tensor(referenced))
        predicted = [[n for n, on in zip(head.labels, row) if on] for row in predicted]
    else:
        metrics = task_metrics(head.task, predicted, referenced, labels=head.labels or None)
    return TaskEvaluation(total / max(count, 1), metrics, predicted)


def describe_label(head: TaskHead, value: Any) -> str:
    """A label or prediction as one short string."""
    if head.task == "regression":
        return f"{float(value):.2f}"
    if isinstance(value, (list, tuple)):
        return " ".join(value) if head.task == "tag" else ", ".join(value) or "(none)"
    return str(value)


def majority_share(head: TaskHead, examples: Sequence[LabelledExample]) -> tuple[str, float] | None:
    """The most frequent class and its share (classification only): the floor to beat."""
    if head.task != "classify" or not examples:
        return None
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.label] = counts.get(example.label, 0) + 1
    label = max(counts, key=counts.get)
    return label, counts[label] / len(examples)
