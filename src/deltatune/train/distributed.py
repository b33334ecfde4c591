"""Training on more than one process: data-parallel (DDP), FSDP2 and DeepSpeed ZeRO.

The launcher (``deltatune train --num-processes N``, ``torchrun`` or ``accelerate launch``)
starts N ranks; :func:`make_accelerator` joins them into one process group (gloo on CPU,
NCCL on CUDA: the same code) and refuses to go on when the group it got is not the one the
launcher started, which is how one-process "data-parallel" runs went unnoticed.

The data: each optimizer step takes one *global* batch of ``batch_size × N`` examples, the one
a single process with ``--batch-size batch_size × N`` takes, cut into N contiguous parts
(:func:`rank_share`). The loss each rank backpropagates is weighted by its share of the
global batch's loss terms (label tokens), so the gradient the ranks average is the gradient of
the global batch's mean loss, exactly as one process computes it.

``--fsdp`` shards the frozen base with FSDP2 (:func:`torch.distributed.fsdp.fully_shard`), a
group per block and one at the root, and keeps what trains whole on every rank: the deltas
are small, the core calls their methods directly (a fused LoRA product, an input transform),
which FSDP's forward hooks on a sharded delta would not see, and an fp32 delta beside a bf16
base never meets FSDP's one dtype per group. Their gradients are averaged over the ranks in
one collective per step (:func:`average_gradients`), so every rank holds the whole trained
delta and the main process saves it as a single process would. 4-bit quantized base weights
(bitsandbytes' ``Params4bit``, whose quantization state FSDP cannot carry through a shard) stay
whole too, already at 4 bits a value; the rest of the base shards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError

#: where launchers put the number of processes they started (torchrun/accelerate, MPI)
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
#: DeepSpeed ZeRO stages ``--deepspeed`` takes by name (or a DeepSpeed JSON config file)
DEEPSPEED_STAGES = {"zero2": 2, "zero3": 3}


def launched_world_size() -> int:
    """How many processes the launcher says it started (1 without a launcher)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value:
            return int(value)
    return 1


