"""Package discovery from the folders, so a new package ships without editing pyproject.toml.

Everything else is declared in pyproject.toml. setuptools' declarative ``packages.find`` cannot
discover a mapped folder (``callbacks/`` is installed as ``detectkit.callbacks``), so the package
list is computed here: every folder with an ``__init__.py`` under ``detectkit/`` and ``callbacks/``,
plus the recipes (``experiments/``, shipped as ``detectkit.experiments`` package data).
"""

from setuptools import find_packages, setup


def packages() -> list[str]:
    own = find_packages(include=["detectkit", "detectkit.*"])
    callbacks = [f"detectkit.{name}" for name in find_packages(include=["callbacks", "callbacks.*"])]
    return [*own, *callbacks, "detectkit.experiments"]


setup(packages=packages())
