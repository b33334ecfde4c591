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
    # S4 on the zoo's two blocks per stack: spindle grouping puts block 0 in G2 and block 1 in G3
    "s4": lambda: dt.S4Config(strategies=("-", "A+L+B", "P+B+L", "-"), r=2, bottleneck=4, num_virtual_tokens=2),
    "s4-without-prefix": lambda: dt.S4Config(grouping="uniform", strategies=("A", "B+L", "A+L", "L"), r=2, bottleneck=4),
}
# prefix tuning starts from random prefixes (the paper's init); LLaMA-Adapter's gate is zero
NOT_IDENTITY = {"prefix", "prefix-reparameterized", "mam", "unipelt", "s4"}
# S4's adapters start near the identity (Houlsby's init, see cases_adapters.py)
IDENTITY_TOL = {"s4-without-prefix": dict(atol=5e-2, rtol=1e-2)}


def _attaches(arch: str) -> bool:
    """Whether prefix tuning attaches to the tiny ``arch`` with the installed transformers."""
    from zoo import tiny_model

    try:
        dt.attach(tiny_model(arch), CASES["prefix"]())
    except dt.DeltatuneError as exc:
        assert "not supported" in str(exc), exc
        return False
    return True


# attention computed in the model's own code (ALiBi in BLOOM) has no place for extra keys.
# Falcon's attention moved onto transformers' attention interface in 5.25, so whether prefixes
# reach it depends on the installed release: decided by attaching. Where deltatune attaches, the
# invariant suite checks every result; where it refuses, that the refusal is clean.
_OWN_ATTENTION = {"bloom"} | ({"falcon"} if not _attaches("falcon") else set())
# LLaMA-Adapter needs separate key/value projections (Falcon's are fused) and causal self-attention
UNSUPPORTED = {
    "prefix": _OWN_ATTENTION,
    "prefix-reparameterized": _OWN_ATTENTION,
    "mam": _OWN_ATTENTION,
    "unipelt": _OWN_ATTENTION,
    "s4": _OWN_ATTENTION,
    "llama_adapter": _OWN_ATTENTION | {"falcon", "gpt2", "gpt_neox", "bert", "roberta", "distilbert", "t5", "bart"},
}
