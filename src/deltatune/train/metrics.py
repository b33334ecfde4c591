"""Evaluation metrics for NLU tasks (classification, multi-label, regression, tagging), in plain torch/python.

Accuracy is the fraction of predictions equal to their reference; per-class F1 is
2·TP / (2·TP + FP + FN) (equal to 2PR / (P + R), and 0 when the class has no true and no
predicted positives, as sklearn's default), and macro F1 is its unweighted mean over the classes;
the Matthews correlation for K classes is Gorodkin's R_K = (c·s − Σ p_k t_k) /
sqrt((s² − Σ p_k²)(s² − Σ t_k²)), with c the correct predictions, s the samples, p_k the times
class k was predicted and t_k the times it was true (0 when a factor of the denominator is 0, as
sklearn does), which for two classes is the φ coefficient of the 2×2 table; Pearson's r is
Σ dx·dy / sqrt(Σ dx² · Σ dy²) with dx, dy the deviations from the means, and Spearman's ρ is
Pearson's r of the ranks, tied values sharing the mean of the ranks they span (both are 0 when
either input is constant, where they would be undefined); MSE is the mean of (prediction −
reference)²; multi-label scores take 0/1 matrices of shape (samples, labels): micro F1 applies the
F1 formula to TP, FP, FN summed over all labels, macro F1 averages per-label F1 over every column
(a label with no true and no predicted positives counts as F1 = 0, as sklearn's default), and
subset accuracy is the fraction of samples whose whole row matches; tagging scores take one tag
list per sentence: token accuracy is accuracy over all tokens, and span F1 is conlleval's micro F1
over BIO entity spans, where a span starts at B-X, or at I-X after O or after a different type,
continues over I-X of the same type, and counts as correct only if its type, start and end all
match (precision = correct / predicted spans, recall = correct / true spans, F1 = 2PR / (P + R)).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..errors import DataError
from ..heads import TASKS


def _as_list(values: Sequence[Any] | torch.Tensor, name: str) -> list[Any]:
    """A 1-D sequence or tensor as a Python list."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise DataError(f"{name} must be 1-D, got a tensor of shape {tuple(values.shape)}")
        return values.tolist()
    return list(values)


def _pair(predictions, references, names=("predictions", "references")) -> tuple[list, list]:
    """Both inputs as lists, checked to be non-empty and of equal length."""
    first, second = _as_list(predictions, names[0]), _as_list(references, names[1])
    if len(first) != len(second):
        raise DataError(f"{len(first)} {names[0]} for {len(second)} {names[1]}")
    if not first:
        raise DataError(f"no {names[0]} to score: the inputs are empty")
    return first, second


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> float:
    """2·TP / (2·TP + FP + FN); 0 when there is nothing to score (sklearn's zero_division=0)."""
    denominator = 2 * true_positives + false_positives + false_negatives
    return 2 * true_positives / denominator if denominator else 0.0


def accuracy(predictions, references) -> float:
    """Fraction of predictions equal to their reference."""
    predictions, references = _pair(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions, references, labels: Sequence[Hashable] | None = None) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (default: every class seen in either input)."""
    predictions, references = _pair(predictions, references)
    classes = list(dict.fromkeys(labels)) if labels is not None else set(predictions) | set(references)
    if not classes:
        raise DataError("macro F1 needs at least one label")
    scores = []
    for label in classes:
        true_positives = sum(p == label and r == label for p, r in zip(predictions, references))
        false_positives = sum(p == label and r != label for p, r in zip(predictions, references))
        false_negatives = sum(p != label and r == label for p, r in zip(predictions, references))
        scores.append(_f1(true_positives, false_positives, false_negatives))
    return sum(scores) / len(scores)


def matthews_corrcoef(predictions, references) -> float:
    """Matthews correlation (Gorodkin's R_K for K classes; the φ coefficient for two); 0 if undefined."""
    predictions, references = _pair(predictions, references)
    samples = len(references)
    correct = sum(p == r for p, r in zip(predictions, references))
    predicted_counts, true_counts = Counter(predictions), Counter(references)
    numerator = correct * samples - sum(predicted_counts[k] * true_counts[k] for k in predicted_counts)
    predicted_spread = samples**2 - sum(n**2 for n in predicted_counts.values())
    true_spread = samples**2 - sum(n**2 for n in true_counts.values())
    if predicted_spread == 0 or true_spread == 0:  # one input is a single class: undefined, sklearn says 0
        return 0.0
    return numerator / math.sqrt(predicted_spread * true_spread)


def pearson(x, y) -> float:
    """Pearson's correlation coefficient; 0.0 (not NaN) when either input is constant."""
    x, y = _pair(x, y, ("x values", "y values"))
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    # compare extremes rather than the variance: a constant's deviations from its mean can round off 0
    if x.min() == x.max() or y.min() == y.max():
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / torch.sqrt((dx * dx).sum() * (dy * dy).sum()))


