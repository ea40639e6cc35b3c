"""Metrics and figures of an evaluation.

Import from the submodules (`evaluation.metrics`, `evaluation.plots`): the training loop needs the metrics
without paying for matplotlib's import, so this package imports nothing itself.
"""
