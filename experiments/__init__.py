"""Experiments that reproduce the paper's protocol at small scale; see docs/results.md."""
