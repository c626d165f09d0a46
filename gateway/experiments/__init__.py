"""Experiments: plans, assignment and keeping them, outcome statistics."""
