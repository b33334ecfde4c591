"""HyperFormer++ (shared hypernetwork adapters) checked against the paper's equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.layer import delta_layers
from deltatune.methods.hyper import HyperAdapter
from zoo import randomize_delta, tiny_inputs, tiny_model

E, K, T, M = 8, 16, 6, 4


def hyper_config(tasks=("a", "b"), **options):
    return dt.HyperFormerConfig(tasks=tasks, bottleneck=M, embedding_dim=E, projector_hidden=K, projected_dim=T, **options)


def randomize(model, name="hyper", seed=0):
    randomize_delta(model, name, seed, scale=0.5)


def network_of(model, name="hyper"):
    return next(d for layer in delta_layers(model).values() for n, d in layer.deltas.items() if n == name).network


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def adapters(model, name="hyper"):
    return {path: layer.deltas[name] for path, layer in delta_layers(model).items() if name in layer.deltas}


def test_parameter_count_follows_the_formula():
    model = tiny_model("llama")
    blocks = model.config.num_hidden_layers
    dt.attach(model, hyper_config(tasks=("a", "b", "c")), "hyper")
    d = model.config.hidden_size
    tasks, positions = 3, 2  # after attn.o and after ffn.down
    expected = (tasks + blocks + positions) * E + (3 * E * K + K) + (K * T + T) + 2 * d * M * T + 2 * d * T
    assert dt.deltas(model)["hyper"].num_params == expected
    assert len(dt.trainable_parameters(model)) == len(list(network_of(model).parameters()))
    # one adapter per block and position, all sharing one network that the checkpoint stores once
    found = adapters(model)
    assert len(found) == blocks * positions
    assert len({id(a.network) for a in found.values()}) == 1
    assert sum(1 for a in found.values() if a.saved_state()) == 1


def test_generated_shapes_and_every_block_and_position_differ():
    model = tiny_model("llama")
    dt.attach(model, hyper_config(), "hyper")
    randomize(model)
    d = model.config.hidden_size
    seen = []
    for adapter in adapters(model).values():
        down, up, gamma, beta = adapter.generated(["a", "b"])
        assert down.shape == (2, M, d) and up.shape == (2, d, M)
        assert gamma.shape == beta.shape == (2, d)
        assert not torch.equal(down[0], down[1])  # two tasks, two adapters
        seen.append(down[0])
    assert all(not torch.equal(seen[0], other) for other in seen[1:])
    assert len({(a.block_id, a.position_id) for a in adapters(model).values()}) == len(seen)


def test_layer_output_is_the_papers_equation():
    torch.manual_seed(0)
    model = tiny_model("llama")
    dt.attach(model, hyper_config(), "hyper")
    randomize(model)
    dt.set_task(model, "b")
    net = network_of(model)
    path, layer = next((p, l) for p, l in delta_layers(model).items() if p.endswith("mlp.down_proj") and ".1." in p)
    adapter = layer.deltas["hyper"]
    captured = {}
    layer.base.register_forward_hook(lambda mod, args, out: captured.update(h=out))
    layer.register_forward_hook(lambda mod, args, out: captured.update(out=out))
    model(**tiny_inputs("llama", model))
    # I = h_I([z_τ; e_l; e_p]) with h_I a two-layer ReLU MLP, written out by hand
    v = torch.cat([net.task_embedding("b"), net.layer_embeddings[adapter.block_id], net.position_embeddings[adapter.position_id]])
    first, second = net.projector[0], net.projector[2]
    i = second.weight @ torch.relu(first.weight @ v + first.bias) + second.bias
    d = model.config.hidden_size
    down = (net.down_generator.weight @ i).view(M, d)
    up = (net.up_generator.weight @ i).view(d, M)
    gamma, beta = net.gamma_generator.weight @ i, net.beta_generator.weight @ i
    h = captured["h"]
    u = F.gelu(h @ down.T) @ up.T
    normalized = (u - u.mean(-1, keepdim=True)) / torch.sqrt(u.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(captured["out"], h + gamma * normalized + beta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_identity_at_init(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model)
    before = logits(model, inputs)
    dt.attach(model, hyper_config(), "hyper")
    for task in ("a", "b"):
        dt.set_task(model, task)
        assert torch.equal(logits(model, inputs), before)


def test_a_task_must_be_chosen_when_there_are_several():
    model = tiny_model("llama")
    dt.attach(model, hyper_config(), "hyper")
    with pytest.raises(dt.ConfigError, match="set_task"):
        model(**tiny_inputs("llama", model))
    with pytest.raises(dt.ConfigError, match="unknown task 'c'.*'a', 'b'"):
        dt.set_task(model, "c")


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_task_route_equals_separate_runs(arch):
    model = tiny_model(arch)
    dt.attach(model, hyper_config(), "hyper")
    randomize(model)
    inputs = tiny_inputs(arch, model, batch=3)
    separate = {}
    for task in ("a", "b"):
        dt.set_task(model, task)
        separate[task] = logits(model, inputs)
    with dt.disabled(model):
        separate[None] = logits(model, inputs)
    tasks = ["b", None, "a"]
    with dt.task_route(model, tasks):
        mixed = logits(model, inputs)
    for row, task in enumerate(tasks):
        torch.testing.assert_close(mixed[row], separate[task][row], atol=2e-4, rtol=1e-4)  # T5 logits are unscaled


def test_task_route_with_beam_search_matches_separate_generation():
    model = tiny_model("llama")
    dt.attach(model, hyper_config(), "hyper")
    randomize(model)
    inputs = tiny_inputs("llama", model, batch=2)
    options = dict(max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    expected = []
    for row, task in enumerate(["b", "a"]):
        dt.set_task(model, task)
        expected.append(model.generate(**{k: v[row:row + 1] for k, v in inputs.items()}, **options)[0])
    with dt.task_route(model, ["b", "a"]):
        mixed = model.generate(**inputs, **options)
    for row in range(2):
        assert torch.equal(mixed[row][-4:], expected[row][-4:])


def test_new_task_trains_only_its_embedding():
    torch.manual_seed(0)
    model = tiny_model("llama")
    dt.attach(model, hyper_config(), "hyper")
    randomize(model)
    inputs = tiny_inputs("llama", model)
    before = {}
    for task in ("a", "b"):
        dt.set_task(model, task)
        before[task] = logits(model, inputs)
    snapshot = {k: v.clone() for k, v in network_of(model).state_dict().items()}

    dt.add_task(model, "c")
    net = network_of(model)
    assert [p for p in dt.trainable_parameters(model)] == [net.task_embedding("c")]
    # starts from the mean of the others
    torch.testing.assert_close(net.task_embedding("c"), (snapshot["task_embeddings.0"] + snapshot["task_embeddings.1"]) / 2)
    dt.set_task(model, "c")
    start = logits(model, inputs)
    optimizer = torch.optim.SGD(dt.trainable_parameters(model), lr=0.5)
    labels = inputs["input_ids"]
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = network_of(model).state_dict()
    for key, value in snapshot.items():
        assert torch.equal(after[key], value), key
    assert not torch.equal(after["task_embeddings.2"], torch.stack([snapshot["task_embeddings.0"], snapshot["task_embeddings.1"]]).mean(0))
    assert not torch.equal(logits(model, inputs), start)
    for task in ("a", "b"):
        dt.set_task(model, task)
        assert torch.equal(logits(model, inputs), before[task])
    assert dt.deltas(model)["hyper"].config.tasks == ("a", "b", "c")


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_materialized_adapters_reproduce_the_hypernetwork(arch, tmp_path):
    model = tiny_model(arch)
    dt.attach(model, hyper_config(), "hyper")
    randomize(model)
    inputs = tiny_inputs(arch, model)
    dt.set_task(model, "b")
    generated = logits(model, inputs)
    dt.materialize(model, "b", "b_adapter", activate=True)
    info = dt.deltas(model)["b_adapter"]
    assert info.config.method == "houlsby" and info.active and not dt.deltas(model)["hyper"].active
    torch.testing.assert_close(logits(model, inputs), generated, atol=1e-6, rtol=0)
    # a plain adapter, saved and loaded without any hypernetwork
    dt.save(model, tmp_path / "b", "b_adapter")
    fresh = tiny_model(arch)
    dt.load(fresh, tmp_path / "b")
    torch.testing.assert_close(logits(fresh, inputs), generated, atol=1e-6, rtol=0)


def test_save_load_keeps_every_task_including_added_ones(tmp_path):
    model = tiny_model("llama")
    dt.attach(model, hyper_config(), "hyper")
    randomize(model)
    dt.add_task(model, "c", init_from="a")
    with torch.no_grad():
        network_of(model).task_embedding("c").add_(1.0)
    inputs = tiny_inputs("llama", model)
    expected = {}
    for task in ("a", "b", "c"):
        dt.set_task(model, task)
        expected[task] = logits(model, inputs)
    dt.save(model, tmp_path / "hyper")
    fresh = tiny_model("llama")
    dt.load(fresh, tmp_path / "hyper")
    for task in ("a", "b", "c"):
        dt.set_task(fresh, task)
        assert torch.equal(logits(fresh, inputs), expected[task])


def test_joint_training_on_a_multi_task_batch_separates_the_tasks():
    torch.manual_seed(0)
    model = tiny_model("llama")
    dt.attach(model, hyper_config(), "hyper")
    inputs = tiny_inputs("llama", model, batch=2)
    # the same inputs under two tasks with different targets: only the task embedding tells them apart
    ids = torch.cat([inputs["input_ids"]] * 2)
    labels = torch.cat([inputs["input_ids"], inputs["input_ids"].flip(1)])
    tasks = ["a", "a", "b", "b"]
    optimizer = torch.optim.Adam(dt.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(20):
        with dt.task_route(model, tasks):
            out = model(input_ids=ids).logits
        loss = F.cross_entropy(out.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0]
    with dt.task_route(model, tasks):
        out = logits(model, {"input_ids": ids})
    assert (out[:2] - out[2:]).abs().max() > 1e-2


def test_config_errors_name_the_bad_value():
    with pytest.raises(dt.ConfigError, match="duplicates"):
        dt.HyperFormerConfig(tasks=["a", "a"])
    with pytest.raises(dt.ConfigError, match="task names must be"):
        dt.HyperFormerConfig(tasks=["a b"])
    with pytest.raises(dt.ConfigError, match="embedding_dim must be a positive integer"):
        dt.HyperFormerConfig(embedding_dim=0)
    assert dt.HyperFormerConfig(tasks="x, y").tasks == ("x", "y")
    model = tiny_model("llama")
    with pytest.raises(dt.ConfigError, match="hyperformer deltas on this model: none"):
        dt.set_task(model, "a")
    dt.attach(model, hyper_config(), "hyper")
    with pytest.raises(dt.ConfigError, match="already exists"):
        dt.add_task(model, "a")
    with dt.task_route(model, ["a", "b"]):
        with pytest.raises(dt.ConfigError, match="task_route"):
            with dt.route(model, ["hyper", None]):
                pass
    assert isinstance(next(iter(adapters(model).values())), HyperAdapter)


def test_inference_reuses_the_generated_matrices_until_a_parameter_changes():
    model = tiny_model("llama")
    dt.attach(model, hyper_config(), "hyper")
    randomize(model)
    dt.set_task(model, "a")
    inputs = tiny_inputs("llama", model)
    adapter = next(iter(adapters(model).values()))
    with torch.no_grad():
        first = adapter.generated(["a"])
        assert adapter.generated(["a"])[0] is first[0]
        before = model(**inputs).logits
        network_of(model).up_generator.weight.mul_(2.0)
        changed = adapter.generated(["a"])
        assert changed[1] is not first[1]
        after = model(**inputs).logits
    torch.testing.assert_close(changed[1], 2 * first[1])
    assert not torch.equal(after, before)
    # with gradients, the matrices are generated afresh and carry the graph
    assert adapter.generated(["a"])[0].requires_grad
    torch.testing.assert_close(model(**inputs).logits.detach(), after, atol=1e-6, rtol=0)
