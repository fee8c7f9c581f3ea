"""Benchmarks, probes and trade-off scripts: runnable, printing measured ratios."""
