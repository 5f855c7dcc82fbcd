"""Keep this thread's alternate signal stack across a call into a library that replaces it.

Why: OpenVINO's CPU plugin (2026.4) installs its own alternate signal stack on the thread that
compiles a model and puts back the one it found when that compiled model is freed. Two compiled
models freed in the other order than they were made leave the thread pointing at an unmapped
stack; the next signal with a handler (SIGCHLD when a subprocess ends, with torch's DataLoader
handler installed; Ctrl-C) then kills the process with SIGSEGV, with no Python traceback.
Reproduced here: compile A, compile B, free A, free B, run a subprocess -> exit 139. Putting the
previous stack back right after the compile means every compiled model saves, and later restores,
a stack that stays valid. POSIX only (ctypes ``sigaltstack``); elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["kept_signal_stack"]


class _StackT(ctypes.Structure):  # struct stack_t (Linux and the BSDs: pointer, int flags, size_t size)
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc if hasattr(libc, "sigaltstack") else None
    except OSError:
        return None


_LIBC = _libc()


@contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Run the body, then give this thread back the alternate signal stack it had before."""
    if _LIBC is None:
        yield
        return
    before = _StackT()
    saved = _LIBC.sigaltstack(None, ctypes.byref(before)) == 0
    try:
        yield
    finally:
        if saved:
            now = _StackT()
            if _LIBC.sigaltstack(None, ctypes.byref(now)) == 0 and (now.ss_sp, now.ss_flags) != (before.ss_sp, before.ss_flags):
                before.ss_flags &= ~1  # SS_ONSTACK is a read-only state flag, not a request
                _LIBC.sigaltstack(ctypes.byref(before), None)
