"""Evaluation protocols that run searches against an index and score them with `raysearch.metrics`."""
