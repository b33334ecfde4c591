"""Task heads (deltatune.heads): a new output layer per delta, its equation, where it goes in
each architecture, saving, switching and routing heads of different widths."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import deltatune as dt
from deltatune.heads import INIT_STD
from deltatune.layer import delta_layers
from zoo import randomize_delta, tiny_classifier, tiny_inputs

HEAD3 = dt.TaskHead("classify", labels=["a", "b", "c"])


def _head_delta(model, name):
    head = dt.deltas(model)[name].config.task_head
    return delta_layers(model)[head.module].deltas[name]


def test_head_equation_on_bert_pooled_output():
    """logits = W_h · pooler(h_[CLS]) + b_h, the base classifier's weights unused."""
    model = tiny_classifier("bert", num_labels=2)
    dt.attach(model, dt.LoRAConfig(r=4, task_head=HEAD3), "t")
    randomize_delta(model, "t")
    inputs = tiny_inputs("bert", model)
    head = _head_delta(model, "t")
    assert head.weight.shape == (3, 32) and head.bias.shape == (3,)
    pooled = model.bert(**inputs).pooler_output  # the LoRA delta is active inside the body too
    expected = pooled @ head.weight.T + head.bias
    torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-6, rtol=1e-6)


def test_new_head_starts_at_its_stated_init():
    torch.manual_seed(0)
    model = tiny_classifier("bert", num_labels=2)
    dt.attach(model, dt.LoRAConfig(task_head=dt.TaskHead("classify", labels=[str(i) for i in range(200)])), "t")
    head = _head_delta(model, "t")
    assert torch.count_nonzero(head.bias) == 0
    assert abs(head.weight.std().item() - INIT_STD) < 0.1 * INIT_STD


@pytest.mark.parametrize(
    "arch, tokens, module, train",
    [
        ("bert", False, "classifier", ()),
        ("roberta", False, "classifier.out_proj", ("classifier.dense",)),
        ("distilbert", False, "classifier", ("pre_classifier",)),
        ("llama", False, "score", ()),
        ("gpt2", False, "score", ()),
        ("bert", True, "classifier", ()),
        ("roberta", True, "classifier", ()),
        ("llama", True, "score", ()),
    ],
)
def test_head_found_trained_saved_and_reloaded(arch, tokens, module, train, tmp_path):
    """The head replaces the task model's output layer; new layers outside the body train as
    copies; the saved delta reloads onto a base with another width and other random head
    weights and gives identical logits."""
    model = tiny_classifier(arch, num_labels=2, tokens=tokens)
    dt.attach(model, dt.LoRAConfig(r=4, task_head=HEAD3), "t")
    resolved = dt.deltas(model)["t"].config.task_head
    assert (resolved.module, resolved.train) == (module, train)
    randomize_delta(model, "t")
    inputs = tiny_inputs(arch, model)
    logits = model(**inputs).logits
    assert logits.shape[-1] == 3 and logits.shape[0] == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.t." in n for n in trainable)
    assert any(n.startswith(module + ".deltas.t.") for n in trainable)
    dt.save(model, tmp_path)
    saved = json.loads((tmp_path / "delta_config.json").read_text())["config"]["task_head"]
    assert saved == {"task": "classify", "labels": ["a", "b", "c"], "module": module, "train": list(train),
                     "target_mean": 0.0, "target_std": 1.0}

    other = tiny_classifier(arch, num_labels=5, tokens=tokens, seed=0)
    with torch.no_grad():  # other random values in every layer the head owns
        for path in (module, *train):
            for p in other.get_submodule(path).parameters():
                p.normal_()
    dt.load(other, tmp_path)
    torch.testing.assert_close(other(**inputs).logits, logits, atol=0, rtol=0)


def test_deberta_pooler_is_part_of_the_head():
    config = tf.DebertaV2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    model = tf.DebertaV2ForSequenceClassification(config).eval()
    dt.attach(model, dt.LoRAConfig(r=2, task_head=HEAD3), "t")
    head = dt.deltas(model)["t"].config.task_head
    assert (head.module, head.train) == ("classifier", ("pooler.dense",))
    assert model(input_ids=torch.randint(4, 128, (2, 6))).logits.shape == (2, 3)


@pytest.mark.parametrize("method", ["lora", "houlsby", "pfeiffer", "bitfit", "ia3", "ln_tuning", "prompt", "prefix"])
def test_every_method_carries_a_head(method, tmp_path):
    model = tiny_classifier("bert")
    config = dt.config(method, task_head=HEAD3)
    dt.attach(model, config, "t")
    randomize_delta(model, "t")
    inputs = tiny_inputs("bert", model)
    logits = model(**inputs).logits
    assert logits.shape == (2, 3)
    dt.save(model, tmp_path)
    fresh = tiny_classifier("bert", num_labels=3)  # same body, a head of another width
    dt.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(**inputs).logits, logits, atol=1e-6, rtol=1e-6)


