"""Invariant-suite configs for structured updates: KronA, FAR, SparseAdapter, Compacter."""

import deltatune as dt

CASES = {
    "krona": lambda: dt.KronAConfig(),
    "krona-all-linear": lambda: dt.KronAConfig(targets=["all-linear"], a_shape=(2, 2), scale=2.0),
    "krona_res": lambda: dt.KronAResConfig(),
    "far-magnitude": lambda: dt.FARConfig(fraction=0.25, targets=["ffn", "attn.o"]),
    "far-gradient": lambda: dt.FARConfig(measure="gradient"),
}
