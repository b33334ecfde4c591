"""Forward time of a batch mixing K LoRA adapters: deltatune vs Hugging Face PEFT.

The bundled SmolLM2-135M carries K LoRA adapters (r=8, alpha=16 on the 7 projections of every
block, random non-zero weights, the same in both libraries). A batch of ``--batch`` sequences of
``--seq`` random tokens is split evenly over the K adapters (sample i uses adapter i mod K):

* deltatune: ``with deltatune.route(model, names): model(ids)`` — plain LoRA deltas present in
  the batch run as one gathered batched product per layer;
* PEFT: ``peft_model(input_ids=ids, adapter_names=names)`` — one masked sub-batch per adapter;
* floor: deltatune with one adapter active for the whole batch (no routing at all).

Forward passes only, under ``torch.no_grad``; the libraries alternate pass by pass, so slow
phases of the machine hit both. Before timing, every K checks that the two libraries' logits
agree. Prints the median times and the deltatune/PEFT and deltatune/floor ratios.

    HF_HUB_OFFLINE=1 python bench/mixed_batch.py [--ks 1,4,16] [--batch 16] [--seq 64] [--repeats 5]
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


def build(k: int, root: Path):
    """deltatune and PEFT models with the same K adapters a0..a{K-1}."""
    from peft import PeftModel

    ours, _ = load_model_and_tokenizer(None)
    for i in range(k):
        dt.attach(ours, dt.LoRAConfig(r=8, alpha=16, targets=PROJECTIONS), f"a{i}", activate=False)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in dt.trainable_parameters(ours, f"a{i}"):
                p.normal_(std=0.02)
    paths = dt.save(ours, root / f"k{k}", [f"a{i}" for i in range(k)], format="peft")
    base, _ = load_model_and_tokenizer(None)
    theirs = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    for i, path in enumerate(paths[1:], start=1):
        theirs.load_adapter(path, adapter_name=f"a{i}")
    return ours.eval(), theirs.eval()


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure(k: int, root: Path, ids: torch.Tensor, repeats: int) -> tuple[dict[str, float], float]:
    """Median forward times (ms) for K adapters, and the libraries' largest logit difference."""
    ours, theirs = build(k, root)
    names = [f"a{i % k}" for i in range(ids.shape[0])]

    def deltatune_mixed():
        with dt.route(ours, names):
            return ours(ids).logits

    def peft_mixed():
        return theirs(input_ids=ids, adapter_names=names).logits

    def floor():
        return ours(ids).logits

    difference = (deltatune_mixed() - peft_mixed()).abs().max().item()
    if difference > 1e-3:
        raise SystemExit(f"K={k}: the libraries disagree by {difference}; timings would compare different things")
    dt.activate(ours, "a0")
    runs = {"deltatune": deltatune_mixed, "peft": peft_mixed, "floor": floor}
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(timed(run))
    return {key: statistics.median(v) * 1000 for key, v in times.items()}, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    ids = torch.randint(10, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(v) for v in args.ks.split(",")):
            medians, difference = measure(k, Path(tmp), ids, args.repeats)
            rows.append((k, medians, difference))

    print(f"forward of a {args.batch}x{args.seq} batch, median of {args.repeats} (ms):")
    print(f"{'K':>3} {'deltatune':>10} {'PEFT':>8} {'floor':>8} {'dt/PEFT':>8} {'dt/floor':>9} {'max |diff|':>11}")
    for k, m, difference in rows:
        print(f"{k:>3} {m['deltatune']:>10.0f} {m['peft']:>8.0f} {m['floor']:>8.0f} "
              f"{m['deltatune'] / m['peft']:>8.2f} {m['deltatune'] / m['floor']:>9.2f} {difference:>11.1e}")


if __name__ == "__main__":
    main()
