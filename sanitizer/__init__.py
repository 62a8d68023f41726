"""Sanitizer: scores, plan, rewrite, evaluate, engine."""
