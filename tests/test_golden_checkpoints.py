"""Checkpoints written by an earlier commit (tests/golden/checkpoints, see its MANIFEST.json and
make_checkpoints.py) load to the same logits, and today's code saves the same checkpoint.

"The same" is every tensor's bytes, names, dtypes and shapes, and the same delta_config.json
apart from the file's SHA-256: safetensors orders its JSON header differently from one process
to the next (the tensors are identical), so the file's own bytes, and their hash, are not a
stable thing to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import deltatune as dt
from test_invariants import logits
from zoo import tiny_inputs, tiny_model

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_checkpoints import ARCH, ROOT, golden_methods, saved  # noqa: E402

MANIFEST = json.loads((ROOT / "MANIFEST.json").read_text())


def test_every_golden_method_is_still_a_method_variant():
    assert MANIFEST["methods"] == golden_methods()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


#: the checkpoints were recorded on a CPU without AMX; another CPU's fp32 matrix kernels round
#: differently in the last bits (6e-8 apart on an AMX CPU; 1e-5 for P-tuning's and reparameterized
#: prefix tuning's tensors, folded through their encoders), so equal means equal to fp32 rounding
SAME_LOGITS = dict(atol=2e-5, rtol=1e-5)


def _config_without_hash(path: Path) -> dict:
    config = json.loads(path.read_text())
    config.pop("weights_sha256")
    return config


@pytest.mark.parametrize("method", MANIFEST["methods"])
def test_a_golden_checkpoint_loads_to_its_logits(method):
    model = tiny_model(ARCH).eval()
    assert dt.load(model, ROOT / method / "delta") == ["default"]
    expected = load_file(ROOT / method / "logits.safetensors")["logits"]
    torch.testing.assert_close(logits(model, tiny_inputs(ARCH, model)), expected, **SAME_LOGITS)


@pytest.mark.parametrize("method", MANIFEST["methods"])
def test_todays_code_saves_the_golden_checkpoint(method, tmp_path):
    written = saved(method, tmp_path / "delta")
    torch.testing.assert_close(written, load_file(ROOT / method / "logits.safetensors")["logits"], **SAME_LOGITS)
    got, golden = _tensors(tmp_path / "delta" / "delta.safetensors"), _tensors(ROOT / method / "delta" / "delta.safetensors")
    assert set(got) == set(golden)
    for key, tensor in golden.items():  # names, dtypes, shapes exactly; values to fp32 rounding
        torch.testing.assert_close(got[key], tensor, **SAME_LOGITS)
    assert _config_without_hash(tmp_path / "delta" / "delta_config.json") == \
        _config_without_hash(ROOT / method / "delta" / "delta_config.json")
