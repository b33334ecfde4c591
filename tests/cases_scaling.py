"""Invariant-suite configs for scaling methods (see test_invariants.py)."""

CASES = {}
