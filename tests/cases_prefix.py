"""Invariant-suite configs for the methods that act inside attention (prefix, LLaMA-Adapter)."""

import deltatune as dt

CASES = {
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=3),
    "prefix-reparameterized": lambda: dt.PrefixTuningConfig(
        num_virtual_tokens=2, reparameterize=True, encoder_embed_dim=8, encoder_hidden_size=16
    ),
    "llama_adapter": lambda: dt.LlamaAdapterConfig(adapter_len=3),
    "mam": lambda: dt.MAMConfig(num_virtual_tokens=2, bottleneck=4),
    "unipelt": lambda: dt.UniPELTConfig(r=2, num_virtual_tokens=2, bottleneck=4),
}
# prefix tuning starts from random prefixes (the paper's init); LLaMA-Adapter's gate is zero
NOT_IDENTITY = {"prefix", "prefix-reparameterized", "mam", "unipelt"}
# attention computed in the model's own code (ALiBi in BLOOM, Falcon's fused paths) has no place
# for extra keys; LLaMA-Adapter needs separate key/value projections and causal self-attention
_OWN_ATTENTION = {"bloom", "falcon"}
UNSUPPORTED = {
    "prefix": _OWN_ATTENTION,
    "prefix-reparameterized": _OWN_ATTENTION,
    "mam": _OWN_ATTENTION,
    "unipelt": _OWN_ATTENTION,
    "llama_adapter": _OWN_ATTENTION | {"gpt2", "gpt_neox", "bert", "roberta", "distilbert", "t5", "bart"},
}
