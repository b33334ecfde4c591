"""IPT (Qin et al. 2021): the decoded prompt is the auto-encoder's output, the model reads it as
prompt tuning would, the reconstruction term, and a new task training only its intrinsic vector."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.layer import delta_layers
from deltatune.methods.ipt import IPTDelta
from zoo import tiny_inputs, tiny_model

CONFIG = dict(tasks=("dates", "times"), num_virtual_tokens=3, dimension=5, hidden_size=8)


def ipt_delta(model, name="default") -> IPTDelta:
    (delta,) = [layer.deltas[name] for layer in delta_layers(model).values()
                if name in layer.deltas and isinstance(layer.deltas[name], IPTDelta)]
    return delta


def perceptron(layers, x):
    """W₂ tanh(W₁ x + b₁) + b₂ from the Sequential's two Linear layers."""
    first, second = layers[0], layers[2]
    return F.linear(torch.tanh(F.linear(x, first.weight, first.bias)), second.weight, second.bias)


def test_the_decoded_prompt_is_the_auto_encoders_output():
    model = tiny_model("llama")
    dt.attach(model, dt.IPTConfig(**CONFIG))
    subspace = ipt_delta(model).subspace
    for index, task in enumerate(("dates", "times")):
        prompt = subspace.task_prompts[index]
        v = perceptron(subspace.encode, prompt.reshape(-1))                    # Proj(Pᵢ)
        expected = perceptron(subspace.decode, v).view(3, -1)                  # Proj_b(vᵢ)
        torch.testing.assert_close(subspace.prompt(task), expected)
        assert subspace.vector(task).shape == (5,)
    error = sum((subspace.prompt(t) - subspace.task_prompts[i]).pow(2).mean() for i, t in enumerate(("dates", "times"))) / 2
    torch.testing.assert_close(subspace.reconstruction_error(), error)
    ipt_delta(model).train()
    torch.testing.assert_close(dt.training_penalty(model), error)  # α = 1


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_the_model_reads_the_decoded_prompt_as_prompt_tuning_would(arch):
    ipt_model, prompt_model = tiny_model(arch), tiny_model(arch)
    inputs = tiny_inputs(arch, ipt_model, batch=4)
    dt.attach(ipt_model, dt.IPTConfig(**CONFIG))
    dt.attach(prompt_model, dt.PromptTuningConfig(num_virtual_tokens=3), "dates")
    dt.attach(prompt_model, dt.PromptTuningConfig(num_virtual_tokens=3), "times")
    subspace = ipt_delta(ipt_model).subspace
    with torch.no_grad():
        for task in ("dates", "times"):
            prompt_delta(prompt_model, task).prompt_embeddings.copy_(subspace.prompt(task))
        # one batch mixing the tasks equals each sample run with its task's decoded prompt
        tasks = ["dates", "times", "times", "dates"]
        with dt.IPTConfig(**CONFIG).task_batch(ipt_model, "default", tasks):
            mixed = ipt_model(**inputs).logits
        with dt.route(prompt_model, tasks):
            expected = prompt_model(**inputs).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


def prompt_delta(model, name):
    return next(layer.deltas[name] for layer in delta_layers(model).values()
                if hasattr(layer.deltas[name] if name in layer.deltas else None, "prompt_embeddings"))


def test_a_new_task_trains_only_its_intrinsic_vector(tmp_path):
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    config = dt.IPTConfig(**CONFIG)
    dt.attach(model, config)
    dt.save(model, tmp_path / "found")
    fresh = tiny_model("llama")
    dt.load(fresh, tmp_path / "found")
    what = dt.deltas(fresh)["default"].config.add_tasks(fresh, "default", ["numbers"])
    assert "intrinsic vectors" in what
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    trainable = dt.trainable_parameters(fresh)
    assert [p.shape for p in trainable] == [torch.Size([5])]
    config.select_task(fresh, "default", "numbers")
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    ipt_delta(fresh).train()
    for _ in range(3):
        loss = fresh(**inputs).logits.float().pow(2).mean() + dt.training_penalty(fresh)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [n for n, _ in fresh.named_parameters() if n.endswith("intrinsic.numbers")]
    # the saved delta knows the new task, and loads to the same outputs
    dt.save(fresh, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "delta_config.json").read_text())["config"]["intrinsic_tasks"] == ["numbers"]
    again = tiny_model("llama")
    dt.load(again, tmp_path / "new")
    config.select_task(again, "default", "numbers")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, fresh.eval()(**inputs).logits)


def test_refusals_name_the_problem():
    with pytest.raises(dt.ConfigError, match="several tasks"):
        dt.attach(tiny_model("llama"), dt.IPTConfig())
    with pytest.raises(dt.ConfigError, match="named once"):
        dt.IPTConfig(tasks=("a", "b"), intrinsic_tasks=("a",))
    model = tiny_model("llama")
    dt.attach(model, dt.IPTConfig(**CONFIG))
    with pytest.raises(dt.ConfigError, match="unknown task 'weather'"):
        dt.IPTConfig(**CONFIG).select_task(model, "default", "weather")


def test_deltatune_train_finds_the_subspace_then_learns_a_new_task_in_it(tiny_dir, data_file, tmp_path):
    runner = CliRunner()
    lines = data_file.read_text()
    for task in ("upper", "shout", "loud"):
        (tmp_path / f"{task}.jsonl").write_text(lines)
    common = ["--model", tiny_dir, "--method", "ipt", "--batch-size", 4, "--max-steps", 2, "--eval-limit", 1,
              "--max-new-tokens", 2, "--no-progress", "--set", "num_virtual_tokens=2", "--set", "dimension=4"]
    found = runner.invoke(app, [str(a) for a in ["train", *common, "--data", tmp_path / "upper.jsonl", "--data",
                                                  tmp_path / "shout.jsonl", "-o", tmp_path / "msf"]])
    assert found.exit_code == 0, found.output
    new = runner.invoke(app, [str(a) for a in ["train", *common, "--from-delta", tmp_path / "msf" / "delta",
                                                "--data", tmp_path / "loud.jsonl", "-o", tmp_path / "ist"]])
    assert new.exit_code == 0, new.output
    assert "new tasks loud: training only their intrinsic vectors (4 numbers each)" in " ".join(new.output.split())
    saved = json.loads((tmp_path / "ist" / "delta" / "delta_config.json").read_text())["config"]
    assert saved["tasks"] == ["upper", "shout"] and saved["intrinsic_tasks"] == ["loud"]
