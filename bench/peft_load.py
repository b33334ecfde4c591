"""Time loading ten PEFT LoRA adapters onto one base: deltatune vs Hugging Face PEFT.

Ten adapters in PEFT's format (LoRA r=8, alpha=16 on the 7 projections of every block of the
bundled SmolLM2-135M, random non-zero weights, written once by ``deltatune.save(...,
format="peft")``) are loaded one after the other onto one base model:

* deltatune: ``deltatune.load(model, directory, name)`` for each;
* PEFT: ``PeftModel.from_pretrained(model, first)``, then ``load_adapter(directory, name)``.

Each library gets its own copy of the base (loaded before timing starts). The report gives the
time of every load, the 10th load over the 1st (does attaching get slower as adapters pile up?)
and deltatune's total over PEFT's, measured in the same run. Before timing, the script checks
that the last adapter gives the same logits in both libraries.

    HF_HUB_OFFLINE=1 python bench/peft_load.py [--adapters 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import deltatune as dt
from deltatune.models import load_model_and_tokenizer

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(count: int, root: Path) -> list[Path]:
    model, _ = load_model_and_tokenizer(None)
    paths = []
    for i in range(count):
        dt.attach(model, dt.LoRAConfig(r=8, alpha=16, targets=PROJECTIONS), "adapter")
        torch.manual_seed(i)
        with torch.no_grad():
            for p in dt.trainable_parameters(model, "adapter"):
                p.normal_(std=0.02)
        paths += dt.save(model, root / f"adapter{i}", format="peft")
        dt.detach(model)
    return paths


def time_deltatune(paths: list[Path]) -> tuple[list[float], torch.nn.Module]:
    model, _ = load_model_and_tokenizer(None)
    times = []
    for i, path in enumerate(paths):
        started = time.perf_counter()
        dt.load(model, path, f"a{i}", activate=False)
        times.append(time.perf_counter() - started)
    dt.activate(model, f"a{len(paths) - 1}")
    return times, model


def time_peft(paths: list[Path]) -> tuple[list[float], torch.nn.Module]:
    from peft import PeftModel

    model, _ = load_model_and_tokenizer(None)
    times = []
    started = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, paths[0], adapter_name="a0")
    times.append(time.perf_counter() - started)
    for i, path in enumerate(paths[1:], start=1):
        started = time.perf_counter()
        peft_model.load_adapter(path, adapter_name=f"a{i}")
        times.append(time.perf_counter() - started)
    peft_model.set_adapter(f"a{len(paths) - 1}")
    return times, peft_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="repeat both libraries this many times, alternating")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(args.adapters, Path(tmp))
        runs = {"deltatune": [], "peft": []}
        for round_index in range(args.rounds):
            ours, our_model = time_deltatune(paths)
            theirs, peft_model = time_peft(paths)
            if round_index == 0:
                ids = torch.randint(10, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
                difference = (our_model.eval()(ids).logits - peft_model.eval()(input_ids=ids).logits).abs().max().item()
                print(f"last adapter, max |logit difference| deltatune vs PEFT: {difference:.2e}")
                if difference > 1e-4:
                    raise SystemExit("the libraries disagree; timings would compare different things")
            runs["deltatune"].append(ours)
            runs["peft"].append(theirs)
            del our_model, peft_model

    print(f"\nms per load (median of {args.rounds} rounds), adapter 1..{args.adapters}:")
    medians = {}
    for library, rounds in runs.items():
        medians[library] = [statistics.median(r[i] for r in rounds) * 1000 for i in range(args.adapters)]
        print(f"{library:>10}: " + " ".join(f"{t:6.0f}" for t in medians[library]))
    for library, times in medians.items():
        later = statistics.median(times[1:])
        print(f"{library:>10}: first {times[0]:.0f} ms, 10th/1st {times[-1] / times[0]:.2f}, "
              f"median of loads 2..{args.adapters} {later:.0f} ms, total {sum(times):.0f} ms")
    print(f"deltatune/PEFT total: {sum(medians['deltatune']) / sum(medians['peft']):.2f}")


if __name__ == "__main__":
    main()
