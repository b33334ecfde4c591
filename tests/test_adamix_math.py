"""AdaMix (Wang et al. 2022): uniform stochastic routing, the chosen copies' equation while
training, averaged copies at inference (merged ≡ averaged; folded ≡ averaged), the consistency
loss, and training through ``deltatune train``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.layer import delta_layers
from deltatune.methods.adamix import MixedBottleneck
from deltatune.models import load_model_and_tokenizer
from deltatune.train.objectives import symmetric_kl, two_pass_loss
from zoo import tiny_inputs, tiny_model


def random_mixture(copies=4, width=6, size=3):
    mixture = MixedBottleneck(copies, width, size, F.relu, torch.float32, None)
    with torch.no_grad():
        for p in mixture.parameters():
            p.normal_()
    return mixture


def test_routing_is_uniform_and_independent_over_copies():
    torch.manual_seed(0)
    mixture = random_mixture(copies=4).train()
    h = torch.randn(2, 6)
    draws = 4000
    pairs = torch.zeros(4, 4)
    for _ in range(draws):
        mixture(h)
        i, j = mixture.last_route
        pairs[i, j] += 1

    def chi_square(counts):
        expected = counts.sum() / counts.numel()
        return float(((counts - expected) ** 2 / expected).sum())

    # 99.9% quantiles of χ² with 3 and 15 degrees of freedom: 16.27 and 37.70
    assert chi_square(pairs.sum(1)) < 16.27 and chi_square(pairs.sum(0)) < 16.27
    assert chi_square(pairs.flatten()) < 37.70


def test_training_forward_uses_the_drawn_copies_and_eval_their_average():
    mixture = random_mixture()
    h = torch.randn(5, 6)
    mixture.train()
    out = mixture(h)
    i, j = mixture.last_route
    expected = F.linear(F.relu(F.linear(h, mixture.down_weight[i], mixture.down_bias[i])),
                        mixture.up_weight[j], mixture.up_bias[j])
    torch.testing.assert_close(out, expected)
    mixture.eval()
    mean = {n: p.mean(0) for n, p in mixture.named_parameters()}
    expected = F.linear(F.relu(F.linear(h, mean["down_weight"], mean["down_bias"])), mean["up_weight"], mean["up_bias"])
    torch.testing.assert_close(mixture(h), expected)
    assert mixture.last_route is None


def perturbed(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def test_lora_mixture_merges_its_averaged_factors():
    model = tiny_model("llama").eval()
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.AdaMixLoRAConfig(r=2, copies=3, alpha=4, targets=["attn.q"]))
    perturbed(model)
    layer = delta_layers(model)["model.layers.0.self_attn.q_proj"]
    delta = layer.deltas["default"]
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(3, w0.shape[1])
    expected = x @ (w0 + 2.0 * delta.B.mean(0) @ delta.A.mean(0)).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        dt.merge(model)
        torch.testing.assert_close(layer.base.weight, w0 + 2.0 * delta.B.mean(0) @ delta.A.mean(0))
        torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    delta.train()
    out = layer(x)
    i, j = delta.last_route
    torch.testing.assert_close(out, x @ (w0 + 2.0 * delta.B[j] @ delta.A[i]).T, atol=1e-5, rtol=1e-5)


def test_folding_keeps_one_averaged_copy_and_reloads(tmp_path):
    model = tiny_model("llama").eval()
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.AdaMixConfig(bottleneck=4, copies=4))
    perturbed(model)
    with torch.no_grad():
        averaged = model(**inputs).logits
    assert dt.fold(model) == 2
    assert all(p.shape[0] == 1 for p in dt.trainable_parameters(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, averaged, atol=1e-6, rtol=1e-6)
    dt.save(model, tmp_path / "deploy")
    fresh = tiny_model("llama").eval()
    dt.load(fresh, tmp_path / "deploy")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, averaged, atol=1e-6, rtol=1e-6)


def test_symmetric_kl_matches_its_definition():
    first, second = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    p, q = first.softmax(-1), second.softmax(-1)
    by_hand = 0.5 * ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    torch.testing.assert_close(symmetric_kl(first, second), by_hand)
    assert float(symmetric_kl(first, first)) == 0.0


class _LogitsLoss:
    """An objective whose loss is the logits' mean square (any objective calls the model)."""

    def loss(self, model, batch):
        return model(**batch).logits.float().pow(2).mean()


def test_two_pass_loss_is_the_mean_loss_plus_weighted_kl_of_two_routes():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", model)
    dt.attach(model, dt.AdaMixConfig(bottleneck=4, copies=4, consistency=0.7))
    perturbed(model)
    model.train()
    assert dt.consistency_weight(model) == 0.7
    torch.manual_seed(3)
    loss, agreement = two_pass_loss(_LogitsLoss(), model, model, inputs, 0.7)
    torch.manual_seed(3)
    first, second = model(**inputs).logits, model(**inputs).logits
    torch.testing.assert_close(loss, (first.pow(2).mean() + second.pow(2).mean()) / 2)
    torch.testing.assert_close(agreement, 0.7 * symmetric_kl(first, second))
    assert float(agreement) > 0
    model.eval()  # averaged copies: both passes agree
    _, agreement = two_pass_loss(_LogitsLoss(), model, model, inputs, 0.7)
    assert float(agreement) == 0.0


def test_adamix_and_lst_train_through_the_cli(tiny_dir, data_file, tmp_path):
    runner = CliRunner()
    for method in ("adamix", "lst"):
        out = tmp_path / method
        args = ["train", "--model", tiny_dir, "--data", data_file, "-o", out, "--batch-size", 4, "--max-steps", 4,
                "--eval-limit", 2, "--max-new-tokens", 4, "--no-progress", "--method", method]
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        tensors = load_file(out / "delta" / "delta.safetensors")
        model, _ = load_model_and_tokenizer(str(tiny_dir))
        assert dt.load(model, out / "delta") == ["default"]
        if method == "adamix":
            assert all(t.shape[0] == 4 for k, t in tensors.items())
        else:
            assert any(".side." in k for k in tensors) and float(tensors[next(k for k in tensors if k.endswith("up.weight"))].abs().sum()) > 0
