"""deltatune models in transformers' Trainer and TRL's SFT and DPO trainers (deltatune.integrations).

* TRL, the real consumer: 5 steps of SFT and of DPO with a deltatune LoRA give the losses that
  the same runs with PEFT's LoRA of the same weights give (PEFT reads deltatune's export of the
  very tensors), to 1e-4. The LoRA starts with random A and B, so the policy differs from the
  base from the first step and DPO's reference (the base, with the delta off) is really used.
* No reference copy: DPO's reference owns no parameter and no second model object exists.
* transformers.Trainer: checkpoints hold the delta (either format) and no model weights,
  ``resume_from_checkpoint`` continues to the very deltas and losses of an uninterrupted run,
  and ``save_model`` writes what ``dt.load`` and ``peft.PeftModel.from_pretrained`` turn into
  the trained model's logits.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import deltatune as dt
from deltatune.errors import CheckpointError, ConfigError
from deltatune.integrations import ReferenceModel, delta_trainer, reference_model
from deltatune.io import restore

peft = pytest.importorskip("peft")  # in the test extra; the import keeps a clear message if absent
trl = pytest.importorskip("trl")  # in the test extra; TRL is an optional extra of deltatune itself
from datasets import Dataset  # noqa: E402  (TRL's own dependency)

LORA = dict(r=4, alpha=8.0, dropout=0.0)
STEPS = 5
#: what a run with an unusable checkpoint would look like
FULL_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def _lora_model(tiny_dir, perturbed: bool = True, seed: int = 1) -> tf.PreTrainedModel:
    """The tiny Llama with a LoRA on every linear layer: its own init (random A, B = 0), or with
    ``perturbed`` A and B both drawn at random, so that it changes the outputs from the start."""
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(seed)
    dt.attach(model, dt.LoRAConfig(**LORA))
    if perturbed:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in dt.trainable_parameters(model):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _peft_twin(tiny_dir, model, directory) -> torch.nn.Module:
    """PEFT's LoRA with ``model``'s delta weights, read by PEFT from deltatune's export."""
    dt.save(model, directory, format="peft")
    return peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tiny_dir), directory, is_trainable=True)


def _sums() -> Dataset:
    return Dataset.from_list([{"prompt": f"{i}+{i}=", "completion": f"{2 * i}"} for i in range(12)])


