"""Time one LoRA training step: deltatune vs Hugging Face PEFT vs the frozen floor.

Three contestants run in one process on copies of one loaded SmolLM2-135M, so they share the
exact base weights and the same machine noise:

* ``deltatune``: ``deltatune.LoRAConfig(r, alpha=2r, targets=["all-linear"])``;
* ``peft``: ``peft.LoraConfig(r, lora_alpha=2r, lora_dropout=0, target_modules="all-linear")``;
* ``floor``: no adapter, every parameter frozen, gradients flowing back only as far as the input
  embeddings' output. Any adapter step has to do at least this much work.

A step is forward, loss backward, AdamW step over the trainable parameters, zero_grad (the
floor has no parameters to update). Timed steps alternate between contestants in a rotating
order, round after round, so slow phases of the machine hit every contestant alike.

Before timing, the script proves that the two LoRA implementations compute the same thing:
the base weights of all three copies are compared, PEFT's LoRA factors are copied into
deltatune's, and the losses before and after one optimizer step must agree.

Peak memory cannot be attributed per contestant inside one process on the CPU, so each
contestant is re-run in a fresh subprocess (``--only NAME --measure-memory``) that reports its
peak above the loaded model: peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Example (about 2.5 minutes on 2 idle CPU cores)::

    HF_HUB_OFFLINE=1 python bench/lora_step.py --batch 4 --seq 128 --warmup 1 --steps 2 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model is local; never reach the hub
# transformers deprecation noise triggered inside peft.get_peft_model; not ours to fix
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import torch  # noqa: E402
from torch import nn  # noqa: E402

CONTESTANTS = ("deltatune", "peft", "floor")
ADAPTER_NAME = "default"  # both libraries' default adapter name
LEARNING_RATE = 1e-3  # large enough that one step visibly moves the loss in the check
#: relative loss agreement demanded of the two LoRA implementations, by compute dtype
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
_PEFT_PREFIX = "base_model.model."


# --- model and batch ----------------------------------------------------------------------


def load_base(args: argparse.Namespace) -> nn.Module:
    """SmolLM2-135M-Instruct (bundled) or the same architecture with random weights."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        )
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        from deltatune.models import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(None, dtype=dtype)
    return model.to(args.device).train()


def make_batch(args: argparse.Namespace, vocab_size: int) -> torch.Tensor:
    """Random token ids, the same for every contestant and every run of the script."""
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (args.batch, args.seq), generator=generator)
    return ids.to(args.device)


# --- contestants --------------------------------------------------------------------------


@dataclass
class Contestant:
    """A model ready to train, and the optimizer over its trainable parameters (None: floor)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int
    times_ms: list[float] = field(default_factory=list)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One training step; returns the loss (detached) computed before the update."""
        loss = self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LEARNING_RATE)


def build_deltatune(base: nn.Module, args: argparse.Namespace) -> Contestant:
    import deltatune as dt

    torch.manual_seed(args.seed)
    model = dt.attach(base, dt.LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=0.0, targets=["all-linear"]))
    params = dt.trainable_parameters(model)
    return Contestant("deltatune", model, _optimizer(params), sum(p.numel() for p in params))


def build_peft(base: nn.Module, args: argparse.Namespace) -> Contestant:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    return Contestant("peft", model, _optimizer(params), sum(p.numel() for p in params))


def build_floor(base: nn.Module, args: argparse.Namespace) -> Contestant:
    for p in base.parameters():
        p.requires_grad_(False)
    # with every weight frozen, autograd would skip the backward pass entirely; making the
    # embeddings' output require grad sends the gradient through every block, and no further
    base.enable_input_require_grads()
    return Contestant("floor", base, None, 0)


BUILDERS: dict[str, Callable[[nn.Module, argparse.Namespace], Contestant]] = {
    "deltatune": build_deltatune,
    "peft": build_peft,
    "floor": build_floor,
}


