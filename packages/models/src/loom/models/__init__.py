"""Loom model ports and registries."""
