"""Loom trainer: the `loom` command and everything a training run needs."""
