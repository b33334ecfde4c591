"""The training-memory estimator: the seed table's OPT-1.3B figures, each line's formula on tiny
configs, and (slow) a measured CPU training run of the bundled model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import transformers as tf
from typer.testing import CliRunner

from deltatune.analysis.advise import advise, choose_method, parse_bytes
from deltatune.analysis.memory import CPU_RUNTIME_BYTES, estimate_memory, estimate_training_memory, meta_model_from_config
from deltatune.cli.main import app
from deltatune.errors import ConfigError

GB, MB = 10**9, 10**6
OPT_1_3B = tf.OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                        vocab_size=50272, max_position_embeddings=2048)
SEED_LORA = {"r": 1, "targets": ["attn.q", "attn.v"], "param_dtype": "float16"}  # 196,608 ≈ 0.2M trainable


def activations(estimate) -> int:
    return sum(b for name, b, _ in estimate.lines if name.startswith("activations"))


@pytest.mark.parametrize("method, options, weights, gradients, optimizer", [
    ("full", None, 2.6 * GB, 2.6 * GB, 5.2 * GB),
    ("lora", SEED_LORA, 2.6 * GB, 0.4 * MB, 0.8 * MB),
])
def test_seed_opt_1_3b_table_within_ten_percent(method, options, weights, gradients, optimizer):
    estimate = estimate_memory(OPT_1_3B, method, method_options=options, dtype="fp16", batch_size=1, seq_len=512,
                               device="cuda")
    assert estimate["model weights"] == pytest.approx(weights, rel=0.1)
    assert estimate["gradients"] == pytest.approx(gradients, rel=0.1)
    assert estimate["optimizer states (adamw)"] == pytest.approx(optimizer, rel=0.1)
    assert activations(estimate) == pytest.approx(1.0 * GB, rel=0.1)  # "~1 GB of hidden states per example"


def test_korthikanti_equation_for_gpt_style_blocks():
    """OPT blocks (MLP 4h, dropout, eager attention with dropout) at 16 bits keep
    s·b·h·(34 + 5·a·s/h) bytes per layer (Korthikanti et al. 2022, eq. 1)."""
    config = tf.OPTConfig(hidden_size=64, num_hidden_layers=3, ffn_dim=256, num_attention_heads=4, vocab_size=100,
                          dropout=0.1, attention_dropout=0.1)
    s, b, h, a = 16, 2, 64, 4
    estimate = estimate_memory(config, "full", dtype="fp16", batch_size=b, seq_len=s, attention="eager", device="cuda")
    layers = next(v for name, v, _ in estimate.lines if name.startswith("activations: layers"))
    assert layers == 3 * s * b * h * (34 + 5 * a * s / h)
    sdpa = estimate_memory(config, "full", dtype="fp16", batch_size=b, seq_len=s, attention="sdpa", device="cuda")
    assert next(v for n, v, _ in sdpa.lines if n.startswith("activations: layers")) == 3 * s * b * h * 34


def test_each_line_follows_its_formula():
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    model = meta_model_from_config(config, "bf16").requires_grad_(True)
    params = sum(p.numel() for p in model.parameters())
    plain = estimate_training_memory(model, batch_size=2, seq_len=8, device="cuda")
    assert plain["model weights"] == plain["gradients"] == 2 * params
    assert plain["optimizer states (adamw)"] == 4 * params  # two bf16 moments
    master = estimate_training_memory(model, batch_size=2, seq_len=8, device="cuda", master_weights=True)
    assert master["optimizer states (adamw)"] == 12 * params  # fp32 copy + two fp32 moments (ZeRO's K = 12)
    eight_bit = estimate_training_memory(model, batch_size=2, seq_len=8, device="cuda", optimizer="adamw_8bit")
    assert eight_bit["optimizer states (adamw_8bit)"] == 2 * params + 8 * -(-params // 256)
    assert estimate_training_memory(model, device="cuda", optimizer="sgd")["optimizer states (sgd)"] == 0
    # gated MLP, grouped-query attention: e = 6h + 2·h_kv + 4i elements per token and layer
    e = 6 * 32 + 2 * 16 + 4 * 64
    assert plain["activations: layers (b=2, s=8)"] == 2 * 2 * 8 * e * 2
    assert plain["activations: logits"] == 2 * 8 * 128 * (2 + 4)
    checkpointed = estimate_training_memory(model, batch_size=2, seq_len=8, device="cuda", gradient_checkpointing=True)
    assert checkpointed["activations: layers (b=2, s=8, checkpointed)"] == 2 * 2 * 8 * 32 * 2 + 2 * 8 * e * 2
    assert plain["framework overhead (cuda)"] > 0


def test_cpu_lines_and_quantized_weights():
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=128)
    cpu = estimate_memory(config, "lora", dtype="fp32", batch_size=2, seq_len=8, device="cpu", allocator_retention=True)
    assert cpu["framework overhead (cpu)"] == CPU_RUNTIME_BYTES
    assert cpu["allocator retention (glibc heap)"] == activations(cpu)  # the activation lines once more
    nf4 = estimate_memory(config, "lora", dtype="fp32", batch_size=2, seq_len=8, device="cpu", quantize="nf4")
    assert nf4["model weights"] < 0.5 * cpu["model weights"]


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "adam"}, "optimizer='adam' is not valid; allowed: adamw"),
    ({"device": "tpu"}, "device='tpu' is not valid; allowed: cpu, cuda"),
    ({"attention": "flash"}, "attention='flash' is not valid; allowed: sdpa"),
    ({"dtype": "fp8"}, "dtype='fp8' is not valid; allowed: fp32, fp16, bf16"),
])
def test_bad_settings_name_the_allowed_values(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        estimate_memory(OPT_1_3B, "lora", **kwargs)


def test_inspect_memory_prints_each_line_with_its_formula(tmp_path):
    (tmp_path / "config.json").write_text(OPT_1_3B.to_json_string())
    result = CliRunner().invoke(app, ["inspect", "--config", str(tmp_path / "config.json"), "--memory", "--dtype", "fp16",
                                      "--seq-len", "512", "--batch-size", "1", "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert "P_t·d_t" in result.output and "activations: layers (b=1, s=512)" in result.output
    assert "full fine-tuning" in result.output


def test_advice_follows_the_rule_of_thumb_and_fits_the_budget():
    assert choose_method(50, 10**8)[0] == "ia3"
    assert choose_method(500, 10**8)[0] == "ia3" and choose_method(500, 2 * 10**10)[0] == "prompt"
    assert choose_method(5000, 10**8)[0] == "lora"
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(ConfigError, match="is not a size"):
        parse_bytes("lots")
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=128)
    roomy = advise(5000, config, memory="8GB", device="cuda")
    assert roomy.method == "lora" and roomy.chosen is roomy.considered[0]
    tight = advise(5000, config, memory=roomy.considered[0].estimate.total - 1, device="cuda")
    assert tight.chosen is not None and tight.chosen.gradient_checkpointing
    assert tight.chosen.estimate.total <= tight.budget and "--gradient-checkpointing" in tight.command()
    assert advise(5000, config, memory="1MB").chosen is None


def test_advise_cli(tmp_path):
    (tmp_path / "config.json").write_text(OPT_1_3B.to_json_string())
    result = CliRunner().invoke(app, ["advise", "--examples", "300", "--model", str(tmp_path / "config.json"),
                                      "--memory", "24GB"])
    assert result.exit_code == 0, result.output
    assert "method: ia3" in result.output and "deltatune train --method ia3" in result.output
    bad = CliRunner().invoke(app, ["advise", "--examples", "300", "--memory", "much"])
    assert bad.exit_code == 2 and "is not a size" in bad.output


@pytest.mark.slow
def test_estimate_within_fifteen_percent_of_a_measured_cpu_run(tmp_path):
    """A real 3-step LoRA run of the bundled model on CPU, in its own process: its training peak
    (resident set) against the estimate for the largest of its batches."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from check_memory_estimate import largest_batch

    from deltatune.models import bundled_model_dir

    subprocess.run([sys.executable, "-m", "deltatune", "train", "--precision", "fp32", "--no-packing", "--max-steps", "3", "--batch-size", "8",
                    "--eval-limit", "1", "--max-new-tokens", "2", "--no-progress", "-o", str(tmp_path)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    measured = json.loads((tmp_path / "summary.json").read_text())["training_peak_memory_mib"] * 2**20
    seq_len, positions = largest_batch(3, 8)
    estimate = estimate_memory(bundled_model_dir(), "lora", dtype="fp32", batch_size=8, seq_len=seq_len,
                               head_positions=positions, device="cpu")
    assert estimate.total == pytest.approx(measured, rel=0.15), str(estimate)


def test_packed_batches_price_their_tokens_and_advice_prices_what_train_would_run(monkeypatch):
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    model = meta_model_from_config(config, "bf16").requires_grad_(True)
    e = 6 * 32 + 2 * 16 + 4 * 64
    packed = estimate_training_memory(model, batch_size=2, seq_len=8, device="cuda", packed_tokens=11)
    assert packed["activations: layers (b=2, s=8, packed T=11)"] == 2 * 11 * e * 2  # L·T·e·d_a: T replaces b·s
    with pytest.raises(ConfigError, match="packed_tokens must be a positive integer"):
        estimate_training_memory(model, packed_tokens=0)

    import deltatune.precision as precision

    for native, dtype in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        assert advise(5000, config, memory="8GB", device="cpu").dtype == dtype
    padded = advise(5000, config, memory="8GB", device="cuda", seq_len=512)
    short = advise(5000, config, memory="8GB", device="cuda", seq_len=512, example_length=100)
    assert short.packed and not padded.packed and "packed batches" in str(short)
    assert activations(short.considered[0].estimate) < activations(padded.considered[0].estimate)
