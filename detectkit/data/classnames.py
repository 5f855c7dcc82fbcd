"""Class names read from annotations (VOC without a class list, CreateML): which look like typos.

A typo alarm is only useful where it is likely, so a pair of names is flagged when

- they are the same name up to case, spaces, punctuation or a plural (``Person``/``person``,
  ``traffic light``/``traffic_light``, ``platelet``/``Platelets``): always, whatever the counts;
- or one edit apart (a letter changed, added, removed, or two neighbours swapped) where both names
  are long (>= :data:`LONG_NAME` letters) and one side is rare; two swapped neighbours (``dgo``)
  also on short names, since distinct short classes seldom differ by a swap.

Short names one letter apart (``WBC``/``RBC``, ``cat``/``car``) are real classes far more often
than typos: never flagged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from detectkit.data.records import Problem

__all__ = ["likely_typos", "typo_problems", "LONG_NAME"]

#: names this long (letters and digits) may be one edit from another and still be a typo
LONG_NAME = 6


def _canonical(name: str) -> str:
    """Lower case, letters and digits only, singular (``Traffic-Lights`` -> ``trafficlight``)."""
    w = re.sub(r"[\W_]+", "", name.lower())
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith("es") and w[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def _swapped(a: str, b: str) -> bool:
    """``b`` is ``a`` with two neighbouring letters swapped."""
    if len(a) != len(b) or a == b:
        return False
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]


def _one_edit(a: str, b: str) -> bool:
    """One letter changed, added or removed, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1 or _swapped(a, b)
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _rare(n: int, m: int) -> bool:
    """``n`` objects are rare next to ``m``: a handful, or a tenth or less."""
    return n < m and (n <= 2 or 10 * n <= m)


def likely_typos(counts: Mapping[str, int]) -> list[tuple[str, str, str]]:
    """``(name, probably meant, why)`` for each likely typo among ``counts`` (name -> objects).

    ``name`` is the rarer of the pair (the later in sorted order when counts tie).
    """
    names = sorted(counts, key=lambda n: (-counts[n], n))  # common first
    canon = {n: _canonical(n) for n in names}
    found: list[tuple[str, str, str]] = []
    flagged: set[str] = set()
    for i, common in enumerate(names):
        for name in names[i + 1 :]:
            if name in flagged:
                continue
            a, b = canon[name], canon[common]
            if a == b:
                why = "the same name up to case, spaces, punctuation or a plural"
            elif _swapped(a, b) and _rare(counts[name], counts[common]):
                why = "two letters swapped"
            elif min(len(a), len(b)) >= LONG_NAME and _one_edit(a, b) and _rare(counts[name], counts[common]):
                why = "one letter apart"
            else:
                continue
            found.append((name, common, why))
            flagged.add(name)
    return found


def typo_problems(counts: Mapping[str, int], first: Mapping[str, object], noun: str, fix: str) -> list[Problem]:
    """One ``possible_typo`` problem per :func:`likely_typos` pair, naming the first file that spells
    it; ``noun`` is what the format calls a name ("label", "class"), ``fix`` what the user can do."""
    return [
        Problem(
            "possible_typo",
            str(first[name]),
            f"{noun} {name!r} names {counts[name]} object(s) and looks like a typo of {meant!r} "
            f"({counts[meant]} objects; {why}); {fix}",
        )
        for name, meant, why in likely_typos(counts)
    ]
