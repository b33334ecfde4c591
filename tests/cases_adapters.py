"""Invariant-suite configs for the bottleneck adapters (see test_invariants.py)."""

import deltatune as dt

CASES = {
    "houlsby": lambda: dt.HoulsbyConfig(bottleneck=8),
    "houlsby-zero-up-norm": lambda: dt.HoulsbyConfig(reduction_factor=4, init="zero_up", layer_norm=True, activation="gelu"),
    "pfeiffer": lambda: dt.PfeifferConfig(bottleneck=8, init="zero_up"),
    "parallel": lambda: dt.ParallelAdapterConfig(bottleneck=8),
    "parallel-attn-learned-scale": lambda: dt.ParallelAdapterConfig(
        bottleneck=4, targets=["attn.o", "ffn.down"], learn_scale=True
    ),
    "hyperformer": lambda: dt.HyperFormerConfig(bottleneck=4, embedding_dim=8, projector_hidden=16, projected_dim=8),
}
# Houlsby's near-identity init: the adapter adds W_up f(W_down h) with weights ~ N(0, 1e-2),
# i.e. about 1e-3·|h| per layer; the logits move by that much, not by float rounding
IDENTITY_TOL = {"houlsby": dict(atol=5e-2, rtol=1e-2)}