def test_bitfit_trains_biases_and_the_head():
    """BitFit's recipe for classification: the biases plus the new classifier."""
    model = tiny_classifier("bert")
    dt.attach(model, dt.BitFitConfig(task_head=HEAD3), "t")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "classifier.deltas.t.weight" in trainable
    others = [n for n in trainable if not n.startswith("classifier.")]
    assert others and all(n.endswith("delta_bias") for n in others)


def test_switching_deltas_switches_heads_and_routing_mixes_them():
    """Two tasks on one frozen encoder: 3 classes and a regression score. Each activated alone
    gives its own logits; a routed batch gives every row its task's logits, padded."""
    model = tiny_classifier("bert")
    dt.attach(model, dt.LoRAConfig(r=4, task_head=HEAD3), "topic")
    dt.attach(model, dt.BitFitConfig(task_head=dt.TaskHead("regression")), "score")
    randomize_delta(model, "topic", seed=1)
    randomize_delta(model, "score", seed=2)
    inputs = tiny_inputs("bert", model, batch=4)
    dt.activate(model, "topic")
    topic = model(**inputs).logits
    dt.activate(model, "score")
    score = model(**inputs).logits
    assert topic.shape == (4, 3) and score.shape == (4, 1)
    assert not torch.allclose(topic[:, :1], score)

    with dt.route(model, ["topic", "score", "score", "topic"]):
        mixed = model(**inputs).logits
    assert mixed.shape == (4, 3)
    torch.testing.assert_close(mixed[[0, 3]], topic[[0, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[[1, 2], :1], score[[1, 2]], atol=1e-5, rtol=1e-5)
    lowest = torch.finfo(mixed.dtype).min
    assert (mixed[[1, 2], 1:] == lowest).all()
    head = dt.deltas(model)["score"].config.task_head
    torch.testing.assert_close(head.own_logits(mixed[[1, 2]]), score[[1, 2]], atol=1e-5, rtol=1e-5)
    assert head.predict(mixed[[1, 2]]).shape == (2, 1)


def test_tagging_heads_route_per_sentence():
    model = tiny_classifier("bert", tokens=True)
    dt.attach(model, dt.LoRAConfig(r=4, task_head=dt.TaskHead("tag", labels=["O", "B-X", "I-X"])), "ner")
    dt.attach(model, dt.LoRAConfig(r=4, task_head=dt.TaskHead("tag", labels=["O", "B-Y"])), "pos")
    randomize_delta(model, "ner", seed=3)
    randomize_delta(model, "pos", seed=4)
    inputs = tiny_inputs("bert", model, batch=2)
    dt.activate(model, "ner")
    ner = model(**inputs).logits
    dt.activate(model, "pos")
    pos = model(**inputs).logits
    with dt.route(model, ["pos", "ner"]):
        mixed = model(**inputs).logits
    assert mixed.shape == (2, 8, 3)
    torch.testing.assert_close(mixed[1], ner[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0, :, :2], pos[0], atol=1e-5, rtol=1e-5)


def test_losses_and_predictions_follow_the_task():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.1, 3.0]])
    classify = dt.TaskHead("classify", labels=["a", "b", "c"])
    assert classify.predict(logits).tolist() == [0, 2]
    torch.testing.assert_close(classify.loss(logits, torch.tensor([0, 1])), F.cross_entropy(logits, torch.tensor([0, 1])))
    multi = dt.TaskHead("multilabel", labels=["a", "b", "c"])
    assert multi.predict(logits).tolist() == [[1, 0, 1], [0, 1, 1]]
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    # BCE by hand: −mean(y log σ(z) + (1 − y) log(1 − σ(z)))
    by_hand = -(targets * torch.sigmoid(logits).log() + (1 - targets) * (1 - torch.sigmoid(logits)).log()).mean()
    torch.testing.assert_close(multi.loss(logits, targets), by_hand)
    regression = dt.TaskHead("regression", target_mean=2.0, target_std=4.0)
    assert regression.num_outputs == 1
    # outputs z = (2.0, −0.3) against standardised scores ((6 − 2)/4, (2 − 2)/4) = (1, 0)
    torch.testing.assert_close(regression.loss(logits[:, :1], torch.tensor([[6.0], [2.0]])), torch.tensor((1.0 + 0.09) / 2))
    torch.testing.assert_close(regression.predict(logits[:, :1]), torch.tensor([[2.0 + 4.0 * 2.0], [2.0 - 4.0 * 0.3]]))
    with pytest.raises(dt.ConfigError, match="target_std must be a positive number, got 0"):
        dt.TaskHead("regression", target_std=0)
    tag = dt.TaskHead("tag", labels=["O", "B-X", "I-X"])
    sequence = logits.unsqueeze(0)  # one sentence of two tokens, the second ignored
    torch.testing.assert_close(tag.loss(sequence, torch.tensor([[2, -100]])), F.cross_entropy(logits[:1], torch.tensor([2])))


