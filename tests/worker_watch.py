"""Which test was running when an xdist worker died, and how it died.

A worker that dies (a signal, ``os._exit``, a crash in native code) is reported by xdist as
"node down: Not properly terminated" and nothing else; in CI the controller has then been seen
to wait forever. Each worker writes the test it is in and a faulthandler trace to a folder the
controller made, and the controller prints both when a worker goes down.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
from pathlib import Path

import pytest

ENV = "DETECTKIT_WORKER_WATCH"


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler plugin, which points it at stderr
def pytest_configure(config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        if getattr(config.option, "numprocesses", None) and ENV not in os.environ:
            os.environ[ENV] = tempfile.mkdtemp(prefix="detectkit-workers-")
        return
    folder = os.environ.get(ENV)
    if folder:
        config._watch_current = Path(folder) / f"{worker}.current"
        config._watch_fault = open(Path(folder) / f"{worker}.fault", "w")  # noqa: SIM115 (lives as long as the worker)
        faulthandler.enable(file=config._watch_fault, all_threads=True)


def pytest_runtest_logstart(nodeid: str, location) -> None:
    folder, worker = os.environ.get(ENV), os.environ.get("PYTEST_XDIST_WORKER")
    if folder and worker:
        Path(folder, f"{worker}.current").write_text(f"{nodeid} (pid {os.getpid()})\n")
        with open(Path(folder, f"{worker}.history"), "a") as f:  # the tests this worker ran before
            f.write(f"{nodeid}\n")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown when xdist is off (-p no:xdist)
def pytest_testnodedown(node, error) -> None:
    folder = os.environ.get(ENV)
    if not error or not folder:
        return
    worker = node.gateway.id
    current = Path(folder, f"{worker}.current")
    fault = Path(folder, f"{worker}.fault")
    lines = [f"[{worker}] went down ({error}) while running: "
             + (current.read_text().strip() if current.exists() else "(no test started)")]
    if fault.exists() and fault.stat().st_size:
        lines.append(f"[{worker}] faulthandler:\n" + fault.read_text()[-6000:])
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
