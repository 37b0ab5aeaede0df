"""Checkpoint tools behind the ``loom`` subcommands: ``truncate`` and ``verify``."""