def test_merging_a_head_of_the_base_width():
    model = tiny_classifier("bert", num_labels=3)
    dt.attach(model, dt.LoRAConfig(r=4, task_head=HEAD3), "t")
    randomize_delta(model, "t")
    inputs = tiny_inputs("bert", model)
    before = model(**inputs).logits
    dt.merge(model, "t")
    torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=1e-5)
    dt.unmerge(model, "t")
    torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=1e-5)

    narrow = tiny_classifier("bert", num_labels=2)
    dt.attach(narrow, dt.LoRAConfig(r=4, task_head=HEAD3), "t")
    with pytest.raises(dt.ConfigError, match="3 outputs and the layer it stands in for has 2"):
        dt.merge(narrow, "t")


def test_heads_refuse_what_they_cannot_be():
    with pytest.raises(dt.ConfigError, match="task='sentiment' is not valid; allowed: classify, multilabel, regression, tag"):
        dt.TaskHead("sentiment", labels=["a", "b"])
    with pytest.raises(dt.ConfigError, match="at least 2 labels"):
        dt.TaskHead("classify", labels=["only"])
    with pytest.raises(dt.ConfigError, match="distinct; repeated: \\['a'\\]"):
        dt.TaskHead("classify", labels=["a", "b", "a"])
    with pytest.raises(dt.ConfigError, match="unknown task_head field"):
        dt.LoRAConfig(task_head={"task": "classify", "labels": ["a", "b"], "size": 3})
    round_trip = dt.DeltaConfig.from_dict(json.loads(dt.LoRAConfig(task_head=HEAD3).to_json()))
    assert round_trip.task_head == HEAD3

    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(dt.ConfigError, match="language-model head.*AutoModelForSequenceClassification"):
        dt.attach(lm, dt.LoRAConfig(task_head=HEAD3))

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.body(x)))

    with pytest.raises(dt.TargetError, match="not a Hugging Face task model"):
        dt.attach(Plain(), dt.LoRAConfig(task_head=HEAD3))
    with pytest.raises(dt.TargetError, match="'outt' does not exist. Closest existing names: out"):
        dt.attach(Plain(), dt.LoRAConfig(targets=["body"], task_head=dt.TaskHead("classify", ["a", "b", "c"], module="outt")))
    plain = Plain()
    dt.attach(plain, dt.LoRAConfig(targets=["body"], task_head=dt.TaskHead("classify", ["a", "b", "c"], module="out", train=[])))
    assert plain(torch.randn(4, 8)).shape == (4, 3)
    with pytest.raises(dt.CheckpointError, match="task head, which PEFT's format cannot store"):
        dt.save(plain, "/nonexistent", format="peft")


def test_heads_cannot_go_in_composition_blocks():
    model = tiny_classifier("bert")
    dt.attach(model, dt.HoulsbyConfig(task_head=HEAD3), "a")
    dt.attach(model, dt.HoulsbyConfig(), "b")
    with pytest.raises(dt.ConfigError, match="task head"):
        dt.activate(model, dt.Stack("a", "b"))


def test_plan_compare_and_inspect_resolve_a_task_head_as_attach_does(tmp_path):
    """Issue 20: dt.plan, dt.compare and `deltatune inspect --task` go through the placement
    attach uses, so they find the same head module and count the same parameters."""
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    model = tiny_classifier("bert", num_labels=3)
    config = dt.LoRAConfig(r=4, task_head=HEAD3)
    planned = dt.plan(model, config)
    comparison = dt.compare(model, [config, dt.BitFitConfig(task_head=HEAD3)])
    dt.attach(model, config)
    attached = {p for p, layer in delta_layers(model).items() if "default" in layer.deltas}
    assert set(planned.paths) == attached and "classifier" in planned.paths
    assert planned.delta_params == dt.count_parameters(model)[0]
    assert comparison.rows[0][1:3] == (len(planned.paths), planned.delta_params) and not comparison.rows[0][3]

    config_json = tmp_path / "config.json"
    model.config.to_json_file(config_json)
    result = CliRunner().invoke(app, ["inspect", "--config", str(config_json), "--task", "classify", "--labels", "3",
                                      "--r", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"trainable params: {planned.delta_params:,}" in result.output
    every = CliRunner().invoke(app, ["inspect", "--config", str(config_json), "--task", "classify", "--method", "all"],
                               catch_exceptions=False)
    assert every.exit_code == 0 and "bitfit" in every.output, every.output
