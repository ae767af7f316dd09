"""Hypothesis-driven fuzzing: only the project's typed errors ever escape (see test_fuzz.py)."""
