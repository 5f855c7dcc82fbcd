"""``detectkit serve``: LitServe API over the one loader and the one prediction path (dynamic batching).

Import :mod:`detectkit.serve.commands` for the CLI and :mod:`detectkit.serve.api` for the
``litserve.LitAPI``; this package imports nothing heavy itself.
"""
