"""Start the multi-process harness's forkserver now, so its imports overlap with
collection instead of the first test."""

from loom.dist.testing import start_workers

start_workers()
