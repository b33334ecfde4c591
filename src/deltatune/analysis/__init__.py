"""Analyses of models and deltas: memory estimates (more to come with the analysis issue)."""
