"""CI's strict skips: with ``DETECTKIT_STRICT_SKIPS=1`` (set by ``make test``, hence ``.ci/run``) a test
skipped for a missing module of the ``all`` extras or for absent ``../shared`` test data fails the run,
so a broken install or checkout cannot pass CI by skipping. Other skips (no GPU, no /dev/full, a
TensorRT machine) stay skips. Hooks imported by ``conftest.py``; a plain module so it can also be
loaded with ``-p strict_skips``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

ENV = "DETECTKIT_STRICT_SKIPS"
#: the wording of every skip for missing test data (tests say ``shared test data absent: <path>``)
SHARED_REASON = "shared test data absent"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: the shared folder beside the checkout; when it is absent altogether the data skips stand (the
#: project's rule: tests skip with a clear reason only then), when it is there a missing part fails
SHARED = Path(__file__).resolve().parents[2] / "shared"
_MISSING_MODULE = re.compile(r"could not import '([\w.]+)'")


def _normal(name: str) -> str:
    return re.split(r"[<>=!~\[; ]", name.strip(), maxsplit=1)[0].lower().replace("-", "_").replace(".", "_")


def extra_distributions(extras: dict[str, list[str]], extra: str = "all") -> set[str]:
    """Normalised distribution names ``extra`` installs, following ``detectkit[a,b]`` self-references."""
    out: set[str] = set()
    for requirement in extras.get(extra, []):
        nested = re.fullmatch(r"\s*detectkit\[([\w,\s-]+)\]\s*", requirement)
        if nested:
            for name in nested.group(1).split(","):
                out |= extra_distributions(extras, name.strip())
        else:
            out.add(_normal(requirement))
    return out


@cache
def _all_extras() -> frozenset[str]:
    import tomllib  # Python 3.11+: read only when a skip is judged (detectkit supports 3.10)

    data = tomllib.loads(PYPROJECT.read_text())
    return frozenset(extra_distributions(data["project"]["optional-dependencies"]))


def belongs_to(module: str, distributions: Iterable[str]) -> bool:
    """Whether the (not installed, so unknown to importlib.metadata) ``module`` comes from one of the
    distributions: the same name, a vendor prefix (nvidia-modelopt: modelopt, python-multipart:
    multipart, pytest-xdist: xdist) or the name without separators (import-linter: importlinter)."""
    top = _normal(module.split(".")[0])
    return any(top == d or d.endswith("_" + top) or top == d.replace("_", "") for d in distributions)


def required(reason: str, distributions: Iterable[str], shared: Path = SHARED) -> bool:
    """A skip CI must not accept: missing shared test data (while ``../shared`` itself exists), or a
    missing module of the extras."""
    if SHARED_REASON in reason:
        return shared.is_dir()
    missing = _MISSING_MODULE.search(reason)
    return bool(missing) and belongs_to(missing.group(1), distributions)


def _strict(report: pytest.CollectReport | pytest.TestReport) -> None:
    if os.environ.get(ENV) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if required(reason, _all_extras()):
        report.outcome = "failed"
        report.longrepr = f"{ENV}=1: a skip CI does not accept (install detectkit[all], complete ../shared): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _strict(outcome.get_result())
