"""Benchmarks of the BIMI loss ops against the hand-written alternatives: `python -m benchmarks.run`."""
