"""Invariant-suite configs for the methods that build a delta differently: Ladder Side-Tuning's
side network and AdaMix's mixtures (see test_invariants.py). Side-layer dropping and the
Pfeiffer placement are covered in test_lst_math.py and test_adamix_math.py."""

import deltatune as dt

CASES = {
    "lst": lambda: dt.LSTConfig(reduction=2),
    "adamix": lambda: dt.AdaMixConfig(bottleneck=4, copies=3, targets=["attn.o", "ffn.down"]),
    "adamix_lora": lambda: dt.AdaMixLoRAConfig(r=2, copies=3, targets=["all-linear"]),
}
# near-identity adapters, as Houlsby's (cases_adapters.py)
IDENTITY_TOL = {"adamix": dict(atol=5e-2, rtol=1e-2)}
# LST prunes whole heads from separate q, k, v projections of one stack of blocks
UNSUPPORTED = {"lst": ("gpt2", "gpt_neox", "bloom", "falcon", "t5", "bart")}
