"""The benchmark harness: mailplat (and optionally Postfix) under load from smtp-source.

Run it with ``python benchmarks/run.py``; see docs/performance.rst.
"""
