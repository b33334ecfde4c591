"""Invariant-suite configs for structured methods (see test_invariants.py)."""

CASES = {}
