"""Evaluation: perplexity on named sets (downstream tasks and analysis build on it)."""
