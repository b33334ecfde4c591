"""One epoch of the bundled demo data: deltatune's defaults against a plain PEFT loop, in one process.

Contestants, each on its own copy of one loaded SmolLM2-135M, on the same tokenised examples in
the same batches (batch 8, the demo's order), LoRA r=8, alpha=16 on all linear layers, AdamW at
the LoRA default learning rate:

* ``deltatune``: what ``deltatune train`` does by default: ``precision="auto"`` resolved on this
  device (bf16 base with fp32 deltas where bf16 products are native, else fp32),
  ``attention="auto"`` (the implementation measured faster on the longest batch), packed
  batches (each batch's examples in a few rows, their shared prompt prefix computed once:
  ``train/packing.py``), LoRA's products fused with the base layer's (``deltatune/fused.py``)
  and the loss through deltatune's own path (the LM head only where a label is predicted);
* ``peft-fp32``: ``peft.get_peft_model`` and the model's own loss (``labels=``), in fp32;
* ``peft-bf16``: the same under ``torch.autocast("cpu"/"cuda", torch.bfloat16)``.

Each contestant runs its epoch once, in turn; a step is forward, backward, AdamW step, zero_grad.
The script prints the CPU's bf16 features, each wall time, tokens per second, the ratios, and the
epoch's matrix-product floor: 4·N FLOPs per token for the frozen base's N body weights (a forward
product and the backward product for the input gradient; no weight gradients) plus the head's
over the answer tokens, at the GEMM rate measured in this run in the precision deltatune chose.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_speed.py [--steps N] [--device cuda] [--precision fp32]

``--precision fp32`` runs deltatune as on a CPU without native bf16 (packing and the fused paths
alone), against the same two PEFT loops.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune import precision  # noqa: E402
from deltatune.models import load_model_and_tokenizer  # noqa: E402
from deltatune.train.data import PadCollator, batch_indices, demo_data_path, load_examples, tokenize_examples  # noqa: E402
from deltatune.train.attention_choice import choose_attention  # noqa: E402
from deltatune.train.objectives import causal_lm_loss  # noqa: E402
from deltatune.train.packing import PackedCollator, packing_blocker  # noqa: E402

RANK, ALPHA, BATCH, MAX_LENGTH = 8, 16, 8, 256


def gemm_rate(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a 1024×576 @ 576×1536 product (the bundled model's FFN shape) in ``dtype``."""
    a = torch.randn(1024, 576, device=device).to(dtype)
    b = torch.randn(576, 1536, device=device).to(dtype)
    for _ in range(5):
        a @ b
    n, started = 40, time.perf_counter()
    for _ in range(n):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - started)


def epoch(model, batches, features, collate, loss_fn, params, device, autocast_dtype=None) -> tuple[float, list[float]]:
    optimizer = torch.optim.AdamW(params, lr=dt.LoRAConfig.default_lr)
    losses = []
    model.train()
    started = time.perf_counter()
    for indices in batches:
        batch = {k: v.to(device) for k, v in collate([features[i] for i in indices]).items()}
        if autocast_dtype is not None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                loss = loss_fn(model, batch)
        else:
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, losses


def hf_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="stop each epoch after this many steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a model directory instead of the bundled SmolLM2-135M")
    parser.add_argument("--precision", default="auto", choices=precision.PRECISIONS,
                        help="deltatune's precision (default auto, as `deltatune train`)")
    args = parser.parse_args()
    device = torch.device(args.device)
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_model_and_tokenizer(args.model)
    base.to(device)
    features = tokenize_examples(tokenizer, load_examples(demo_data_path("train")), MAX_LENGTH)
    batches = batch_indices([len(f["input_ids"]) for f in features], BATCH, seed=0)[: args.steps]
    collate = PadCollator(tokenizer.pad_token_id)
    tokens = sum(len(features[i]["input_ids"]) for b in batches for i in b)
    answers = sum(sum(t != -100 for t in features[i]["labels"]) for b in batches for i in b)

    chosen = precision.resolve(args.precision, device)
    features_line = ", ".join(sorted(set(precision.cpu_features()) & {"avx512f", *precision.NATIVE_BF16_FEATURES})) or "none"
    print(f"device {device}; CPU features: {features_line}; deltatune's precision={args.precision!r} here: {chosen}")
    rates = {"fp32": gemm_rate(torch.float32, device), "bf16": gemm_rate(torch.bfloat16, device)}
    print(f"GEMM rate: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s")
    head = base.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not base.get_output_embeddings())
    floor = (4 * body * tokens + 4 * head * answers) / rates[chosen]
    print(f"epoch: {len(batches)} steps of batch {BATCH}, {tokens} tokens ({answers} answer tokens); "
          f"matrix-product floor at the {chosen} rate: {floor:.1f} s")

    results = {}
    model = copy.deepcopy(base)
    if chosen == "bf16":
        model.to(torch.bfloat16)
    dt.attach(model, dt.LoRAConfig(r=RANK, alpha=ALPHA))
    loss = lambda m, b: causal_lm_loss(m, b, subset=True)  # noqa: E731
    longest = sorted(features, key=lambda f: len(f["input_ids"]), reverse=True)[:BATCH]
    attention, timings = choose_attention(model, "auto", {k: v.to(device) for k, v in collate(longest).items()}, loss)
    print(f"deltatune's attention='auto' here: {attention} ({', '.join(f'{k} {v:.2f} s' for k, v in timings.items())} "
          "per step of the longest batch)")
    packed = PackedCollator(tokenizer.pad_token_id, budget=MAX_LENGTH)
    blocker = packing_blocker(model, features, packed, tokenizer.pad_token_id, loss, device)
    example = packed([features[i] for i in batches[0]])
    print("deltatune's batches: " + (blocker or f"packed, e.g. {len(batches[0])} examples of "
          f"{sum(len(features[i]['input_ids']) for i in batches[0])} tokens in {tuple(example['input_ids'].shape)}"))
    own_collate = collate if blocker else packed
    results["deltatune"] = epoch(model, batches, features, own_collate, loss, dt.trainable_parameters(model), device)
    del model
    for name, autocast in (("peft-fp32", None), ("peft-bf16", torch.bfloat16)):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                              target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
        results[name] = epoch(model, batches, features, collate, hf_loss, params, device, autocast)
        del model

    reference = results["peft-fp32"][0]
    print(f"\n{'':10} {'wall s':>8} {'tokens/s':>9} {'/ peft-fp32':>11} {'/ peft-bf16':>11} {'/ floor':>8}  loss first → last")
    for name, (seconds, losses) in results.items():
        print(f"{name:10} {seconds:8.1f} {tokens / seconds:9.0f} {seconds / reference:11.3f} "
              f"{seconds / results['peft-bf16'][0]:11.3f} {seconds / floor:8.2f}  {losses[0]:.3f} → {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
