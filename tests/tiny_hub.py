"""A tiny causal LM with a character-level tokenizer and a chat template, saved to a directory.

It stands in for a real model in CLI tests: loads through the same ``from_pretrained`` path,
trains in milliseconds, and needs no download.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    chars = sorted(set(string.printable))
    vocab = {token: i for i, token in enumerate(SPECIAL + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_encoder(directory: Path, words: set[str], seed: int = 0, hidden: int = 32) -> Path:
    """A tiny random BERT with a WordPiece tokenizer over ``words`` (lower-cased, whole words
    and their characters), saved as a model directory. Weights of std 0.2 rather than 0.02 and
    no dropout: at the usual init a random encoder's [CLS] state barely depends on the input,
    leaving a classifier nothing to learn from in a few steps."""
    directory.mkdir(parents=True, exist_ok=True)
    pieces = sorted({w.lower() for w in words} | {c.lower() for w in words for c in w}
                    | {"##" + c.lower() for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]
    tokenizer = tf.BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = tf.BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, pad_token_id=0, initializer_range=0.2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    tf.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


#: rows of a model using tiny_bpe_tokenizer: its 300 tokens and 20 of padding (written to GGUF as unused tokens)
BPE_MODEL_VOCAB = 320


def tiny_bpe_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the kind GPT-2, Llama 3, Qwen and SmolLM have) of 300 tokens,
    trained on two sentences, with the ChatML template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["The date 2024-03-05 is the fifth of March.", "Hello world, hello deltatune! 12 34 567"] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                           pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_lm(arch: str, seed: int = 0):
    """The zoo's tiny causal LM of ``arch`` with :func:`tiny_bpe_tokenizer`'s vocabulary and room to spare."""
    from zoo import _config

    model_class, config = _config(arch)
    config.vocab_size = BPE_MODEL_VOCAB
    if arch == "gpt2":
        # transformers' GGUF reader takes GPT-2's positions and MLP width from its defaults, not the file
        config.n_positions, config.n_inner = 1024, None
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_class(config).eval()


def trained_lora(model, **options):
    """``model`` with a LoRA delta (r=4, alpha=8 unless ``options`` say otherwise) of random weights."""
    import deltatune as dt

    dt.attach(model, dt.config("lora", **{"r": 4, "alpha": 8, **options}))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)  # B is zero at init: give the delta something to say
    return model
