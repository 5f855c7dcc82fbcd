"""The inference-worker supervisor of ``detectkit serve``: a dead worker is restarted, boundedly.

Why our own loop and not LitServe's: LitServe 0.2.19 has a monitor thread (``restart_workers=True``)
that polls every 2 s, restarts without any bound, logs nothing we can count, and fails the dead
worker's in-flight requests only in the main process's response buffer, which is empty: the
requests wait in the forked API-server processes, so they hung until uvicorn was killed (32 s),
and a killed worker took the whole server down (EOFError from the manager). So this thread
replaces that monitor (``server._monitor_workers = False``) but restarts through LitServe's own
``launch_single_inference_worker`` (which also marks the worker "starting", so LitServe's
``/health`` behind ``/ready`` says 503 until the new worker's ``setup`` is done). It:

* polls the worker processes every ``interval`` s (a death is seen within a second);
* tells the HTTP gate through :class:`~detectkit.serve.gate.SharedState`: ``worker_deaths`` (the
  gate answers 503 to every request in flight at that moment, instead of a hang) and
  ``workers_down`` (``/ready`` is 503, and new predictions are 503 while no worker is up);
* logs ``worker_died`` / ``worker_restarted`` JSON lines and counts both in ``/metrics``;
* allows ``max_restarts`` per ``window`` seconds; one more death stops the server, and
  ``detectkit serve`` exits with :data:`EXIT_RESTARTS_EXHAUSTED` so an orchestrator restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

log = logging.getLogger("detectkit.serve")

EXIT_RESTARTS_EXHAUSTED = 3


class RestartBudget:
    """At most ``max_restarts`` restarts in any ``window`` seconds (a crash loop is not hidden)."""

    def __init__(self, max_restarts: int = 5, window: float = 300.0) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self._times: deque[float] = deque()

    def take(self, now: float) -> bool:
        """Spend one restart at ``now``; False when the budget of the window is used up."""
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True


class WorkerSupervisor:
    """Watches ``server.inference_workers`` (LitServe's list) from a daemon thread of the main process."""

    def __init__(self, server: Any, state: Any, budget: RestartBudget, interval: float = 0.1,
                 metrics: Any = None) -> None:
        self.server = server
        self.state = state
        self.budget = budget
        self.interval = interval
        self.metrics = metrics
        self.exhausted = threading.Event()
        self._down: dict[int, float] = {}  # worker index -> when it died (until its replacement is ready)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="detectkit-supervisor", daemon=True)
        thread.start()
        return thread

    def _stopping(self) -> bool:
        shutdown = getattr(self.server, "_shutdown_event", None)
        return self.state.draining.is_set() or (shutdown is not None and shutdown.is_set())

    def _loop(self) -> None:
        # LitServe creates its shutdown event, then its list of worker processes: wait for both
        while (getattr(self.server, "_shutdown_event", None) is None
               or len(getattr(self.server, "inference_workers", ())) < self.state.workers_total):
            time.sleep(self.interval)
        while not self._stopping():
            try:
                self.check()
            except Exception:  # the supervisor must outlive anything odd (a manager mid-shutdown, ...)
                if self._stopping():
                    return
                log.exception("supervisor check failed", extra={"fields": {"event": "supervisor_error"}})
            time.sleep(self.interval)

    def check(self) -> None:
        """One pass: note dead workers, restart them (within budget), note replacements that are ready."""
        for index, proc in enumerate(list(self.server.inference_workers)):
            if proc.is_alive():
                continue
            if self._stopping():
                return
            self._died(index, proc)
            if self.exhausted.is_set():
                return
        for index, since in list(self._down.items()):
            if self._status(index) == "ready":
                del self._down[index]
                self._add_down(-1)
                log.info("inference worker restarted", extra={"fields": {
                    "event": "worker_restarted", "worker": index,
                    "worker_pid": self.server.inference_workers[index].pid,
                    "seconds_down": round(time.monotonic() - since, 2)}})
                if self.metrics is not None:
                    self.metrics.worker_event("restarted")

    def _died(self, index: int, proc: Any) -> None:
        now = time.monotonic()
        if index not in self._down:
            self._down[index] = now
            self._add_down(+1)
        with self.state.worker_deaths.get_lock():  # the gate fails the requests in flight now with 503
            self.state.worker_deaths.value += 1
        allowed = self.budget.take(now)
        log.error("inference worker died", extra={"fields": {
            "event": "worker_died", "worker": index, "worker_pid": proc.pid, "exitcode": proc.exitcode,
            "restart": allowed, "max_restarts": self.budget.max_restarts, "window_s": self.budget.window}})
        if self.metrics is not None:
            self.metrics.worker_event("died")
        if not allowed:
            log.error("restart budget exhausted: stopping the server", extra={"fields": {
                "event": "worker_restarts_exhausted", "exit_code": EXIT_RESTARTS_EXHAUSTED}})
            self.exhausted.set()
            self.state.draining.set()  # /ready and new requests: 503 while LitServe stops
            self.server._shutdown_event.set()  # LitServe's own graceful stop (see commands._install_drain)
            return
        lit_api, worker_id = self._locate(index)
        self.server.inference_workers[index] = self.server.launch_single_inference_worker(lit_api, worker_id)

    def _locate(self, index: int) -> tuple[Any, int]:
        """LitServe's flat worker list -> (its LitAPI, the worker id within that API)."""
        count = 0
        for lit_api in self.server.litapi_connector:
            n = len(self.server._inference_workers_config_for_api(lit_api.api_path))
            if index < count + n:
                return lit_api, index - count
            count += n
        raise IndexError(f"worker {index} belongs to no API")

    def _status(self, index: int) -> str | None:
        lit_api, worker_id = self._locate(index)
        return self.server.workers_setup_status.get(f"{lit_api.api_path.split('/')[-1]}_{worker_id}")

    def _add_down(self, delta: int) -> None:
        with self.state.workers_down.get_lock():
            self.state.workers_down.value += delta


__all__ = ["EXIT_RESTARTS_EXHAUSTED", "RestartBudget", "WorkerSupervisor"]
