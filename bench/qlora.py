"""Time and size one QLoRA training step: deltatune vs Hugging Face PEFT, and vs plain LoRA.

Three configurations of SmolLM2-135M, each with LoRA r=8, alpha=16, dropout 0 on every linear
layer of the blocks (q, k, v, o, gate, up, down projections; not the LM head):

* ``peft-qlora``: base loaded straight into 4 bits by transformers (``BitsAndBytesConfig``: NF4,
  double quantization, compute dtype float32 on the CPU, bfloat16 on CUDA), then
  ``peft.prepare_model_for_kbit_training(use_gradient_checkpointing=False)`` and
  ``peft.get_peft_model(LoraConfig(target_modules=[the 7 projections]))``;
* ``dt-qlora``: the same 4-bit base, loaded the same way, then
  ``deltatune.prepare_for_kbit_training`` and ``deltatune.attach(LoRAConfig(...))``;
* ``dt-lora``: deltatune's LoRA on the unquantized fp32 model, the reference for what
  quantizing the base costs in time and saves in memory.

``--configs`` also offers ``dt-qlora-own``: the fp32 model quantized by ``deltatune.quantize``
(same bitsandbytes layers and settings) instead of by transformers' loader.

A step is forward, loss backward, AdamW step over the trainable parameters, zero_grad, on a
fixed batch of random token ids (labels = inputs). Every configuration lives in its own
subprocess (``--one NAME --worker``), so that its memory is its own; the parent drives them
over a pipe, one timed step at a time in rotating order, so that slow phases of the machine hit
every configuration alike. Warm-up steps are excluded from the times.

Per configuration the report gives: the trainable parameters (the script stops if the LoRA
configurations differ); the bytes the model stores in its parameters and buffers, counting the
4-bit layers' quantization constants and tied weights once; the step time (median and IQR);
the loss of the first step, taken before any update (B = 0), which must agree between the
configurations on the same 4-bit base. Memory, on the CPU: peak RSS of the process over its
whole life (``ru_maxrss``, including loading, where transformers holds fp32 weights while it
quantizes) and training RSS growth, the peak over the warm-up and timed steps (the kernel's
peak-RSS mark reset after loading) less the RSS after loading (freed heap handed back to the
system first): gradients, optimizer state and activations. Weights that transformers leaves as
views of the memory-mapped checkpoint are copied into memory of their own after loading (see
``deltatune.models.release_checkpoint_mapping``; ``--keep-mmap`` skips it), else the 4-bit
models would keep the whole fp32 file resident and the fp32 model would page its weights in
during the first steps. On CUDA the same two figures from ``torch.cuda.max_memory_allocated``. Ratios are against the reference measured in the same run.

Example (about 3 minutes on 2 idle CPU cores)::

    HF_HUB_OFFLINE=1 python bench/qlora.py
    HF_HUB_OFFLINE=1 python bench/qlora.py --one dt-qlora --steps 2   # one configuration alone
"""

from __future__ import annotations

import argparse
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model is local; never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no progress bars in the workers
# transformers deprecation noise triggered inside peft.get_peft_model; not ours to fix
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from deltatune.analysis.memory import reset_peak_memory, trim_heap  # noqa: E402
from deltatune.models import release_checkpoint_mapping  # noqa: E402

CONFIGS = ("peft-qlora", "dt-qlora", "dt-lora", "dt-qlora-own")
DEFAULT_CONFIGS = ("peft-qlora", "dt-qlora", "dt-lora")
#: (numerator, denominator) pairs printed as ratios, when both were run
RATIOS = (("dt-qlora", "peft-qlora"), ("dt-qlora", "dt-lora"), ("dt-qlora-own", "peft-qlora"))
#: configurations that must start from the same loss: the same 4-bit base, B = 0
SAME_BASE = ("peft-qlora", "dt-qlora", "dt-qlora-own")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16
LEARNING_RATE = 1e-4
#: relative agreement demanded of the first-step losses on the same base, by compute dtype
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
MARK = "@@qlora "  # prefixes the workers' protocol lines; anything else on stdout is ignored


