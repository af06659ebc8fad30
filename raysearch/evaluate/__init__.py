"""Evaluation: the field's retrieval metrics and the edit suite."""
