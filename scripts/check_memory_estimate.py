"""Check deltatune's training-memory estimator against the seed table and a measured CPU run.

1. The seed documents' OPT-1.3B example (fp16 weights, sequence 512, plain fp16 AdamW states):
   weights 2.6 GB; gradients 2.6 GB for full fine-tuning vs 0.4 MB for 0.2M trainable LoRA
   parameters; optimizer states 5.2 GB vs 0.8 MB; about 1 GB of activations per example. The
   estimate is built from ``OPTConfig`` on the meta device; 0.2M trainable parameters is LoRA
   r = 1 on W_q and W_v (24·2·(2048 + 2048) = 196,608), kept in fp16 as in the seed's arithmetic.
2. The framework overhead: resident memory of a process that imports what the trainer imports.
3. A real ``deltatune train`` run on the bundled SmolLM2-135M (LoRA, 5 steps of batch 8, fp32,
   CPU): its measured training peak (``training_peak_memory_mib``: peak resident set from the
   first step on) against the estimate for the largest batch of those 5 steps.

    python scripts/check_memory_estimate.py [--steps 5] [--batch-size 8] [--output runs/memcheck] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import OPTConfig

from deltatune.analysis.memory import CPU_RUNTIME_BYTES, estimate_memory
from deltatune.models import bundled_model_dir

GB, MB, MiB = 10**9, 10**6, 2**20
OPT_1_3B = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048)
#: the seed table: (line, full fine-tuning, LoRA with 0.2M trainable parameters), bytes
SEED = (
    ("model weights", 2.6 * GB, 2.6 * GB),
    ("gradients", 2.6 * GB, 0.4 * MB),
    ("optimizer states (adamw)", 5.2 * GB, 0.8 * MB),
    ("activations per example", 1.0 * GB, 1.0 * GB),
)
IMPORTS = "import torch, transformers, accelerate, deltatune, deltatune.train.trainer"


def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / MB:.2f} MB"


def activations(estimate) -> int:
    return sum(b for name, b, _ in estimate.lines if name.startswith("activations"))


def seed_check() -> float:
    common = dict(dtype="fp16", batch_size=1, seq_len=512, device="cuda")
    full = estimate_memory(OPT_1_3B, "full", **common)
    lora = estimate_memory(OPT_1_3B, "lora", method_options={"r": 1, "targets": ["attn.q", "attn.v"],
                                                             "param_dtype": "float16"}, **common)
    print("OPT-1.3B, fp16, sequence 512: seed table vs estimate")
    print("| line | seed, full | estimate, full | error | seed, LoRA 0.2M | estimate, LoRA | error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for line, seed_full, seed_lora in SEED:
        got = [activations(e) if line.startswith("activations") else e[line] for e in (full, lora)]
        errors = [(g - s) / s for g, s in zip(got, (seed_full, seed_lora))]
        worst = max(worst, *map(abs, errors))
        print(f"| {line} | {human(seed_full)} | {human(got[0])} | {errors[0]:+.1%} "
              f"| {human(seed_lora)} | {human(got[1])} | {errors[1]:+.1%} |")
    print(f"largest error: {worst:.1%}\n")
    print("full estimate, line by line:\n" + str(full) + "\n")
    return worst


def runtime_overhead() -> int:
    code = f"{IMPORTS}\nprint([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(output.split()[-1]) * 1024


def largest_batch(steps: int, batch_size: int) -> tuple[int, int]:
    """(padded length, positions the head runs on) of the longest of the run's first batches,
    computed exactly as the trainer batches and pads the bundled data."""
    from transformers import AutoTokenizer

    from deltatune.train.data import IGNORE_INDEX, PadCollator, tokenize_examples
    from deltatune.train.settings import TrainSettings
    from deltatune.train.tasks import split_data
    from deltatune.train.trainer import micro_batches

    settings = TrainSettings(max_steps=steps, batch_size=batch_size)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    train, _ = split_data(settings)
    features = tokenize_examples(tokenizer, train, settings.max_length, settings.train_on)
    stream = micro_batches([len(f["input_ids"]) for f in features], settings, 0, 1)
    collate = PadCollator(tokenizer.pad_token_id or 0)
    shapes = []
    for _ in range(steps):
        batch = collate([features[i] for i in next(stream)])
        columns = (batch["labels"] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        shapes.append((batch["input_ids"].shape[1], int(columns.max()) - max(int(columns.min()), 1) + 1))
    return max(shapes)


def measured_run(steps: int, batch_size: int, output: Path, reuse: bool, env: dict[str, str]) -> dict:
    summary = output / "summary.json"
    if not (reuse and summary.is_file()):
        command = [sys.executable, "-m", "deltatune", "train", "--precision", "fp32", "--no-packing", "--max-steps", str(steps), "--batch-size", str(batch_size),
                   "--eval-limit", "1", "--max-new-tokens", "4", "--no-progress", "--overwrite", "-o", str(output)]
        print("$ " + " ".join([*(f"{k}={v}" for k, v in env.items()), "deltatune", *command[3:]]), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("runs/memcheck"))
    parser.add_argument("--reuse", action="store_true", help="use the run already in --output")
    args = parser.parse_args()

    seed_check()
    overhead = runtime_overhead()
    print(f"framework overhead: `{IMPORTS}` holds {overhead / MiB:.0f} MiB resident "
          f"(the estimator's CPU line: {CPU_RUNTIME_BYTES / MiB:.0f} MiB)\n")

    seq_len, positions = largest_batch(args.steps, args.batch_size)
    print(f"bundled SmolLM2-135M, LoRA (defaults), fp32, CPU, {args.steps} steps of batch {args.batch_size}; "
          f"largest batch: {seq_len} tokens, head on {positions} positions")
    # glibc's default malloc keeps freed activations resident; a fixed mmap threshold does not
    for label, env, retention in (("default malloc", {}, True),
                                  ("fixed mmap threshold", {"MALLOC_MMAP_THRESHOLD_": "65536"}, False)):
        summary = measured_run(args.steps, args.batch_size, args.output / label.replace(" ", "-"), args.reuse, env)
        estimate = estimate_memory(bundled_model_dir(), "lora", dtype="fp32", batch_size=args.batch_size,
                                   seq_len=seq_len, head_positions=positions, device="cpu",
                                   allocator_retention=retention)
        measured = summary["training_peak_memory_mib"] * MiB
        print(estimate)
        print(f"{label}: measured training peak (resident set) {measured / MiB:.0f} MiB; estimate "
              f"{estimate.total / MiB:.0f} MiB; error {(estimate.total - measured) / measured:+.1%}\n")


if __name__ == "__main__":
    main()
