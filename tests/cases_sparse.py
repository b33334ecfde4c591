"""Invariant-suite configs for sparse and subspace differences of the weights: Diff Pruning,
FISH Mask, Intrinsic SAID."""

import deltatune as dt

CASES = {
    "diff_pruning": lambda: dt.DiffPruningConfig(),
    "diff_pruning-structured": lambda: dt.DiffPruningConfig(structured=True, targets=["attn", "ffn"]),
    "fish_mask": lambda: dt.FISHMaskConfig(share=0.05),
    "intrinsic_said-embed": lambda: dt.IntrinsicSAIDConfig(dimension=48, targets=["all-linear", "embed"]),
}
