"""Run ``detectkit serve`` in a child process and wait until it answers ``/ready``.

For integration tests, benchmarks and scripts that need a real server on this machine (the test
suite and ``benchmarks/bench_serve.py`` both use it)::

    with LocalServer("last.ckpt", "--max-batch", "8", log_path="server.log") as server:
        httpx.post(server.url + "/predict", files={"image": open("x.jpg", "rb")})

The child runs in its own session so :meth:`LocalServer.stop` can end it with all its workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["LocalServer", "ServerNotReady", "free_port"]


class ServerNotReady(RuntimeError):
    """The server exited or did not answer ``/ready`` in time; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """``python -m detectkit.serve.commands --checkpoint CHECKPOINT --port P *args``, ready on return."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *args: str,
        log_path: str | os.PathLike,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 180.0,
    ) -> None:
        import httpx  # the serve extra

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "detectkit.serve.commands", "--checkpoint", str(checkpoint),
               "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise ServerNotReady(f"server exited with {self.proc.returncode} ({self.log_path}):\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop(graceful=False)
        raise ServerNotReady(f"server not ready after {start_timeout} s ({self.log_path}):\n{self.output()}")

    def output(self, chars: int = 4000) -> str:
        """The tail of the server's log (stdout and stderr)."""
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """SIGTERM (the server drains in-flight requests) and wait, or kill the whole process group."""
        if self.proc.poll() is None:
            try:
                if graceful:
                    os.kill(self.proc.pid, signal.SIGTERM)
                    try:
                        self.proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=timeout)
        if not self.log.closed:
            self.log.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
