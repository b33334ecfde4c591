"""Evaluation: greedy generation, exact match, and held-out loss."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from .data import IGNORE_INDEX, encode_prompt

#: End-of-turn tokens of common chat templates; generation stops at any that the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode without grad, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS (tokenizer's and generation config's) and end-of-turn."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    vocabulary = tokenizer.get_vocab()
    ids.update(vocabulary[token] for token in END_OF_TURN_TOKENS if token in vocabulary)
    return sorted(ids)


def generate_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to ``prompts`` (as built by :func:`~deltatune.train.data.build_prompt`).

    Prompts are batched with left padding (so every row's answer starts at the same
    position), shortest-to-longest to waste little on padding. Each answer is the decoded
    new tokens up to the first EOS/end-of-turn token, stripped. The tokenizer is not modified.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token for batched generation")
    stop_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    answers: list[str] = [""] * len(encoded)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[index]) for index in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = encoded[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row, index in enumerate(batch):
                new_tokens = generated[row, width:].tolist()
                # Finished rows keep being filled (with padding); cut at the first stop token.
                stop = next((i for i, token in enumerate(new_tokens) if token in stop_ids), None)
                answers[index] = tokenizer.decode(
                    new_tokens[:stop], skip_special_tokens=True
                ).strip()
    return answers


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference, ignoring surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("exact match of zero examples is undefined")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return hits / len(references)


def evaluate_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy per label token over all ``batches``.

    Every label token weighs the same, whichever batch it is in (a mean of per-batch means
    would over-weight batches with few answer tokens). Labels of ``-100`` are ignored.
    """
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    with _eval_mode(model):
        for batch in batches:
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            # Position t predicts token t+1.
            shifted_logits = logits[:, :-1].float()
            shifted_labels = batch["labels"][:, 1:].to(device)
            total_loss += F.cross_entropy(
                shifted_logits.reshape(-1, shifted_logits.size(-1)),
                shifted_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            total_tokens += int((shifted_labels != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise DataError("the evaluation batches hold no label tokens to score")
    return total_loss / total_tokens
