"""Benchmarks that ship with the package: memory and speed of the training methods (:mod:`.memory`)."""
