"""Training activation memory of Ladder Side-Tuning beside LoRA, measured in one run.

The bundled SmolLM2-135M in fp32, a batch of 8 random sequences of 256 tokens (labels = inputs,
the model's own loss over every position), SDPA attention; LoRA with deltatune's defaults (r=8
on every linear layer but the head) and LST with its defaults (r = 8: a side network of width
576/8 = 72). Each method runs in its own subprocess, so its memory is its own, and reports:

* **saved for backward**: the bytes of every distinct tensor storage autograd saves during the
  forward (``torch.autograd.graph.saved_tensors_hooks``), parameters left out: the activations
  backward will read, exactly, whatever the allocator does;
* **step growth**: the peak memory of one training step (forward, backward; after a first
  step, so gradients and AdamW's state already exist) less the memory before it. On CPU the
  peak resident set (the kernel's mark reset before the step), with glibc's heap handing large
  freed blocks back at once (``MALLOC_MMAP_THRESHOLD_``), so activations, logits, transient
  gradient buffers and allocator slack; on CUDA ``torch.cuda.max_memory_allocated``;
* **estimate**: :func:`deltatune.analysis.memory.estimate_training_memory`'s two activation
  lines (layers, logits) for the model as built, with no allocator-retention line.

The ratios LST / LoRA of each figure close the report. Usage (about 2 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python bench/side_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("lora", "lst")
MIB = 2**20


def measure(method: str, batch: int, seq: int) -> dict:
    import torch

    import deltatune as dt
    from deltatune.analysis.memory import estimate_training_memory, peak_memory_bytes, reset_peak_memory, trim_heap
    from deltatune.models import load_model_and_tokenizer, release_checkpoint_mapping

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model_and_tokenizer()
    release_checkpoint_mapping(model)
    model.config._attn_implementation = "sdpa"
    dt.attach(model, dt.config(method))
    model.to(device).train()
    params = dt.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(4, model.config.vocab_size, (batch, seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # gradients' and AdamW's state now exist
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    del loss

    trim_heap()
    reset_peak_memory(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _resident()
    step()
    growth = peak_memory_bytes(device) - before

    estimate = estimate_training_memory(model, batch_size=batch, seq_len=seq, attention="sdpa",
                                        device=device.type, allocator_retention=False)
    layers = next(v for name, v, _ in estimate.lines if name.startswith("activations: layers"))
    return {"method": method, "trainable": sum(p.numel() for p in params), "saved": sum(saved.values()),
            "growth": growth, "estimate_layers": layers, "estimate_logits": estimate["activations: logits"],
            "device": device.type}


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.batch, args.seq)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    results = {}
    for method in METHODS:
        done = subprocess.run([sys.executable, __file__, "--worker", method, "--batch", str(args.batch),
                               "--seq", str(args.seq)], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"SmolLM2-135M fp32, batch {args.batch}, sequence {args.seq}, SDPA, on {results['lora']['device']}")
    print(f"{'method':8} {'trainable':>11} {'saved MiB':>10} {'step growth MiB':>16} "
          f"{'est. layers MiB':>16} {'est. logits MiB':>16} {'est. total MiB':>15}")
    for method, r in results.items():
        total = r["estimate_layers"] + r["estimate_logits"]
        print(f"{method:8} {r['trainable']:>11,} {r['saved'] / MIB:>10.1f} {r['growth'] / MIB:>16.1f} "
              f"{r['estimate_layers'] / MIB:>16.1f} {r['estimate_logits'] / MIB:>16.1f} {total / MIB:>15.1f}")
    lora, lst = results["lora"], results["lst"]
    print(f"LST / LoRA: saved for backward {lst['saved'] / lora['saved']:.3f}, "
          f"step growth {lst['growth'] / lora['growth']:.3f}, "
          f"estimate {(lst['estimate_layers'] + lst['estimate_logits']) / (lora['estimate_layers'] + lora['estimate_logits']):.3f}"
          f" (layers alone {lst['estimate_layers'] / lora['estimate_layers']:.3f})")


if __name__ == "__main__":
    main()
