"""Prune blocks of a model, export it, judge it against the full model on held-out text, heal it."""
