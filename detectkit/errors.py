"""User-facing errors of the command line tools (standard library only, importable from any layer).

:class:`UserError` is a problem the user can fix; ``detectkit.cli.main`` prints it as one line.
:class:`OptionParser` is argparse that raises it, with a "did you mean" for a mistyped option,
instead of printing a usage block.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

__all__ = ["UserError", "OptionParser", "suggest"]


class UserError(Exception):
    """A problem the user can fix (bad option, missing file): printed as one line, no traceback."""


def suggest(word: str, choices: Sequence[str]) -> str:
    """`` Did you mean 'x'?`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class OptionParser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`UserError` line naming the option (and the closest
    real one) rather than a usage block."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse reports missing required options before unknown ones, so a typo in a required
        # option (--sorce) would read "--source is required": name the typo first.
        if any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return super().parse_known_args(args, namespace)  # options after a subcommand are its own
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for word in args or ():
            option = word.split("=")[0] if isinstance(word, str) else ""
            if option.startswith("--") and option != "--" and not any(k.startswith(option) for k in known):
                self.error(f"unrecognized arguments: {option}")
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        bad = [w for w in message.replace(",", " ").split() if w.startswith("--")]
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        tip = suggest(bad[0].split("=")[0], known) if bad and "unrecognized" in message else ""
        raise UserError(f"{message}.{tip} ({self.prog} --help lists the options)")