def _preferences() -> Dataset:
    return Dataset.from_list([{"prompt": f"{i}+{i}=", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(12)])


def _trl_run(kind: str, model, tokenizer, output_dir, trainer_class=None, **arguments):
    config_class, base_class, data = {
        "sft": (trl.SFTConfig, trl.SFTTrainer, _sums()),
        "dpo": (trl.DPOConfig, trl.DPOTrainer, _preferences()),
    }[kind]
    args = config_class(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0,
        disable_tqdm=True, **arguments,
    )
    trainer = (trainer_class or base_class)(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    return trainer


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_losses_equal_peft_lora_of_the_same_weights(kind, tiny_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    # DPO starts from LoRA's own init, B = 0: TRL's reference for a PEFT model that comes with an
    # adapter is a frozen copy of that adapter, deltatune's is the base, and the two agree only then
    ours = _lora_model(tiny_dir, perturbed=kind == "sft")
    theirs = _peft_twin(tiny_dir, ours, tmp_path / "start")
    ours_trainer = _trl_run(kind, ours, tokenizer, tmp_path / "ours", delta_trainer(getattr(trl, f"{kind.upper()}Trainer")))
    ours_trainer.train()
    theirs_trainer = _trl_run(kind, theirs, tokenizer, tmp_path / "theirs")
    theirs_trainer.train()
    ours_losses, theirs_losses = _losses(ours_trainer), _losses(theirs_trainer)
    assert len(ours_losses) == len(theirs_losses) == STEPS
    assert ours_losses == pytest.approx(theirs_losses, abs=1e-4, rel=0)
    assert len(set(ours_losses)) == STEPS  # it trains: every step's loss differs
    if kind == "dpo":  # policy == reference (the base) at the start; then the policy moves away from it
        assert ours_losses[0] == pytest.approx(math.log(2), abs=1e-6)
        assert ours_losses[-1] < math.log(2) - 1e-2


def test_dpo_reference_is_the_model_itself_with_its_delta_off(tiny_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    model = _lora_model(tiny_dir)

    def models_alive() -> int:  # LlamaForCausalLM objects (each also holds a LlamaModel, a PreTrainedModel too)
        gc.collect()
        return sum(isinstance(o, type(model)) for o in gc.get_objects())

    before = models_alive()
    copying = _trl_run("dpo", model, tokenizer, tmp_path, trl.DPOTrainer)  # TRL's own way: a second model
    assert models_alive() == before + 1 and copying.ref_model is not None
    del copying
    assert models_alive() == before
    trainer = _trl_run("dpo", model, tokenizer, tmp_path, delta_trainer(trl.DPOTrainer))
    assert models_alive() == before  # no second model
    assert isinstance(trainer.ref_model, ReferenceModel) and trainer.ref_model.model is model
    assert list(trainer.ref_model.parameters()) == []
    # every parameter any module the trainer holds is one of the model's
    held = {id(p) for value in vars(trainer).values() if isinstance(value, torch.nn.Module) for p in value.parameters()}
    assert held == {id(p) for p in model.parameters()}
    trainer.train()
    assert len(_losses(trainer)) == STEPS


def test_dpo_with_reference_log_probs_computed_before_training(tiny_dir, tmp_path):
    """TRL's precompute path runs the reference over the data first and caches the result under a
    hash of the reference's state: the base weights, which the reference's state_dict gives."""
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    runs = []
    for precompute in (False, True):
        trainer = _trl_run("dpo", _lora_model(tiny_dir, perturbed=False), tokenizer, tmp_path / str(precompute),
                           delta_trainer(trl.DPOTrainer), precompute_ref_log_probs=precompute)
        trainer.train()
        runs.append(_losses(trainer))
    assert runs[1] == pytest.approx(runs[0], abs=1e-5) and len(runs[0]) == STEPS


def test_reference_model_computes_the_base_and_leaves_the_model_alone(tiny_dir):
    model = _lora_model(tiny_dir)
    model.train()
    reference = reference_model(model)
    ids = torch.tensor([[5, 9, 12, 30, 7]])
    with torch.no_grad(), dt.disabled(model):
        base_logits, base_hidden = model(ids).logits, model.base_model(ids).last_hidden_state
    with torch.no_grad():
        adapted_logits = model(ids).logits
        assert torch.equal(reference(ids).logits, base_logits)
        assert torch.equal(reference.base_model(ids).last_hidden_state, base_hidden)
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the delta is on again after the reference ran
    reference.eval()
    assert model.training  # switching the reference to eval mode leaves the trained model in training mode
    keys = reference.state_dict().keys()
    assert keys and not any(".deltas." in k for k in keys)
    assert "model.layers.0.self_attn.q_proj.base.weight" in keys
    with pytest.raises(ConfigError, match="no delta attached"):
        reference_model(tf.AutoModelForCausalLM.from_pretrained(tiny_dir))


def _token_rows(tokenizer) -> list[dict[str, torch.Tensor]]:
    rows = []
    for i in range(16):
        ids = torch.tensor(tokenizer(f"{i}+{i}={2 * i};" * 2)["input_ids"][:12])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def _plain_trainer(model, tokenizer, output_dir, max_steps=4, save_format="deltatune", **arguments):
    args = tf.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_steps=2, report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0, disable_tqdm=True,
        **arguments,
    )
    return delta_trainer(tf.Trainer)(model=model, args=args, train_dataset=_token_rows(tokenizer),
                                     processing_class=tokenizer, save_format=save_format)


def _delta_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".deltas." in n}


@pytest.mark.parametrize("save_format", ["deltatune", "peft"])
def test_trainer_checkpoints_hold_the_delta_only_and_resume_exactly(save_format, tiny_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    model = _lora_model(tiny_dir)
    start = _delta_tensors(model)
    whole = _plain_trainer(model, tokenizer, tmp_path / "whole", save_format=save_format)
    whole.train()
    trained, whole_losses = _delta_tensors(model), _losses(whole)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    delta_files = {"deltatune": {"delta.safetensors", "delta_config.json"},
                   "peft": {"adapter_model.safetensors", "adapter_config.json"}}[save_format]
    assert delta_files <= files and not files & FULL_WEIGHT_FILES
    weights = checkpoint / sorted(f for f in delta_files if f.endswith(".safetensors"))[0]
    assert sum(t.numel() for t in load_file(weights).values()) == sum(t.numel() for t in trained.values())

    # a fresh model with another start resumes from step 2 to the same deltas and losses
    resumed_model = _lora_model(tiny_dir, seed=7)
    assert not all(torch.equal(start[n], t) for n, t in _delta_tensors(resumed_model).items())
    resumed = _plain_trainer(resumed_model, tokenizer, tmp_path / "resumed", save_format=save_format)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in _delta_tensors(resumed_model).items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=1e-6)
    # the resumed trainer's log starts with the checkpoint's two steps, then logs its own two
    assert _losses(resumed)[2:] == pytest.approx(whole_losses[2:], abs=1e-6) and len(whole_losses) == 4


@pytest.mark.parametrize("save_format", ["deltatune", "peft"])
def test_save_model_writes_a_delta_that_loads_to_the_same_logits(save_format, tiny_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    model = _lora_model(tiny_dir)
    trainer = _plain_trainer(model, tokenizer, tmp_path / "run", max_steps=2, save_format=save_format)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert not {p.name for p in (tmp_path / "final").iterdir()} & FULL_WEIGHT_FILES
    ids = torch.tensor([tokenizer("3+3=6;")["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        with dt.disabled(model):
            assert (model(ids).logits - expected).abs().max() > 1e-2  # the delta changes the logits
    fresh = tf.AutoModelForCausalLM.from_pretrained(tiny_dir)
    if save_format == "peft":
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "final")
    else:
        dt.load(fresh, tmp_path / "final")
        loaded = fresh
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_mistakes_are_named(tiny_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    with pytest.raises(ConfigError, match="transformers.Trainer or a subclass"):
        delta_trainer(object)
    with pytest.raises(ConfigError, match="with a delta attached"):
        _plain_trainer(tf.AutoModelForCausalLM.from_pretrained(tiny_dir), tokenizer, tmp_path)
    model = _lora_model(tiny_dir)
    with pytest.raises(ConfigError, match="save_format.*'gguf'.*deltatune.*peft"):
        _plain_trainer(model, tokenizer, tmp_path, save_format="gguf")
    adapter_model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir)
    dt.attach(adapter_model, dt.HoulsbyConfig())
    with pytest.raises(CheckpointError, match="'houlsby' has no equivalent in PEFT's format"):
        _plain_trainer(adapter_model, tokenizer, tmp_path, save_format="peft")  # at once, not at the first save
    with pytest.raises(ConfigError, match="peft_config would wrap the model"):
        delta_trainer(trl.SFTTrainer)(model=model, train_dataset=_sums(), processing_class=tokenizer,
                                      peft_config=peft.LoraConfig(r=2))
    dt.save(model, tmp_path / "one")
    other = _lora_model(tiny_dir)
    dt.attach(other, dt.LoRAConfig(r=2), "second")
    with pytest.raises(CheckpointError, match=r"holds the deltas \['default'\], but this model has \['default', 'second'\]"):
        restore(other, tmp_path / "one")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_the_same_deltas(reentrant, tiny_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    runs = []
    for checkpointing in (False, True):
        model = _lora_model(tiny_dir)
        trainer = _plain_trainer(model, tokenizer, tmp_path / str(checkpointing), max_steps=2,
                                 gradient_checkpointing=checkpointing,
                                 gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        trainer.train()
        assert model.is_activation_checkpointing == checkpointing
        runs.append((_losses(trainer), _delta_tensors(model)))
    (plain_losses, plain_deltas), (checkpointed_losses, checkpointed_deltas) = runs
    assert checkpointed_losses == pytest.approx(plain_losses, abs=1e-6)
    for name, value in checkpointed_deltas.items():
        torch.testing.assert_close(value, plain_deltas[name], rtol=0, atol=1e-6)


def test_load_best_model_at_end_restores_the_best_checkpoints_delta(tiny_dir, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    model = _lora_model(tiny_dir)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2, save_steps=2,
        eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=True,  # the eval loss falls, so "best" is the first checkpoint, not the last one trained
        report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
    )
    rows = _token_rows(tokenizer)
    trainer = delta_trainer(tf.Trainer)(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(tmp_path / "checkpoint-2")
    saved = dt.io.read_tensors(best)
    for path_and_name, value in saved.items():
        module_path, parameter = path_and_name.rsplit(".", 1)
        assert torch.equal(model.get_submodule(module_path).deltas["default"].get_parameter(parameter), value)
    last = dt.io.read_tensors(tmp_path / "checkpoint-6")
    assert not all(torch.equal(last[k], v) for k, v in saved.items())
