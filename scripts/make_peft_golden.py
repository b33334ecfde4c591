"""Write tests/golden/peft: small adapters exactly as Hugging Face PEFT writes them, with PEFT's logits.

    python scripts/make_peft_golden.py            # (re)write the golden files (needs peft)
    python scripts/make_peft_golden.py --check    # regenerate elsewhere and compare with the stored ones

Each case directory holds what ``PeftModel.save_pretrained`` wrote, untouched
(``adapter_config.json``, ``adapter_model.safetensors``; PEFT's model-card README is dropped), and
``expected.safetensors``: the forward inputs (``input.<name>``), the logits of the zoo's tiny model
without the adapter (``base_logits``) and PEFT's logits with it (``logits``); its metadata records
the architecture and the peft / transformers / torch versions that made it.

The base model is ``tests/zoo.py``'s ``tiny_model(arch)``: random, but seeded, so the same on every
run. ``tests/test_peft_interop.py`` loads each adapter with ``deltatune.load`` onto that model and
compares with the stored logits, without importing peft, so a change in PEFT's defaults cannot
move the reference. It checks ``base_logits`` first: if the zoo model ever changes (a new
transformers initialising differently), the files must be regenerated, and the test says so.

Every trainable tensor of the adapter is given seeded random values (LoRA's B starts at zero,
which would make the adapter the identity).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "peft"
SET_FIELDS = ("target_modules", "feedforward_modules", "modules_to_save", "exclude_modules")
sys.path.insert(0, str(ROOT / "tests"))

from zoo import tiny_inputs, tiny_model


def _cases() -> dict[str, tuple[str, Callable[[], Any], float]]:
    """case name -> (architecture, PEFT config, std of the random values given to the adapter)."""
    from peft import IA3Config, LoraConfig

    return {
        "llama-lora-dora-rslora": ("llama", lambda: LoraConfig(
            r=4, lora_alpha=6, use_dora=True, use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ), 0.1),
        "gpt2-lora-conv1d-bias": ("gpt2", lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, bias="lora_only",
        ), 0.1),
        "t5-ia3": ("t5", lambda: IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]), 0.5),
        "bert-lora-modules-to-save": ("bert", lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["cls"],
        ), 0.1),
    }


def write_case(name: str, arch: str, config: Any, std: float, directory: Path) -> None:
    import peft
    import transformers
    from peft import get_peft_model

    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, seen by PEFT
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(**inputs).logits
    if directory.exists():
        shutil.rmtree(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(directory)
    (directory / "README.md").unlink(missing_ok=True)
    tensors = {f"input.{k}": v.contiguous() for k, v in inputs.items()}
    tensors["base_logits"] = base_logits.contiguous()
    tensors["logits"] = logits.contiguous()
    metadata = {
        "arch": arch, "case": name, "peft": peft.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    save_file(tensors, str(directory / "expected.safetensors"), metadata=metadata)
    size = sum(f.stat().st_size for f in directory.iterdir())
    print(f"{name}: {size / 1024:.1f} KiB, PEFT moves the logits by {(logits - base_logits).abs().max():.3g}")


def _config(path: Path) -> dict:
    """adapter_config.json with PEFT's set-valued fields sorted: PEFT keeps target_modules as a
    Python set, so their order in the file follows string hashing and changes from run to run."""
    config = json.loads(path.read_text())
    return {k: sorted(v) if k in SET_FIELDS and isinstance(v, list) else v for k, v in config.items()}


def compare(stored: Path, fresh: Path) -> list[str]:
    """Differences between two generations of one case (empty: identical)."""
    problems = []
    for file in ("adapter_config.json", "adapter_model.safetensors", "expected.safetensors"):
        if not (stored / file).is_file():
            problems.append(f"{stored / file} is missing")
        elif file.endswith(".safetensors"):
            a, b = load_file(str(stored / file)), load_file(str(fresh / file))
            if a.keys() != b.keys():
                problems.append(f"{file}: keys differ")
            problems += [f"{file}: {k} differs" for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])]
        elif _config(stored / file) != _config(fresh / file):
            problems.append(f"{file} differs")
    if not problems:
        with safe_open(str(stored / "expected.safetensors"), "pt") as f:
            made_with = f.metadata()
        print(f"{stored.name}: identical (stored files made with {made_with})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="regenerate in a temporary directory and compare")
    args = parser.parse_args()
    if args.check:
        problems = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, (arch, config, std) in _cases().items():
                write_case(name, arch, config(), std, Path(tmp) / name)
                problems += [f"{name}: {p}" for p in compare(GOLDEN / name, Path(tmp) / name)]
        print("\n".join(problems) or "all golden files regenerate identically")
        return 1 if problems else 0
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name, (arch, config, std) in _cases().items():
        write_case(name, arch, config(), std, GOLDEN / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
