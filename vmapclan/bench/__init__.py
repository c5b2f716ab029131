"""Benchmarks: ``python -m vmapclan.bench`` (speed) and ``python -m vmapclan.bench quality``.

The speed benchmark lives in :mod:`vmapclan.bench.speed`, the quality benchmark in
:mod:`vmapclan.bench.quality`. Neither is imported here, so importing the package is cheap.
"""
