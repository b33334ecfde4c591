"""More than one process, for real: gloo on CPU, 2 ranks started by the launchers users run.

Every 2-process run is compared with one process training the same global batch (8 = 2 × 4)
for the same steps. In fp32 the deltas agree to 1e-5 (the ranks' gradients are summed in
another order than one process sums them). Three launches cover it all: ``deltatune train
--num-processes 2`` (LoRA, data-parallel, checkpoints resumed by one process), torchrun with
several runs in the same ranks (a bottleneck adapter and prompt tuning data-parallel; LoRA
under FSDP2 on an fp32, a bf16 and an NF4 base), and ``accelerate launch --cpu``, refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.errors import CheckpointError, ConfigError
from deltatune.train.settings import TrainSettings
from deltatune.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore")

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 4
FP32_ATOL = 1e-5


def _common(tiny_dir, data_file) -> dict:
    # settings the conftest fixes for in-process runs are given explicitly: the ranks are other processes
    return dict(model=str(tiny_dir), data=str(data_file), max_steps=STEPS, precision="fp32", attention="model",
                eval_limit=1, max_new_tokens=2, samples=1)


def _environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _one_process(directory: Path, **settings) -> Path:
    Trainer(TrainSettings(output_dir=str(directory), **settings), log=lambda _m: None, progress=False).run()
    return directory / "delta"


def _tensors(delta_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(delta_dir / "delta.safetensors"))


def _assert_same(a: Path, b: Path, atol: float) -> None:
    first, second = _tensors(a), _tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].abs().max() > 0, key  # trained, not an initial zero compared with another
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=atol, msg=key)


def _summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def cli_ddp(tmp_path_factory, tiny_dir, data_file):
    """``deltatune train --num-processes 2``: LoRA, batch 4 per rank, a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("cli-ddp")
    c = _common(tiny_dir, data_file)
    _run([sys.executable, "-m", "deltatune", "train", "--num-processes", "2", "--model", c["model"], "--data", c["data"],
          "--max-steps", str(STEPS), "--batch-size", "4", "--save-every", "2", "--precision", "fp32",
          "--attention", "model", "--eval-limit", "1", "--max-new-tokens", "2", "--no-progress", "-o", "run"], root)
    return root / "run"


RUNS = {  # name: (method, precision, quantize, fsdp)
    "houlsby": ("houlsby", "fp32", None, False),
    "prompt": ("prompt", "fp32", None, False),
    "fsdp": ("lora", "fp32", None, True),
    "fsdp-bf16": ("lora", "bf16", None, True),
    "fsdp-nf4": ("lora", "fp32", "nf4", True),
}


def _settings(name: str, c: dict, processes: int = 2) -> dict:
    """The run's settings; its one-process reference trains plainly, without FSDP."""
    method, precision, quantize, fsdp = RUNS[name]
    return {**c, "method": method, "precision": precision, "quantize": quantize, "fsdp": fsdp and processes > 1}


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory, tiny_dir, data_file):
    """The other 2-process runs, one torchrun launch."""
    root = tmp_path_factory.mktemp("torchrun")
    c = _common(tiny_dir, data_file)
    specs = [{**_settings(name, c), "batch_size": 4, "output_dir": str(root / name)} for name in RUNS]
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
          str(Path(__file__).with_name("distributed_runs.py")), json.dumps(specs)], root)
    return root


def test_ddp_lora_equals_one_process_with_the_global_batch(cli_ddp, tmp_path, tiny_dir, data_file):
    reference = _one_process(tmp_path / "one", **_common(tiny_dir, data_file), batch_size=8)
    _assert_same(cli_ddp / "delta", reference, FP32_ATOL)
    two, one = _summary(cli_ddp), _summary(tmp_path / "one")
    assert two["processes"] == 2 and len(two["training_peak_memory_mib_per_process"]) == 2
    # the loss logged is the global batch's mean, averaged across the ranks
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=1e-5)


def test_a_two_process_checkpoint_resumes_in_one_process(cli_ddp, tmp_path, tiny_dir, data_file):
    c = _common(tiny_dir, data_file)
    reference = _one_process(tmp_path / "one", **c, batch_size=8)
    resumed = tmp_path / "resumed"
    shutil.copytree(cli_ddp, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:06d}")  # the newest left is step 2, mid-run
    shutil.rmtree(resumed / "delta")
    # the global batch (8) is what must match: 2 × 4 then, 1 × 8 now
    _one_process(resumed, **c, batch_size=8, save_every=2, resume=True)
    _assert_same(resumed / "delta", reference, FP32_ATOL)
    with pytest.raises(ConfigError, match="batch_size: 8 -> 4"):  # another global batch: another data order
        _one_process(resumed, **c, batch_size=4, save_every=2, resume=True)


@pytest.mark.parametrize("name", ["houlsby", "prompt", "fsdp", "fsdp-nf4"])
def test_two_processes_equal_one_process(torchrun_runs, tmp_path, tiny_dir, data_file, name):
    if RUNS[name][2] == "nf4":
        pytest.importorskip("bitsandbytes")
    reference = _one_process(tmp_path / name, **_settings(name, _common(tiny_dir, data_file), 1), batch_size=8)
    _assert_same(torchrun_runs / name / "delta", reference, FP32_ATOL)