# --- correctness --------------------------------------------------------------------------


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model parameters under the plain model's names, whatever wraps them."""
    weights = {}
    for name, param in model.named_parameters():
        if "lora_" in name or ".deltas." in name:
            continue
        name = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".").replace(".base.", ".")
        weights[name] = param
    return weights


def _lora_pairs(dt_model: nn.Module, peft_model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Module path -> (deltatune delta, PEFT LoRA layer), checking both adapt the same modules."""
    from peft.tuners.lora import LoraLayer

    from deltatune.layer import delta_layers

    ours = {path: layer.deltas[ADAPTER_NAME] for path, layer in delta_layers(dt_model).items()}
    theirs = {
        name.removeprefix(_PEFT_PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    if ours.keys() != theirs.keys():
        raise SystemExit(f"adapted modules differ: only deltatune {sorted(ours.keys() - theirs.keys())}, "
                         f"only PEFT {sorted(theirs.keys() - ours.keys())}")
    return {path: (ours[path], theirs[path]) for path in ours}


def check_same_computation(contestants: dict[str, Contestant], input_ids: torch.Tensor, seed: int) -> dict:
    """Prove the contestants time the same computation; raises SystemExit if they do not."""
    dt_c, peft_c, floor_c = (contestants[n] for n in CONTESTANTS)
    reference = _base_weights(floor_c.model)
    for c in (dt_c, peft_c):
        weights = _base_weights(c.model)
        if weights.keys() != reference.keys() or not all(torch.equal(weights[k], reference[k]) for k in reference):
            raise SystemExit(f"{c.name}'s base weights differ from the floor's")

    # B = 0 at init in both libraries, so all three models must give the base model's loss
    with torch.no_grad():
        initial = {n: c.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()
                   for n, c in contestants.items()}

    # identical, non-trivial LoRA factors: PEFT's A and a small random B, copied into deltatune
    generator = torch.Generator().manual_seed(seed)
    pairs = _lora_pairs(dt_c.model, peft_c.model)
    with torch.no_grad():
        for ours, theirs in pairs.values():
            lora_a, lora_b = theirs.lora_A[ADAPTER_NAME].weight, theirs.lora_B[ADAPTER_NAME].weight
            lora_b.copy_(0.01 * torch.randn(lora_b.shape, generator=generator))
            if ours.scale != theirs.scaling[ADAPTER_NAME]:
                raise SystemExit(f"LoRA scales differ: {ours.scale} vs {theirs.scaling[ADAPTER_NAME]}")
            ours.A.copy_(lora_a)  # both store A as (r, in) and B as (out, r)
            ours.B.copy_(lora_b)

    before = {c.name: c.step(input_ids).item() for c in (dt_c, peft_c)}
    with torch.no_grad():
        after = {c.name: c.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()
                 for c in (dt_c, peft_c)}
        param_diff = max(
            max((ours.A - theirs.lora_A[ADAPTER_NAME].weight).abs().max().item(),
                (ours.B - theirs.lora_B[ADAPTER_NAME].weight).abs().max().item())
            for ours, theirs in pairs.values()
        )
    rtol = LOSS_RTOL[next(floor_c.model.parameters()).dtype]
    report = {
        "adapted_modules": len(pairs),
        "initial_loss": initial,
        "loss_before_step": before,
        "loss_after_step": after,
        "max_param_diff_after_step": param_diff,
        "rtol": rtol,
    }
    mismatches = [
        f"{what}: deltatune {losses['deltatune']:.7f} vs PEFT {losses['peft']:.7f}"
        for what, losses in (("before step", before), ("after step", after))
        if abs(losses["deltatune"] - losses["peft"]) > rtol * abs(losses["peft"])
    ]
    if abs(initial["deltatune"] - initial["floor"]) > rtol * abs(initial["floor"]) or \
            abs(initial["peft"] - initial["floor"]) > rtol * abs(initial["floor"]):
        mismatches.append(f"initial losses differ: {initial}")
    print(f"check: {len(pairs)} adapted modules; initial loss (B=0) "
          + ", ".join(f"{n} {v:.7f}" for n, v in initial.items()))
    for what, losses in (("before step", before), ("after step ", after)):
        diff = abs(losses["deltatune"] - losses["peft"])
        print(f"check: loss {what}: deltatune {losses['deltatune']:.7f}  PEFT {losses['peft']:.7f}  "
              f"|diff| {diff:.2e}")
    print(f"check: max |deltatune - PEFT| over A, B after the step: {param_diff:.2e}")
    if mismatches:
        raise SystemExit("deltatune and PEFT disagree (relative tolerance %g): %s" % (rtol, "; ".join(mismatches)))
    print(f"check: PASS (relative tolerance {rtol:g})")
    return report


# --- timing -------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(contestant: Contestant, input_ids: torch.Tensor, n: int, device: str) -> list[float]:
    """Run ``n`` steps, returning each one's wall time in milliseconds."""
    times = []
    for _ in range(n):
        _sync(device)
        start = time.perf_counter()
        contestant.step(input_ids)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run_timing(contestants: dict[str, Contestant], input_ids: torch.Tensor, args: argparse.Namespace) -> None:
    """Warm every contestant up, then ``rounds`` rounds of ``steps`` steps each, in rotating order."""
    for c in contestants.values():
        timed_steps(c, input_ids, args.warmup, args.device)
    order = list(contestants)
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            gc.collect()  # a collection inside a timed step would charge one contestant for all
            contestants[name].times_ms.extend(timed_steps(contestants[name], input_ids, args.steps, args.device))
        print(f"round {round_index + 1}/{args.rounds}: "
              + "  ".join(f"{n} {statistics.median(c.times_ms):.0f} ms" for n, c in contestants.items()),
              flush=True)


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Median and interquartile range of the step times."""
    q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 3
    return {"median_ms": median, "iqr_ms": q3 - q1, "q1_ms": q1, "q3_ms": q3, "n": len(times_ms)}


# --- memory -------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so loading the model does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_memory(contestant: Contestant, input_ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Peak memory above the loaded model (adapter attached) over the warm-up and timed steps.

    Covers gradients, optimizer state and activations. At least two steps run, since the
    optimizer state only exists from the first step's end on.
    """
    steps = max(2, args.warmup + args.steps)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed_steps(contestant, input_ids, steps, args.device)
        return {"peak_delta_mib": (torch.cuda.max_memory_allocated() - baseline) / 2**20,
                "method": "torch.cuda.max_memory_allocated"}
    current_kib = _status_kib("VmRSS")
    if current_kib is not None and _reset_peak_rss():
        timed_steps(contestant, input_ids, steps, args.device)
        return {"peak_delta_mib": (_status_kib("VmHWM") - current_kib) / 1024, "method": "VmHWM after clear_refs"}
    # fallback: ru_maxrss (KiB on Linux) only rises, so this is right only if the steps
    # outgrow the loading peak
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed_steps(contestant, input_ids, steps, args.device)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_delta_mib": (after - before) / 1024, "method": "ru_maxrss"}


def memory_in_subprocesses(args: argparse.Namespace) -> dict[str, dict]:
    """Run ``--only NAME --measure-memory`` in a fresh process per contestant."""
    results = {}
    for name in CONTESTANTS:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "memory.json")
            command = [sys.executable, os.path.abspath(__file__), "--only", name, "--measure-memory",
                       "--json", out, *_shared_flags(args)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                results[name] = json.load(f)["memory"]
        print(f"memory: {name} peak +{results[name]['peak_delta_mib']:.0f} MiB", flush=True)
    return results


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
             "--seq", str(args.seq), "--rank", str(args.rank), "--dtype", args.dtype,
             "--device", args.device, "--seed", str(args.seed)]
    flags += ["--threads", str(args.threads)] if args.threads else []
    return flags + (["--random-init"] if args.random_init else [])


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contestant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contestant first")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of alternating contestants")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--random-init", action="store_true",
                        help="same architecture with random weights (no model conversion)")
    parser.add_argument("--only", choices=CONTESTANTS, help="run a single contestant")
    parser.add_argument("--measure-memory", action="store_true",
                        help="with --only: report the contestant's peak memory instead of timing")
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.measure_memory and not args.only:
        parser.error("--measure-memory needs --only NAME (one fresh process per contestant)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given, but torch sees no CUDA device")
    if min(args.steps, args.rounds, args.batch, args.seq, args.rank) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --batch, --seq and --rank must be positive, --warmup not negative")
    return args


