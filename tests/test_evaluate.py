"""Exact match and token-weighted evaluation loss, on a tiny stand-in model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deltatune.errors import DataError
from deltatune.train.data import IGNORE_INDEX
from deltatune.train.evaluate import evaluate_loss, exact_match
from deltatune.analysis.memory import peak_memory_bytes, reset_peak_memory


class UniformLM(nn.Module):
    """Predicts token 0 with logit ``bias`` and every other token with logit 0."""

    def __init__(self, vocab_size: int = 5, bias: float = 2.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.bias = nn.Parameter(torch.tensor(bias))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., 0] = self.bias
        return SimpleNamespace(logits=logits)


def batch(labels):
    labels = torch.tensor(labels)
    return {
        "input_ids": labels.clamp(min=0),
        "attention_mask": torch.ones_like(labels),
        "labels": labels,
    }


def test_exact_match_ignores_surrounding_whitespace():
    assert exact_match([" 2021-03-05\n", "2021-03-06"], ["2021-03-05", "2021-03-05"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_evaluate_loss_weights_every_label_token_equally():
    model = UniformLM()
    model.train()
    log_normaliser = math.log(math.exp(2.0) + 4)
    loss_of = {0: log_normaliser - 2.0, 3: log_normaliser}  # cross-entropy per target token
    # Batch 1 scores three targets (0, 0, 3) after the shift; batch 2 one target (3).
    batches = [batch([[IGNORE_INDEX, 0, 0, 3]]), batch([[IGNORE_INDEX, IGNORE_INDEX, 3]])]
    expected = (2 * loss_of[0] + 2 * loss_of[3]) / 4
    assert evaluate_loss(model, batches) == pytest.approx(expected)
    assert model.training  # mode restored


def test_evaluate_loss_without_label_tokens_is_an_error():
    with pytest.raises(DataError, match="no label tokens"):
        evaluate_loss(UniformLM(), [batch([[IGNORE_INDEX, IGNORE_INDEX]])])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_reset_forgets_a_freed_allocation():
    device = torch.device("cpu")
    big = torch.ones(64 * 2**20)  # 256 MiB, resident because it is written
    del big
    before_reset = peak_memory_bytes(device)
    assert reset_peak_memory(device)
    after_reset = peak_memory_bytes(device)
    assert before_reset - after_reset > 200 * 2**20
    kept = torch.ones(32 * 2**20)
    assert peak_memory_bytes(device) - after_reset > 100 * 2**20
    del kept