def _average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the positions they occupy."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        mean_rank = (start + end) / 2 + 1  # positions start..end hold ranks start+1..end+1
        for position in range(start, end + 1):
            ranks[order[position]] = mean_rank
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson of average ranks; 0.0 when either input is constant."""
    x, y = _pair(x, y, ("x values", "y values"))
    return pearson(_average_ranks(x), _average_ranks(y))


def mean_squared_error(predictions, references) -> float:
    """Mean of (prediction − reference)²."""
    predictions, references = _pair(predictions, references)
    return sum((float(p) - float(r)) ** 2 for p, r in zip(predictions, references)) / len(references)


def _as_indicator_matrix(values, name: str) -> torch.Tensor:
    """A (samples, labels) 0/1 matrix as a bool tensor, checked."""
    matrix = torch.as_tensor(values)
    if matrix.dim() != 2:
        raise DataError(f"{name} must be a 2-D 0/1 matrix (samples, labels), got shape {tuple(matrix.shape)}")
    if not ((matrix == 0) | (matrix == 1)).all():
        raise DataError(f"{name} must hold only 0 and 1")
    return matrix.bool()


def multilabel_scores(predicted, true) -> dict[str, float]:
    """Micro F1, macro F1 and subset accuracy of 0/1 matrices of shape (samples, labels).

    Macro F1 averages over every label column; a label with no true and no predicted positives
    counts as F1 = 0 (sklearn's default), so it lowers the average.
    """
    predicted, true = _as_indicator_matrix(predicted, "predicted"), _as_indicator_matrix(true, "true")
    if predicted.shape != true.shape:
        raise DataError(f"predicted has shape {tuple(predicted.shape)}, true has shape {tuple(true.shape)}")
    if predicted.numel() == 0:
        raise DataError(f"nothing to score: the matrices have shape {tuple(predicted.shape)}")
    true_positives = (predicted & true).sum(0).tolist()
    false_positives = (predicted & ~true).sum(0).tolist()
    false_negatives = (~predicted & true).sum(0).tolist()
    per_label = [_f1(*counts) for counts in zip(true_positives, false_positives, false_negatives)]
    return {
        "micro_f1": _f1(sum(true_positives), sum(false_positives), sum(false_negatives)),
        "macro_f1": sum(per_label) / len(per_label),
        "subset_accuracy": float((predicted == true).all(1).float().mean()),
    }


def is_bio(tags_vocabulary) -> bool:
    """Whether every tag is "O" or starts with "B-" or "I-"."""
    return all(tag == "O" or tag.startswith(("B-", "I-")) for tag in tags_vocabulary)


def _spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans (type, start, end exclusive) of one sentence's BIO tags, conlleval's way."""
    spans, current_type, start = set(), None, 0
    for position, tag in enumerate(list(tags) + ["O"]):  # a trailing O closes the last span
        if tag != "O" and not (tag.startswith(("B-", "I-")) and len(tag) > 2):
            raise DataError(f"tag {tag!r} is not BIO: expected 'O', 'B-<type>' or 'I-<type>'")
        prefix, entity_type = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        # I-X of the current type continues the span; anything else closes it
        if prefix == "I" and entity_type == current_type:
            continue
        if current_type is not None:
            spans.add((current_type, start, position))
        # B-X starts a span, and so does an I-X after O or another type (conlleval is lenient)
        current_type, start = entity_type, position
    return spans


def _sentence_pairs(predicted_tags, true_tags) -> list[tuple[list[str], list[str]]]:
    """Sentences paired up, checked to have as many predicted as true tags each."""
    predicted_tags, true_tags = _pair(predicted_tags, true_tags, ("predicted sentences", "true sentences"))
    pairs = []
    for index, (predicted, true) in enumerate(zip(predicted_tags, true_tags)):
        predicted, true = list(predicted), list(true)
        if len(predicted) != len(true):
            raise DataError(f"sentence {index}: {len(predicted)} predicted tags for {len(true)} true tags")
        pairs.append((predicted, true))
    return pairs


def span_f1(predicted_tags, true_tags) -> dict[str, float]:
    """Micro precision, recall and F1 over BIO entity spans, conlleval's way (exact type, start and end)."""
    predicted_count = true_count = correct = 0
    for predicted, true in _sentence_pairs(predicted_tags, true_tags):
        predicted_spans, true_spans = _spans(predicted), _spans(true)
        predicted_count += len(predicted_spans)
        true_count += len(true_spans)
        correct += len(predicted_spans & true_spans)
    precision = correct / predicted_count if predicted_count else 0.0
    recall = correct / true_count if true_count else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def token_accuracy(predicted_tags, true_tags) -> float:
    """Fraction of tokens, over all sentences, whose predicted tag equals the true one."""
    pairs = _sentence_pairs(predicted_tags, true_tags)
    predicted = [tag for sentence, _ in pairs for tag in sentence]
    true = [tag for _, sentence in pairs for tag in sentence]
    return accuracy(predicted, true)


def task_metrics(task: str, predictions, references, labels: Sequence[Hashable] | None = None) -> dict[str, float]:
    """The metrics reported for one task kind.

    ``classify``: accuracy, macro_f1 (over ``labels`` if given), mcc. ``multilabel``: see
    :func:`multilabel_scores`. ``regression``: pearson, spearman, mse. ``tag`` (one tag list per
    sentence): token_accuracy, plus span_precision/span_recall/span_f1 when the tag set
    (``labels`` if given, else every tag seen) is BIO, or macro_f1 over tokens when it is not.
    ``labels`` is unused for multilabel and regression.
    """
    if task == "classify":
        return {
            "accuracy": accuracy(predictions, references),
            "macro_f1": macro_f1(predictions, references, labels),
            "mcc": matthews_corrcoef(predictions, references),
        }
    if task == "multilabel":
        return multilabel_scores(predictions, references)
    if task == "regression":
        return {
            "pearson": pearson(predictions, references),
            "spearman": spearman(predictions, references),
            "mse": mean_squared_error(predictions, references),
        }
    if task == "tag":
        pairs = _sentence_pairs(predictions, references)
        predicted = [tag for sentence, _ in pairs for tag in sentence]
        true = [tag for _, sentence in pairs for tag in sentence]
        scores = {"token_accuracy": accuracy(predicted, true)}
        tag_set = labels if labels is not None else set(predicted) | set(true)
        if is_bio(tag_set):
            spans = span_f1(predictions, references)
            scores.update({f"span_{name}": value for name, value in spans.items()})
        else:
            scores["macro_f1"] = macro_f1(predicted, true, labels)
        return scores
    raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