def build_contestants(args: argparse.Namespace, names: tuple[str, ...]) -> tuple[dict[str, Contestant], torch.Tensor]:
    """One loaded base, deep-copied per contestant before any adapter touches it."""
    base = load_base(args)
    input_ids = make_batch(args, base.config.vocab_size)
    copies = [copy.deepcopy(base) for _ in names[1:]] + [base]
    return {name: BUILDERS[name](model, args) for name, model in zip(names, copies)}, input_ids


def print_table(results: dict) -> None:
    config, rows = results["config"], results["contestants"]
    print(f"\nLoRA step, r={config['rank']}, batch {config['batch']}x{config['seq']}, {config['dtype']} on "
          f"{config['device']} ({config['model']}), {config['threads']} threads")
    print(f"{'contestant':<11}{'trainable':>11}{'median ms':>11}{'IQR ms':>9}{'n':>4}{'peak MiB':>10}")
    for name, row in rows.items():
        memory = row.get("memory")
        mem = f"{memory['peak_delta_mib']:.0f}" if memory else "-"
        print(f"{name:<11}{row['trainable']:>11,}{row['median_ms']:>11.1f}{row['iqr_ms']:>9.1f}{row['n']:>4}{mem:>10}")
    for label, key in (("ratios of medians", "ratios"), ("per-round ratios, median", "paired_ratios")):
        if results[key]:
            print(f"{label + ':':<26}" + "  ".join(f"{k} {v:.3f}" for k, v in results[key].items()))


