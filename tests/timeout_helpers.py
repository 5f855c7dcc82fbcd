"""A time bound that is a timeout, not a wall-clock assert: the call is interrupted when it runs over."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` inside the block once ``seconds`` have passed (SIGALRM: main thread only),
    so a hang fails the test at the bound instead of blocking the suite."""
    assert threading.current_thread() is threading.main_thread(), "time_limit needs the main thread"

    def expire(signum, frame):
        raise TimeoutError(f"{what} still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
