"""Peak memory of TRL's DPO against its SFT, on a deltatune LoRA: the reference costs no copy.

Three runs on the bundled SmolLM2-135M (fp32, LoRA r=16 on every linear layer), each in a
fresh process, the same number of optimizer steps over the same token counts:

* ``sft``: ``delta_trainer(SFTTrainer)`` on each preference pair's two answers as separate
  records, with twice DPO's batch size, so that its policy forward and backward see exactly the
  sequences DPO's do;
* ``dpo``: ``delta_trainer(DPOTrainer)``; its reference is the same model with the delta off;
* ``dpo-copy``: TRL's own ``DPOTrainer`` on the same deltatune model, given no ``ref_model``: as
  for any model that is not a ``peft.PeftModel``, TRL loads a second copy of the base from the
  model's path as the reference. This is the cost the first two avoid.

Each run reports its peak resident memory above the process after its imports (the model load,
the trainer and the training steps: ``VmHWM`` after resetting the mark through
``/proc/self/clear_refs``), the whole process's peak, and the parameters held by the models
the trainer keeps (``model`` and ``ref_model``, each parameter counted once). With
``--device cuda``, ``torch.cuda.max_memory_allocated`` instead.

Example (about 3 minutes of CPU time on 2 cores)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/trl_memory.py --steps 3 --batch 4 --length 96
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, inside TRL

RUNS = ("sft", "dpo", "dpo-copy")


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def _pairs(tokenizer, count: int, length: int) -> list[dict[str, str]]:
    """Prompts and answers of about ``length`` tokens each, from a fixed word list."""
    words = "the a river stone light quiet north seven paper garden window orange bridge".split()
    def text(seed: int) -> str:
        return " ".join(words[(seed * 7 + i * 3) % len(words)] for i in range(length))
    return [{"prompt": text(i), "chosen": " " + text(i + 1), "rejected": " " + text(i + 2)} for i in range(count)]


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch
    import transformers as tf
    import trl
    from datasets import Dataset

    import deltatune as dt
    from deltatune.integrations import delta_trainer
    from deltatune.models import bundled_model_dir

    tf.utils.logging.disable_progress_bar()
    cuda = args.device.startswith("cuda")
    path = bundled_model_dir()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    pairs = _pairs(tokenizer, args.batch * args.steps, args.length)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the peak mark restarts here: imports and tokenizer are left out
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device)
    dt.attach(model, dt.LoRAConfig(r=16, alpha=32.0))
    common = dict(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, learning_rate=1e-4, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=not cuda, bf16=False, seed=0, disable_tqdm=True,
        max_length=4 * args.length,
    )
    if name == "sft":
        records = [{"prompt": p["prompt"], "completion": p[k]} for p in pairs for k in ("chosen", "rejected")]
        trainer = delta_trainer(trl.SFTTrainer)(
            model=model, args=trl.SFTConfig(per_device_train_batch_size=2 * args.batch, **common),
            train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    else:
        trainer_class = delta_trainer(trl.DPOTrainer) if name == "dpo" else trl.DPOTrainer
        trainer = trainer_class(
            model=model, args=trl.DPOConfig(per_device_train_batch_size=args.batch, **common),
            train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    trainer.train()
    held = {id(p): p.numel() for m in (trainer.model, getattr(trainer, "ref_model", None)) if m is not None
            for p in m.parameters()}
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        process_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (_status_kib("VmHWM") - baseline) / 1024
        process_mib = _status_kib("VmHWM") / 1024
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"peak_above_imports_mib": peak_mib, "process_peak_mib": process_mib,
            "parameters_held": sum(held.values()), "losses": losses}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per DPO step (SFT: twice as many records)")
    parser.add_argument("--length", type=int, default=96, help="words per prompt and per answer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=RUNS, help="run one in this process (the parent starts one per run)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.only:
        result = run_one(args.only, args)
        with open(args.json, "w") as out:
            json.dump(result, out)
        return
    results = {}
    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--only", name, "--json", out,
                            "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length),
                            "--device", args.device], check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                results[name] = json.load(f)
    sft, sft_process = results["sft"]["peak_above_imports_mib"], results["sft"]["process_peak_mib"]
    print(f"{'run':<9} {'peak above imports MiB':>23} {'/ sft':>6} {'process peak MiB':>17} {'/ sft':>6} "
          f"{'params held':>12}")
    for name, r in results.items():
        print(f"{name:<9} {r['peak_above_imports_mib']:>23.0f} {r['peak_above_imports_mib'] / sft:>6.2f} "
              f"{r['process_peak_mib']:>17.0f} {r['process_peak_mib'] / sft_process:>6.2f} {r['parameters_held']:>12,}")
    print("losses:", {name: [round(x, 4) for x in r["losses"]] for name, r in results.items()})


if __name__ == "__main__":
    main()
