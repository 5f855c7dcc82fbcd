"""``detectkit track ...`` is ``detectkit predict --track ...`` (:mod:`detectkit.cli.predict`)."""

from detectkit.cli.predict import track_main as main

__all__ = ["main"]
