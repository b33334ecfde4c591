"""Invariant-suite configs for adapters methods (see test_invariants.py)."""

CASES = {}
