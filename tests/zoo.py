"""Tiny randomly initialised transformers for the test suite.

Every model is built from a transformers config class with random weights, so
the suite never touches the network.  Sizes are the smallest that still keep
each architecture's structure intact: 2 blocks, 4 attention heads (2 key/value
heads where the architecture has grouped-query attention), a hidden size of
32 and a vocabulary of 128 tokens.  A forward pass takes milliseconds.

Which model class each architecture gets:

* decoder-only (llama ... phi): the ``*ForCausalLM`` model, so the LM head,
  generation and the causal-LM loss are all exercised;
* encoders (bert, roberta, distilbert): the ``*ForMaskedLM`` model, because
  its head is a real output projection tied to the input embeddings (the same
  situation as a causal LM's head), unlike a freshly initialised classifier;
* encoder-decoders (t5, bart): ``*ForConditionalGeneration``.

``"<arch>+<scheme>"`` (``"llama+nf4"``, ``"bert+int8"``) is the same model with its linear
layers quantized by :func:`deltatune.quantize` (bitsandbytes, on CPU), its 4-bit layers in the
standard layout whatever the CPU. ``"<arch>+<scheme>:cpu-packed"`` forces bitsandbytes'
CPU-packed 4-bit layout on instead (see :func:`cpu_packing`). ``"llama-wide"`` is the Llama
with layers wider than the 64-value quantization block (``WIDE_HIDDEN_SIZE``).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import transformers as tf

ARCHITECTURES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox", "opt", "bloom",
    "falcon", "phi", "bert", "roberta", "distilbert", "t5", "bart",
)

VOCAB_SIZE = 128
MAX_POSITIONS = 64
HIDDEN_SIZE = 32
FFN_SIZE = 64        # BLOOM ignores it: its MLP is always 4 x hidden
NUM_LAYERS = 2       # per stack: encoder-decoders have NUM_LAYERS in each
NUM_HEADS = 4
NUM_KV_HEADS = 2     # where the architecture has grouped-query attention
WIDE_HIDDEN_SIZE = 64   # "llama-wide": rows of one 64-value quantization block
WIDE_FFN_SIZE = 128     # and of two, in its down projection

# Quantized variants the invariant suite also runs on: separate projections, GPT-2's Conv1D,
# an encoder-decoder (T5 keeps `wo` in full precision) and LLM.int8 on an encoder, 4-bit in the
# standard layout; and a Llama in the CPU-packed layout whose layers all convert at the first
# forward without gradient (rows of one and two quantization blocks; the tiny models' rows of
# 32 are shorter than a block and stay in the standard layout).
QUANTIZED_ARCHITECTURES: tuple[str, ...] = ("llama+nf4", "gpt2+nf4", "t5+nf4", "bert+int8",
                                            "llama-wide+nf4:cpu-packed")

# Architectures built with fewer key/value heads than query heads (grouped-query attention).
GROUPED_QUERY = frozenset({"llama", "mistral", "qwen2", "gemma", "falcon"})
# Architectures whose query/key/value projection is one fused linear layer.
FUSED_QKV = frozenset({"gpt2", "gpt_neox", "bloom", "falcon"})
# Architectures whose feed-forward block is gated (separate gate projection).
GATED_FFN = frozenset({"llama", "mistral", "qwen2", "gemma", "t5"})

_SEQ2SEQ = frozenset({"t5", "bart"})
_ENCODER_ONLY = frozenset({"bert", "roberta", "distilbert"})

# Decoder-only models following the Llama config vocabulary.
_LLAMA_STYLE = dict(
    vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=FFN_SIZE,
    num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
    max_position_embeddings=MAX_POSITIONS,
)


def _config(arch: str) -> tuple[type, tf.PretrainedConfig]:
    """The model class and tiny config for ``arch``."""
    if arch == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**_LLAMA_STYLE)
    if arch == "llama-wide":
        return tf.LlamaForCausalLM, tf.LlamaConfig(
            **{**_LLAMA_STYLE, "hidden_size": WIDE_HIDDEN_SIZE, "intermediate_size": WIDE_FFN_SIZE})
    if arch == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**_LLAMA_STYLE, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**_LLAMA_STYLE)
    if arch == "gemma":
        return tf.GemmaForCausalLM, tf.GemmaConfig(**_LLAMA_STYLE, head_dim=HIDDEN_SIZE // NUM_HEADS)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=HIDDEN_SIZE, n_layer=NUM_LAYERS, n_head=NUM_HEADS,
            n_inner=FFN_SIZE, n_positions=MAX_POSITIONS,
            # the defaults (50256) lie outside the tiny vocabulary
            bos_token_id=1, eos_token_id=2,
        )
    if arch == "gpt_neox":
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=FFN_SIZE,
            num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
    if arch == "opt":
        return tf.OPTForCausalLM, tf.OPTConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, word_embed_proj_dim=HIDDEN_SIZE,
            ffn_dim=FFN_SIZE, num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
    if arch == "bloom":
        return tf.BloomForCausalLM, tf.BloomConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, n_layer=NUM_LAYERS, n_head=NUM_HEADS,
        )
    if arch == "falcon":
        # The new decoder architecture with grouped key/value heads and a
        # parallel attention/MLP block, as in Falcon-40B and later.
        return tf.FalconForCausalLM, tf.FalconConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, ffn_hidden_size=FFN_SIZE,
            num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
            new_decoder_architecture=True, num_kv_heads=NUM_KV_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
    if arch == "phi":
        return tf.PhiForCausalLM, tf.PhiConfig(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=FFN_SIZE,
            num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
    if arch in ("bert", "roberta"):
        config_class, model_class = (
            (tf.BertConfig, tf.BertForMaskedLM) if arch == "bert"
            else (tf.RobertaConfig, tf.RobertaForMaskedLM)
        )
        # RoBERTa offsets positions by padding_idx + 1, hence the extra room.
        return model_class, config_class(
            vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=FFN_SIZE,
            num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS + 2,
        )
    if arch == "distilbert":
        return tf.DistilBertForMaskedLM, tf.DistilBertConfig(
            vocab_size=VOCAB_SIZE, dim=HIDDEN_SIZE, hidden_dim=FFN_SIZE, n_layers=NUM_LAYERS,
            n_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        )
    if arch == "t5":
        # Gated-GELU feed-forward (T5 v1.1 / Flan-T5), the variant in use today.
        return tf.T5ForConditionalGeneration, tf.T5Config(
            vocab_size=VOCAB_SIZE, d_model=HIDDEN_SIZE, d_kv=HIDDEN_SIZE // NUM_HEADS, d_ff=FFN_SIZE,
            num_layers=NUM_LAYERS, num_decoder_layers=NUM_LAYERS, num_heads=NUM_HEADS,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
        )
    if arch == "bart":
        return tf.BartForConditionalGeneration, tf.BartConfig(
            vocab_size=VOCAB_SIZE, d_model=HIDDEN_SIZE, encoder_layers=NUM_LAYERS,
            decoder_layers=NUM_LAYERS, encoder_attention_heads=NUM_HEADS,
            decoder_attention_heads=NUM_HEADS, encoder_ffn_dim=FFN_SIZE, decoder_ffn_dim=FFN_SIZE,
            max_position_embeddings=MAX_POSITIONS,
        )
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def base_architecture(arch: str) -> str:
    """``"llama"`` for ``"llama+nf4"`` and ``"llama-wide+nf4:cpu-packed"``: the architecture
    without its quantization or width."""
    return arch.partition("+")[0].removesuffix("-wide")


def is_cpu_packed(arch: str) -> bool:
    """Whether ``arch``'s 4-bit layers are forced into bitsandbytes' CPU-packed layout."""
    return arch.endswith(":cpu-packed")


@contextlib.contextmanager
def cpu_packing(enabled: bool):
    """4-bit layers made inside convert (``enabled``) or never convert to bitsandbytes'
    CPU-packed layout at their first forward without gradient, whatever the CPU: bitsandbytes'
    capability check, which ``Linear4bit`` reads when it is made, answers ``enabled``. Where the
    CPU has no kernel for the layout, conftest computes the packed product with
    :func:`reference_packed_product` instead."""
    import bitsandbytes.nn.modules

    with mock.patch.object(bitsandbytes.nn.modules, "has_avx512bf16", lambda: enabled):
        yield


def packed_weight(data: torch.Tensor, state) -> torch.Tensor:
    """The weight (out, in) a CPU-packed 4-bit layer holds, decoded from the layout's
    definition (bitsandbytes' ``_convert_weight_packed_for_cpu``), not by deltatune: rows in
    blocks of 32; each block, for each pair of columns, a group of 32 bytes whose low nibbles
    hold rows 0-15 and high nibbles rows 16-31 (two columns per row each); block constants a
    bf16 (in/blocksize, out) matrix."""
    out_features, in_features = state.shape
    groups = data.view(torch.uint8).reshape(-1, 32)
    pairs = torch.cat([groups & 15, groups >> 4], dim=-1)  # (row, column of the pair) for 32 rows
    codes = pairs.reshape(out_features // 32, in_features // 2, 32, 2).transpose(1, 2).reshape(out_features, in_features)
    constants = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)
    return state.code[codes.long()] * constants


def reference_packed_product(a: torch.Tensor, data: torch.Tensor, state) -> torch.Tensor:
    """``a Wᵀ`` for a CPU-packed 4-bit weight, in bf16 as bitsandbytes' kernel computes it."""
    weight = packed_weight(data, state).to(torch.bfloat16)
    return (a.to(torch.bfloat16) @ weight.T).to(a.dtype)


def is_seq2seq(arch: str) -> bool:
    """Whether ``arch`` is an encoder-decoder (needs decoder inputs)."""
    return base_architecture(arch) in _SEQ2SEQ


def is_decoder(arch: str) -> bool:
    """Whether ``arch`` is a decoder-only causal language model."""
    arch = base_architecture(arch)
    return arch in ARCHITECTURES and arch not in _SEQ2SEQ and arch not in _ENCODER_ONLY


def supports_generate(arch: str) -> bool:
    """Whether ``model.generate`` makes sense for ``arch`` (every LM but the masked ones)."""
    arch = base_architecture(arch)
    return arch in ARCHITECTURES and arch not in _ENCODER_ONLY


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model of architecture ``arch``, in eval mode.

    The same ``seed`` always gives the same weights.
    """
    arch, _, quantization = arch.partition("+")
    scheme, _, layout = quantization.partition(":")
    if layout not in ("", "cpu-packed"):
        raise ValueError(f"unknown 4-bit layout {layout!r}; known: cpu-packed (or none: the standard layout)")
    model_class, config = _config(arch)
    # Eager attention: identical numerics on every torch build, and tests that
    # compare outputs should not depend on which SDPA kernel was picked.
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config)
    if scheme:
        from deltatune import quantize

        with cpu_packing(layout == "cpu-packed"):
            quantize(model, scheme)
    return model.eval()


def tiny_inputs(
    arch: str, model: torch.nn.Module, batch: int = 2, seq: int = 8, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for one forward pass of ``model`` (built by :func:`tiny_model`).

    Token ids avoid the special ids 0-3 (padding, BOS/EOS ...).  The attention
    mask pads one token of the second row, so that masking is exercised too: the
    first token for decoder-only models (left padding, as generation expects),
    the last one otherwise.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab_size = model.config.vocab_size

    def random_ids() -> torch.Tensor:
        return torch.randint(4, vocab_size, (batch, seq), generator=generator)

    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        attention_mask[1, 0 if is_decoder(arch) else -1] = 0
    inputs = {"input_ids": random_ids(), "attention_mask": attention_mask}
    if is_seq2seq(arch):
        inputs["decoder_input_ids"] = random_ids()
    return inputs


def randomize_delta(model: torch.nn.Module, name: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    """Overwrite every parameter of delta ``name`` with scale·N(0, 1), so it is far from its init."""
    from deltatune.layer import delta_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in delta_layers(model).values():
            if name in layer.deltas:
                for p in layer.deltas[name].parameters():
                    p.copy_(scale * torch.randn(p.shape, generator=generator))



def tiny_classifier(arch: str, num_labels: int = 2, tokens: bool = False, seed: int = 0) -> torch.nn.Module:
    """``arch``'s tiny config as a sequence (or, with ``tokens``, token) classification model
    with ``num_labels`` outputs, in eval mode; the same ``seed`` always gives the same weights."""
    _, config = _config(arch)
    config._attn_implementation = "eager"
    config.num_labels = num_labels
    if config.pad_token_id is None:  # decoders pool at the last token before padding
        config.pad_token_id = 0
    auto = tf.AutoModelForTokenClassification if tokens else tf.AutoModelForSequenceClassification
    torch.manual_seed(seed)
    return auto.from_config(config).eval()
