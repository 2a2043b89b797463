"""Benchmarks of the runtime against its peers (``python -m bench.run``).

Not part of the test suite and not imported by it or by the runtime. See
BENCHMARKS.md for the command, what is measured and the latest figures.
"""
