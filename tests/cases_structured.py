"""Invariant-suite configs for structured updates: KronA, FAR, SparseAdapter, Compacter."""

import deltatune as dt

CASES = {
    "krona": lambda: dt.KronAConfig(),
    "krona-all-linear": lambda: dt.KronAConfig(targets=["all-linear"], a_shape=(2, 2), scale=2.0),
    "krona_res": lambda: dt.KronAResConfig(),
    "far-magnitude": lambda: dt.FARConfig(fraction=0.25, targets=["ffn", "attn.o"]),
    "far-gradient": lambda: dt.FARConfig(measure="gradient"),
    "sparse_adapter": lambda: dt.SparseAdapterConfig(bottleneck=8, sparsity=0.75),
    "sparse_adapter-houlsby-snip": lambda: dt.SparseAdapterConfig(
        bottleneck=4, placement="houlsby", criterion="snip", layer_norm=True
    ),
    "compacter": lambda: dt.CompacterConfig(bottleneck=8),
    "compacter++": lambda: dt.CompacterPlusPlusConfig(bottleneck=8, phm_rank=2, init="zero_up"),
    "phm-adapter-own-rules": lambda: dt.CompacterConfig(bottleneck=4, phm_dim=2, phm_rank=None, shared_rule=False),
}
# near-identity init, as for Houlsby adapters (see cases_adapters.py)
IDENTITY_TOL = {
    "sparse_adapter": dict(atol=5e-2, rtol=1e-2),
    "sparse_adapter-houlsby-snip": dict(atol=5e-2, rtol=1e-2),
    "compacter": dict(atol=5e-2, rtol=1e-2),
    "phm-adapter-own-rules": dict(atol=5e-2, rtol=1e-2),
}