# --- worker: one configuration in its own process ------------------------------------------


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_4bit(device: str) -> nn.Module:
    """The bundled model, quantized to NF4 (double quant) by transformers while loading."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from deltatune.models import bundled_model_dir

    dtype = compute_dtype(device)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    # the layers left unquantized load in the compute dtype; both libraries' prepare step
    # upcasts half-precision ones to fp32 (QLoRA's recipe)
    return AutoModelForCausalLM.from_pretrained(str(bundled_model_dir()), quantization_config=quantization,
                                                dtype=dtype, device_map={"": device})


def load(name: str, device: str, keep_mmap: bool) -> nn.Module:
    """The base of configuration ``name``: 4-bit for the QLoRA ones (the transformers loader's,
    or ``deltatune.quantize``'s for ``dt-qlora-own``), else fp32."""
    if name in ("peft-qlora", "dt-qlora"):
        model = load_4bit(device)
    else:
        model = load_fp32(device)
    model = model if keep_mmap else release_checkpoint_mapping(model)
    if name == "dt-qlora-own":
        import deltatune as dt

        # like the transformers loader: quantize from, and keep the rest in, the compute dtype
        # (prepare_for_kbit_training upcasts the rest to fp32 again); a no-op on the CPU
        model = dt.quantize(model.to(compute_dtype(device)), "nf4", double_quant=True,
                            compute_dtype=compute_dtype(device))
    return model


def load_fp32(device: str) -> nn.Module:
    from deltatune.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(None, dtype=torch.float32)
    return model.to(device)


def build(name: str, device: str, seed: int, keep_mmap: bool = False) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model of configuration ``name``, LoRA attached, and its trainable parameters."""
    import deltatune as dt

    model = load(name, device, keep_mmap)
    if name == "peft-qlora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=list(TARGETS), task_type="CAUSAL_LM"))
        return model.train(), [p for p in model.parameters() if p.requires_grad]
    if name in ("dt-qlora", "dt-qlora-own"):
        model = dt.prepare_for_kbit_training(model)
    torch.manual_seed(seed)
    model = dt.attach(model, dt.LoRAConfig(r=RANK, alpha=ALPHA, dropout=0.0, targets=("all-linear",)))
    return model.train(), dt.trainable_parameters(model)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers as stored, each tensor once (tied weights, shared
    level tables), with the 4-bit layers' quantization state (block constants, their own
    constants, code tables), which bitsandbytes keeps outside the module's parameters."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if tensor is None:
            return
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()

    for tensor in (*model.parameters(), *model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            if state.nested:
                add(state.state2.absmax)
                add(state.state2.code)
                add(state.offset)
    return total


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Worker:
    """One configuration, ready to train, and its memory marks."""

    name: str
    device: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    input_ids: torch.Tensor
    info: dict = field(default_factory=dict)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def steps(self, n: int) -> dict:
        """``n`` training steps; their wall times (ms) and losses (before each update)."""
        times, losses = [], []
        for _ in range(n):
            gc.collect()  # a collection inside a timed step would charge this configuration for all
            self.sync()
            start = time.perf_counter()
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids, use_cache=False).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
            losses.append(loss.item())
        return {"times_ms": times, "losses": losses}

    def memory(self) -> dict:
        """Peak over the whole process and growth over the steps, in MiB."""
        if self.device.startswith("cuda"):
            training_peak = torch.cuda.max_memory_allocated() / 2**20
            return {"method": "torch.cuda.max_memory_allocated",
                    "peak_mib": max(self.info["load_peak_mib"], training_peak),
                    "growth_mib": training_peak - self.info["loaded_mib"]}
        peak = max(_max_rss_mib(), self.info["load_peak_mib"])
        hwm = _status_kib("VmHWM")
        if self.info["hwm_reset"] and hwm is not None:
            growth, method = hwm / 1024 - self.info["loaded_mib"], "ru_maxrss; VmHWM after clear_refs"
        else:  # ru_maxrss only rises: right only if the steps outgrow loading
            growth, method = _max_rss_mib() - self.info["load_peak_mib"], "ru_maxrss only"
        return {"method": method, "peak_mib": peak, "growth_mib": growth}


def start_worker(args: argparse.Namespace) -> Worker:
    """Load and prepare configuration ``args.one``; set the memory marks after loading."""
    start = time.perf_counter()
    model, params = build(args.one, args.device, args.seed, args.keep_mmap)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                              generator=generator).to(args.device)
    load_s = time.perf_counter() - start
    info = {"config": args.one, "trainable": sum(p.numel() for p in params),
            "adapted": sum(1 for _, m in model.named_modules() if _is_adapted(m)),
            "stored_bytes": stored_bytes(model), "load_s": load_s, "threads": torch.get_num_threads()}
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        info["load_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        info["loaded_mib"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        trim_heap()
        info["load_peak_mib"] = _max_rss_mib()
        info["loaded_mib"] = (_status_kib("VmRSS") or 0) / 1024
        info["hwm_reset"] = reset_peak_memory(torch.device("cpu"))
    return Worker(args.one, args.device, model, optimizer, input_ids, info)


def _is_adapted(module: nn.Module) -> bool:
    """A layer carrying a LoRA: PEFT's ``LoraLayer`` or a deltatune ``DeltaLayer`` with a delta."""
    return hasattr(module, "lora_A") or (getattr(module, "is_delta_layer", False) and len(module.deltas) > 0)


def _emit(payload: dict) -> None:
    print(MARK + json.dumps(payload), flush=True)


def worker_main(args: argparse.Namespace) -> None:
    """``--one NAME``: alone, warm up, time, print one JSON line; with ``--worker``, take
    ``steps N`` / ``finish`` commands on stdin and answer each with a JSON line."""
    worker = start_worker(args)
    if not args.worker:
        warm = worker.steps(args.warmup)
        timed = worker.steps(args.steps)
        print(json.dumps({**worker.info, "first_loss": (warm["losses"] or timed["losses"])[0],
                          **summarize(timed["times_ms"]), "times_ms": timed["times_ms"],
                          "memory": worker.memory()}))
        return
    _emit({"ready": worker.info})
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["steps"]:
            _emit(worker.steps(int(command[1])))
        elif command == ["finish"]:
            _emit({"memory": worker.memory()})
            return
        else:
            raise SystemExit(f"worker {args.one}: unknown command {line!r}")


# --- parent: drive the workers, interleaved ------------------------------------------------


class WorkerProcess:
    """A ``--one NAME --worker`` subprocess; its stderr goes to a temporary file."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        command = [sys.executable, os.path.abspath(__file__), "--one", name, "--worker", *_shared_flags(args)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, bufsize=1)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.process.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-4000:]
        raise SystemExit(f"worker {self.name} exited with status {self.process.returncode}:\n{tail}")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--keep-mmap"] if args.keep_mmap else []
    flags += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
             "--seq-len", str(args.seq_len), "--device", args.device, "--seed", str(args.seed)]
    return flags + (["--threads", str(args.threads)] if args.threads else [])


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Median and interquartile range of the step times."""
    if len(times_ms) > 1:
        q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = median = q3 = times_ms[0]
    return {"median_ms": median, "iqr_ms": q3 - q1, "n": len(times_ms)}


def check_setup(rows: dict[str, dict], dtype: torch.dtype) -> None:
    """Same trainable parameters and adapted layers everywhere; same first loss on the same
    4-bit base. Raises SystemExit otherwise."""
    counts = {n: (r["trainable"], r["adapted"]) for n, r in rows.items()}
    print("check: trainable parameters (adapted layers): "
          + ", ".join(f"{n} {t:,} ({a})" for n, (t, a) in counts.items()))
    if len(set(counts.values())) > 1:
        raise SystemExit("check: FAIL, the configurations train different parameters")
    same = {n: rows[n]["first_loss"] for n in SAME_BASE if n in rows}
    print("check: first-step loss (B = 0): " + ", ".join(f"{n} {r['first_loss']:.7f}" for n, r in rows.items()))
    if same:
        reference = next(iter(same.values()))
        if any(abs(v - reference) > LOSS_RTOL[dtype] * abs(reference) for v in same.values()):
            raise SystemExit(f"check: FAIL, first losses on the same 4-bit base differ: {same}")
    print(f"check: PASS (same 4-bit base: relative tolerance {LOSS_RTOL[dtype]:g})")


def run_interleaved(args: argparse.Namespace) -> dict:
    names = args.configs
    workers: dict[str, WorkerProcess] = {}
    rows: dict[str, dict] = {}
    try:
        for name in names:  # one at a time: loading is not timed, but keep it off the others' cores
            workers[name] = WorkerProcess(name, args)
            rows[name] = workers[name].read()["ready"]
            print(f"loaded {name}: {rows[name]['load_s']:.1f} s", flush=True)
        for name in names:
            warm = workers[name].ask(f"steps {max(args.warmup, 1)}")
            rows[name]["first_loss"] = warm["losses"][0]
            rows[name]["times_ms"] = []
        check_setup(rows, compute_dtype(args.device))
        for step in range(args.steps):
            shift = step % len(names)
            for name in names[shift:] + names[:shift]:
                rows[name]["times_ms"] += workers[name].ask("steps 1")["times_ms"]
            if (step + 1) % 5 == 0 or step + 1 == args.steps:
                print(f"step {step + 1}/{args.steps}: "
                      + "  ".join(f"{n} {statistics.median(r['times_ms']):.0f} ms" for n, r in rows.items()),
                      flush=True)
        for name in names:
            rows[name]["memory"] = workers[name].ask("finish")["memory"]
            rows[name].update(summarize(rows[name]["times_ms"]))
    finally:
        for worker in workers.values():
            worker.close()
    return rows


def ratio_lines(rows: dict[str, dict], memory_label: str) -> list[str]:
    lines = []
    for a, b in RATIOS:
        if a not in rows or b not in rows:
            continue
        ra, rb = rows[a], rows[b]
        paired = statistics.median(x / y for x, y in zip(ra["times_ms"], rb["times_ms"]))
        lines.append(
            f"{a}/{b}: step time {ra['median_ms'] / rb['median_ms']:.2f}x (per-step pairs {paired:.2f}x), "
            f"{memory_label} {ra['memory']['peak_mib'] / rb['memory']['peak_mib']:.2f}x, "
            f"training growth {ra['memory']['growth_mib'] / rb['memory']['growth_mib']:.2f}x, "
            f"stored weights {ra['stored_bytes'] / rb['stored_bytes']:.2f}x"
        )
    return lines


def print_report(rows: dict[str, dict], args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    peak_label, growth_label = ("peak CUDA", "CUDA growth") if cuda else ("peak RSS", "train RSS+")
    threads = next(iter(rows.values()))["threads"]
    print(f"\nQLoRA step, LoRA r={RANK} alpha={ALPHA} on {len(TARGETS)} projections, batch "
          f"{args.batch_size}x{args.seq_len}, NF4 + double quant, compute {str(compute_dtype(args.device))[6:]}, "
          f"{args.device}, {threads} threads, {max(args.warmup, 1)} warm-up + {args.steps} timed steps")
    header = (f"{'config':<13}{'trainable':>11}{'stored MiB':>12}{'loaded MiB':>12}"
              f"{peak_label + ' MiB':>15}{growth_label + ' MiB':>16}"
              f"{'load s':>8}{'step ms':>9}{'IQR ms':>8}{'loss@1':>10}")
    print(header)
    for name, r in rows.items():
        memory = r["memory"]
        print(f"{name:<13}{r['trainable']:>11,}{r['stored_bytes'] / 2**20:>12.1f}{r['loaded_mib']:>12.0f}"
              f"{memory['peak_mib']:>15.0f}{memory['growth_mib']:>16.0f}"
              f"{r['load_s']:>8.1f}{r['median_ms']:>9.0f}{r['iqr_ms']:>8.0f}{r['first_loss']:>10.4f}")
    for line in ratio_lines(rows, peak_label):
        print(line)
    print(f"(memory: {next(iter(rows.values()))['memory']['method']})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first (at least 1 when comparing)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's choice)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--keep-mmap", action="store_true",
                        help="leave weights as views of the mapped checkpoint file (see release_checkpoint_mapping)")
    parser.add_argument("--one", choices=CONFIGS, help="run one configuration alone and print a JSON line")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # with --one: driven by the parent
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    args.configs = tuple(dict.fromkeys(c.strip() for c in args.configs.split(",") if c.strip()))
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given, but torch sees no CUDA device")
    if min(args.steps, args.batch_size, args.seq_len) < 1 or args.warmup < 0:
        parser.error("--steps, --batch-size and --seq-len must be positive, --warmup not negative")
    if args.worker and not args.one:
        parser.error("--worker needs --one NAME")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        worker_main(args)
        return
    rows = run_interleaved(args)
    print_report(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {**vars(args), "torch": torch.__version__}, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
