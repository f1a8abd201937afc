"""Benchmarks: anita vs. the Hugging Face stack (see run.py and RESULTS.md)."""
