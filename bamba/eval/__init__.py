"""Evaluations of a model: lm-evaluation-harness tasks (``harness``) and the scoring they use."""