def _refuse_one_process_cpu_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` starts one process (without MPI its CPU
    launcher runs the script once) and says so nowhere; it leaves ACCELERATE_USE_CPU and the
    rendezvous port set without a world size, which is how it is recognised."""
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in os.environ
            and launched_world_size() == 1):
        raise ConfigError(
            "accelerate launch --cpu started one process: its CPU launcher runs several only under MPI "
            "(--mpirun_hostfile). Start N ranks with `deltatune train --num-processes N ...`, or "
            "`accelerate launch --multi_gpu --num_processes N -m deltatune train ...` (deltatune joins the "
            "ranks over gloo when there is no GPU), or `torchrun --nproc-per-node N -m deltatune train ...`")


def _on_cpu_group() -> bool:
    """Whether the ranks must join over gloo: several processes and no GPU (accelerate forms a
    CPU group only when told to run on CPU)."""
    return launched_world_size() > 1 and not torch.accelerator.is_available()


def distributed_state():
    """The process group of all the ranks the launcher started (accelerate's PartialState,
    which the Accelerator built later shares); refuses a group of another size."""
    from accelerate import PartialState

    _refuse_one_process_cpu_launch()
    world = launched_world_size()
    state = PartialState(cpu=_on_cpu_group())
    if state.num_processes != world:
        raise ConfigError(
            f"the launcher started {world} processes but this one joined a group of {state.num_processes}: "
            "each would train the whole run alone. Launch with `deltatune train --num-processes N`, torchrun "
            "or `accelerate launch --multi_gpu --num_processes N`")
    return state


def make_accelerator(*, fp16: bool, find_unused_parameters: bool = False, deepspeed: dict | None = None):
    """An Accelerator over the process group of :func:`distributed_state`. ``deepspeed``: a
    config from :func:`deepspeed_config`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    distributed_state()
    kwargs = {} if deepspeed is None else {"deepspeed_plugin": deepspeed_plugin(deepspeed)}
    return Accelerator(
        mixed_precision="fp16" if fp16 else "no", cpu=_on_cpu_group(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)], **kwargs)


def rank_share(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous part of a global batch (sizes differ by at most one)."""
    return list(batch[rank * len(batch) // world: (rank + 1) * len(batch) // world])


def loss_weight(terms: int, accelerator) -> float:
    """What a rank's mean loss is multiplied by so that the ranks' averaged gradients are the
    global batch's mean-loss gradient: world × (this rank's loss terms / all ranks' terms)."""
    if accelerator.num_processes == 1:
        return 1.0
    count = torch.tensor([float(terms)], device=accelerator.device)
    total = accelerator.reduce(count, reduction="sum").item()
    return accelerator.num_processes * terms / max(total, 1.0)


def mean_over_ranks(value: float, accelerator) -> float:
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="mean").item()


def broadcast_from_main(value, accelerator):
    """The main process's ``value`` on every rank (a picklable object)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


# FSDP2 ------------------------------------------------------------------------------------------

def _kept_whole(model: nn.Module) -> set[nn.Parameter]:
    """Parameters FSDP leaves unsharded: what trains (small, replicated, its gradients averaged
    by :func:`average_gradients`) and 4-bit quantized storage whose quantization state lives on
    the parameter object (bitsandbytes' ``Params4bit``), which a shard would not carry."""
    return {p for p in model.parameters() if p.requires_grad or getattr(p, "quant_state", None) is not None}


def shard_model(model: nn.Module) -> int:
    """Shard ``model``'s frozen base with FSDP2 in place, one group per block and one for the
    rest at the root; what trains and 4-bit storage stay whole on every rank. Returns how many
    blocks were sharded."""
    from torch.distributed.fsdp import fully_shard

    from ..anatomy import analyze

    whole = _kept_whole(model)
    blocks = [model.get_submodule(stack)[index] for stack in analyze(model).stacks
              for index in range(len(model.get_submodule(stack)))]
    for block in blocks:
        fully_shard(block, ignored_params=whole)
    fully_shard(model, ignored_params=whole)
    return len(blocks)


def frozen_values(model: nn.Module) -> tuple[int, int]:
    """(values of the frozen parameters this process holds, their total): a shard's under FSDP."""
    from torch.distributed.tensor import DTensor

    frozen = [p for p in model.parameters() if not p.requires_grad]
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in frozen)
    return held, sum(p.numel() for p in frozen)


def average_gradients(params: Sequence[nn.Parameter], accelerator) -> None:
    """Average the gradients of replicated parameters over the ranks (what DDP does for a model
    it wraps; FSDP leaves the parameters it does not shard to the caller), in one collective."""
    grads = [p.grad for p in params if p.grad is not None]
    if accelerator.num_processes == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(part.view_as(grad))


# DeepSpeed -----------------------------------------------------------------------------------

def deepspeed_config(choice: str, *, batch_size: int, grad_accum: int) -> dict:
    """The DeepSpeed config ``--deepspeed`` names: ``zero2``, ``zero3`` or a JSON file (whose
    ZeRO stage must be 2 or 3), with the run's batch sizes where the file leaves them out or
    "auto" (the trainer has no data loader for accelerate to read them from)."""
    import json

    if choice in DEEPSPEED_STAGES:
        config = {"zero_optimization": {"stage": DEEPSPEED_STAGES[choice]}}
    else:
        path = Path(choice)
        if not path.is_file():
            raise ConfigError(f"--deepspeed {choice!r} is neither {' nor '.join(DEEPSPEED_STAGES)} nor a JSON file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--deepspeed {choice}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"--deepspeed {choice}: a DeepSpeed config is a JSON object, got {type(config).__name__}")
    stage = (config.get("zero_optimization") or {}).get("stage")
    if stage not in (2, 3):
        raise ConfigError(f"--deepspeed {choice}: zero_optimization.stage is {stage!r}; deltatune runs ZeRO stage 2 or 3")
    for key, value in (("train_micro_batch_size_per_gpu", batch_size), ("gradient_accumulation_steps", grad_accum)):
        if config.get(key, "auto") == "auto":
            config[key] = value
    config.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch × accumulation × ranks
    return config


def deepspeed_plugin(config: dict):
    """accelerate's DeepSpeed plugin for a config of :func:`deepspeed_config`."""
    from accelerate.utils import DeepSpeedPlugin, is_deepspeed_available

    if not is_deepspeed_available():
        raise ConfigError("--deepspeed needs DeepSpeed: pip install deepspeed (the configuration is valid: "
                          f"ZeRO stage {config['zero_optimization']['stage']})")
    return DeepSpeedPlugin(hf_ds_config=config)


# the launcher shortcut ---------------------------------------------------------------------------

def launch(num_processes: int, arguments: Sequence[str]) -> int:
    """Run ``deltatune <arguments>`` as ``num_processes`` ranks through torch's launcher
    (torchrun, a free local port); returns the exit code. Each rank gets an equal share of
    the CPU cores for its threads unless OMP_NUM_THREADS says otherwise."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={num_processes}", "-m", "deltatune", *arguments]
    return subprocess.run(command, env=env).returncode


def without_option(arguments: Sequence[str], option: str) -> list[str]:
    """``arguments`` without ``option VALUE`` / ``option=VALUE``."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == option:
            skip = True
        elif not argument.startswith(option + "="):
            kept.append(argument)
    return kept
