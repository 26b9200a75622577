"""Evaluation: metrics, protocols, the evaluator and result records."""
