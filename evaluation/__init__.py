"""Evaluation: the score-file contract, the metrics, and score fusion."""