def ratios(medians: dict[str, list[float]] | dict[str, float]) -> dict[str, float]:
    """deltatune/peft, deltatune/floor and peft/floor, for the contestants present.

    Given one number per contestant, the plain ratios; given one list per contestant (a median
    per round), the median over rounds of each round's ratio, which cancels slow phases of the
    machine that lasted a whole round.
    """
    out = {}
    for a, b in (("deltatune", "peft"), ("deltatune", "floor"), ("peft", "floor")):
        if a in medians and b in medians:
            x, y = medians[a], medians[b]
            out[f"{a}/{b}"] = statistics.median(p / q for p, q in zip(x, y)) if isinstance(x, list) else x / y
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (args.only,) if args.only else CONTESTANTS
    contestants, input_ids = build_contestants(args, names)
    results: dict = {"config": {**vars(args), "model": "random-init" if args.random_init else "SmolLM2-135M-Instruct",
                                "threads": torch.get_num_threads(), "torch": torch.__version__}}

    if args.measure_memory:
        results["memory"] = measure_memory(contestants[args.only], input_ids, args)
        print(f"{args.only}: peak +{results['memory']['peak_delta_mib']:.1f} MiB ({results['memory']['method']})")
    else:
        if not args.only:
            results["check"] = check_same_computation(contestants, input_ids, args.seed)
        run_timing(contestants, input_ids, args)
        results["contestants"] = {
            n: {"trainable": c.trainable, **summarize(c.times_ms), "times_ms": c.times_ms}
            for n, c in contestants.items()
        }
        results["ratios"] = ratios({n: row["median_ms"] for n, row in results["contestants"].items()})
        # each round added `steps` consecutive times per contestant
        results["paired_ratios"] = ratios({
            n: [statistics.median(c.times_ms[i:i + args.steps]) for i in range(0, len(c.times_ms), args.steps)]
            for n, c in contestants.items()
        })
        if not args.only:
            del contestants, input_ids  # free the three models before the memory subprocesses
            gc.collect()
            for name, memory in memory_in_subprocesses(args).items():
                results["contestants"][name]["memory"] = memory
        print_table(results)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
