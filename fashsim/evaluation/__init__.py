"""Evaluation: retrieval metrics, the protocol every embedding is measured with, baselines, variant studies
and index benchmarks."""
