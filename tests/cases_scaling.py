"""Invariant-suite configs for methods that rescale or select existing parameters."""

import deltatune as dt

CASES = {
    "ia3": lambda: dt.IA3Config(),
}
