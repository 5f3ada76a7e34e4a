"""Evaluation: reward/KL frontier, plots."""
