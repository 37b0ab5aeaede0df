"""Loom patch generator (a build tool: nothing imports it at training time)."""
