"""Invariant-suite configs for the LoRA family (see test_invariants.py)."""

import deltatune as dt

CASES = {
    "lora": lambda: dt.LoRAConfig(r=4, targets=["all-linear"]),
    "lora-rslora-roles": lambda: dt.LoRAConfig(r=4, alpha=8, rslora=True, targets=["attn", "ffn"]),
    "dora": lambda: dt.LoRAConfig(r=4, dora=True, targets=["all-linear"]),
    "pissa": lambda: dt.LoRAConfig(r=2, init="pissa", targets=["all-linear"]),
    "lora-embed": lambda: dt.LoRAConfig(r=4, init="gaussian", targets=["embed", "attn"]),
}
# PiSSA's merge forms s·(BA - B0A0) from principal factors of |W|'s size: fp32 cancellation
MERGE_TOL = {"pissa": dict(atol=1e-3, rtol=1e-4)}
