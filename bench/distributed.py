"""One process against two on the bundled model: step time, each process's peak memory, and the
memory estimator's prediction for each process beside it.

Three runs of ``deltatune train`` (LoRA, the bundled demo data, the same global batch of 8):
one process with batch 8 and all the cores' threads; ``--num-processes 2`` with batch 4 each
(data-parallel), then with ``--fsdp``, the cores split between the ranks. Each trains
``--steps`` optimizer steps; the step time is the training time over the steps (evaluation,
loading and the launch excluded). The estimate is
:func:`deltatune.analysis.memory.estimate_training_memory` for one process's share, with the
packed batch a rank computes (batch × the demo's mean example length).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/distributed.py --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {  # name: (processes, extra flags)
    "1 process, batch 8": (1, []),
    "2 processes DDP, batch 4 each": (2, []),
    "2 processes FSDP2, batch 4 each": (2, ["--fsdp"]),
}


def train(directory: Path, processes: int, flags: list[str], steps: int, eval_file: Path) -> dict:
    command = [sys.executable, "-m", "deltatune", "train", "--max-steps", str(steps), "--precision", "fp32",
               "--attention", "model", "--batch-size", str(8 // processes), "--eval-data", str(eval_file),
               "--eval-limit", "1", "--max-new-tokens", "4", "--no-progress", "-o", str(directory), *flags]
    if processes > 1:
        command += ["--num-processes", str(processes)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-4000:])
    return json.loads((directory / "summary.json").read_text())


def estimate(processes: int, sharding: str, example_length: int, answer_length: int) -> int:
    from deltatune.analysis.memory import estimate_memory
    from deltatune.models import bundled_model_dir

    batch = 8 // processes
    return estimate_memory(bundled_model_dir(), "lora", dtype="fp32", batch_size=batch, seq_len=example_length,
                           packed_tokens=batch * example_length, head_positions=answer_length,
                           device="cpu", processes=processes, sharding=sharding).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    from deltatune.models import load_model_and_tokenizer
    from deltatune.train.data import demo_data_path, load_examples, tokenize_examples

    examples = load_examples(demo_data_path("train"))
    tokenizer = load_model_and_tokenizer(None)[1]
    features = tokenize_examples(tokenizer, examples, 256)
    example_length = round(sum(len(f["input_ids"]) for f in features) / len(features))
    answer_length = round(sum(sum(1 for label in f["labels"] if label != -100) for f in features) / len(features))
    print(f"cores {os.cpu_count()}; demo examples: {example_length} tokens on average, {answer_length} of them the answer; "
          f"{args.steps} steps, global batch 8")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        eval_file = Path(scratch) / "eval.jsonl"
        eval_file.write_text("".join(line + "\n" for line in demo_data_path("test").read_text().splitlines()[:4]))
        for name, (processes, flags) in RUNS.items():
            summary = train(Path(scratch) / str(len(rows)), processes, flags, args.steps, eval_file)
            step = summary["train_seconds"] / summary["steps"]
            sharding = "fsdp" if "--fsdp" in flags else "ddp"
            predicted = estimate(processes, sharding, example_length, answer_length)
            rows.append((name, step, summary["training_peak_memory_mib_per_process"], predicted / 2**20))
    reference = rows[0][1]
    print(f"{'run':<34} {'step s':>7} {'/ 1 proc':>8}  {'peak MiB per process':<22} {'estimate MiB':>12}")
    for name, step, peaks, predicted in rows:
        print(f"{name:<34} {step:>7.2f} {step / reference:>8.2f}  {', '.join(f'{p:.0f}' for p in peaks):<22} "
              f"{predicted:>12.0f}")


if __name__ == "__main__":
    main()
