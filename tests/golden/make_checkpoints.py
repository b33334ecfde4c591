"""Write tests/golden/checkpoints: every invariant-suite method variant attached to the tiny
Llama, perturbed with a fixed seed, saved, with the logits it gives. test_golden_checkpoints
checks that the code of today saves the same bytes and loads these to the same logits, so a
refactoring of the core cannot change a checkpoint or a result without a test failing.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/golden/make_checkpoints.py   (from the project root)

Run it only when a checkpoint change is intended, and say so in the commit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import deltatune as dt  # noqa: E402
from test_invariants import METHODS, logits, perturb, supported  # noqa: E402
from zoo import tiny_inputs, tiny_model  # noqa: E402

ARCH = "llama"
ROOT = HERE / "checkpoints"


def golden_methods() -> list[str]:
    return [m for m in METHODS if supported(m, ARCH)]


def saved(method: str, directory: Path) -> torch.Tensor:
    """Attach ``method`` with seed 0, perturb with seed 1, save into ``directory``; the logits."""
    model = tiny_model(ARCH).eval()
    torch.manual_seed(0)
    dt.attach(model, METHODS[method]())
    perturb(model, "default")
    dt.save(model, directory)
    return logits(model, tiny_inputs(ARCH, model))


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    for method in golden_methods():
        saved_logits = saved(method, ROOT / method / "delta")
        save_file({"logits": saved_logits.contiguous()}, ROOT / method / "logits.safetensors")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    (ROOT / "MANIFEST.json").write_text(json.dumps({"written_by_commit": commit, "arch": ARCH,
                                                    "methods": golden_methods()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
