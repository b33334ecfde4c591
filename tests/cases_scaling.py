"""Invariant-suite configs for methods that rescale or select existing parameters."""

import deltatune as dt

CASES = {
    "ia3": lambda: dt.IA3Config(),
    # the zoo's Llama-family models have no biases: add_missing gives every architecture a case
    "bitfit": lambda: dt.BitFitConfig(add_missing=True),
    "bitfit-subset-head": lambda: dt.BitFitConfig(targets=["attn.o", "ffn.up"], add_missing=True, head=True),
    "ln_tuning": lambda: dt.LNTuningConfig(),
    "top_layers": lambda: dt.TopLayersConfig(k=1),
}