def test_fsdp_shards_the_base_and_saves_the_delta_whole(torchrun_runs, tmp_path, tiny_dir, data_file):
    """The main process held about half of the frozen base; the delta it saved, loaded into a
    plain one-process model, gives the logits of the delta one process trained."""
    from deltatune.io import load
    from deltatune.models import load_model_and_tokenizer

    total = sum(p.numel() for p in load_model_and_tokenizer(str(tiny_dir))[0].parameters())
    assert _summary(torchrun_runs / "fsdp")["frozen_values_on_main_process"] < 0.6 * total
    reference = _one_process(tmp_path / "one", **_settings("fsdp", _common(tiny_dir, data_file), 1), batch_size=8)
    ids = torch.tensor([[5, 17, 30, 42, 8, 9]])
    logits = []
    for delta in (torchrun_runs / "fsdp" / "delta", reference, None):
        model = load_model_and_tokenizer(str(tiny_dir))[0].eval()
        if delta is not None:
            load(model, delta)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)
    assert not torch.allclose(logits[0], logits[2], atol=1e-4)  # the trained delta changes them


def test_fsdp_on_a_bf16_base(torchrun_runs, tmp_path, tiny_dir, data_file):
    """An fp32 delta beside a bf16 base. bf16 products differ in their last bits with the batch
    shape (4 rows per rank against 8), and AdamW turns a near-zero gradient's sign into a whole
    step, so the deltas agree to one learning-rate step (2e-3 for LoRA) and the losses to 1e-3."""
    reference = _one_process(tmp_path / "bf16", **_settings("fsdp-bf16", _common(tiny_dir, data_file), 1), batch_size=8)
    _assert_same(torchrun_runs / "fsdp-bf16" / "delta", reference, atol=2e-3 + 1e-6)
    assert _summary(torchrun_runs / "fsdp-bf16")["train_losses"] == pytest.approx(
        _summary(tmp_path / "bf16")["train_losses"], rel=1e-3)
    assert _summary(torchrun_runs / "fsdp-bf16")["precision"] == "bf16"


def test_accelerate_cpu_launch_of_one_process_is_refused(tmp_path, tiny_dir, data_file):
    """``accelerate launch --cpu --num_processes 2`` runs the script once; deltatune says so."""
    c = _common(tiny_dir, data_file)
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "deltatune", "train", "--model", c["model"],
         "--data", c["data"], "--max-steps", "1", "-o", str(tmp_path / "run")],
        env=_environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stderr[-3000:]  # the launcher reports the run's exit code 2 as 1
    assert "started one process" in done.stderr and "--num-processes" in done.stderr
    assert not (tmp_path / "run" / "delta").exists()


def test_a_save_that_would_write_an_empty_tensor_is_refused(tmp_path):
    """What ZeRO-3 leaves in a parameter outside its gather: an empty placeholder."""
    from zoo import tiny_model

    import deltatune as dt
    from deltatune.layer import delta_layers

    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=2))
    path, layer = next(iter(delta_layers(model).items()))
    parameter = layer.deltas["default"].A
    parameter.ds_numel = parameter.numel()  # as DeepSpeed records the size it partitioned away
    parameter.data = torch.empty(0)
    with pytest.raises(CheckpointError, match=rf"refusing to save {path}\..*empty"):
        dt.save(model, tmp_path / "delta")
    assert not (tmp_path / "delta" / "delta.safetensors").exists()


def test_deepspeed_configurations_are_checked_when_built(tmp_path):
    from deltatune.train.distributed import deepspeed_config

    assert deepspeed_config("zero3", batch_size=4, grad_accum=2)["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(ConfigError, match="neither zero2 nor zero3"):
        TrainSettings(deepspeed="zero1")
    stage1 = tmp_path / "ds.json"
    stage1.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="stage is 1"):
        TrainSettings(deepspeed=str(stage1))
    with pytest.raises(ConfigError, match="choose one"):
        TrainSettings(deepspeed="zero2", fsdp=True)
    stage2 = tmp_path / "ds2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    assert deepspeed_config(str(stage2), batch_size=4, grad_accum=1)["train_micro_batch_size_per_gpu"] == 4


def test_the_memory_estimate_per_process_under_each_sharding():
    """One process's lines of N = 2: DDP replicates (and adds its gradient buckets), FSDP halves
    the frozen base (plus the blocks it gathers), ZeRO-2 halves gradients and optimizer states,
    ZeRO-3 the weights too."""
    from zoo import tiny_model

    import deltatune as dt
    from deltatune.analysis.memory import estimate_training_memory

    model = tiny_model("llama")
    dt.attach(model, dt.LoRAConfig(r=4))
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    one = estimate_training_memory(model, batch_size=2, seq_len=16)
    per = {s: estimate_training_memory(model, batch_size=2, seq_len=16, processes=2, sharding=s)
           for s in ("ddp", "fsdp", "zero2", "zero3")}
    assert per["ddp"]["model weights"] == one["model weights"] == frozen + trainable
    assert per["ddp"]["DDP gradient buckets"] == trainable
    assert per["fsdp"]["model weights"] == frozen // 2 + trainable
    # two blocks and the root of a 2-block model are all of it: the shards of the other rank
    assert per["fsdp"]["gathered weights (2 blocks + root)"] == frozen - frozen // 2
    assert per["fsdp"]["gradients"] == trainable
    assert per["zero2"]["gradients"] == trainable // 2
    assert per["zero2"]["optimizer states (adamw)"] == one["optimizer states (adamw)"] // 2
    assert per["zero3"]["model weights"] == (frozen + trainable) // 2
    assert per["fsdp"].total < per["ddp"].total


def test_advise_for_several_devices_names_the_launch():
    from deltatune.analysis.advise import advise

    advice = advise(5000, memory="2GB", device="cpu", dtype="fp32", batch_size=4, seq_len=64,
                    processes=2, sharding="fsdp")
    assert "--num-processes 2 --fsdp" in advice.command()
    assert "per device, 2 devices (fsdp" in str(advice)
