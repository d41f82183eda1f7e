"""Runnable inference entry points (`python -m infer.bench`, ...)."""
