"""The case interface shared by benchmarks/bench_peers.py and its case modules.

A case is one piece of identical work done by detectkit and by a peer (ultralytics). Each side's
``setup_*`` runs once in the measuring subprocess (build model, dataset, loader, inputs; untimed)
and returns a zero-argument callable that does ONE unit of work (one batch loaded, one train step,
one forward). The harness calls the two callables alternately (A B A B ...), times every call,
and reports ``items_per_call / seconds`` as the throughput in ``unit``.

Case modules (``peers_data.py``, ``peers_model.py``) export ``cases() -> list[Case]``. They may
import ultralytics, but only inside ``setup_ultralytics`` (detectkit itself never imports it), and
must not download anything (the harness sets ``YOLO_OFFLINE=1``).

Each case is run in a fresh subprocess so one side's caches, thread pools and allocator state do
not leak into the next case; the subprocess re-imports the case module and looks the case up by
name, so a ``Case`` must be rebuildable from ``cases()`` alone (no closures over parent state).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

Work = Callable[[], object]
"""One unit of work; its return value is ignored (the harness keeps a reference until the next call
so lazy results are not freed inside the timed region of the other side)."""


@dataclass(frozen=True)
class Case:
    """One side-by-side comparison.

    name: unique, short, no spaces (selected with ``--only`` by its ``group`` or its full name).
    group: the family used by ``--only`` (e.g. "data", "world_train", "world_infer", "v8_train").
    unit: what ``items_per_call`` counts ("images", "steps").
    items_per_call: items done by one call of the work callable (e.g. the batch size).
    setup_detectkit / setup_ultralytics: build everything untimed and return the work callable.
        They receive ``threads`` (the torch thread count the harness already set) so a case can
        size worker pools or loaders consistently on both sides.
    warmup: calls per side before timing (loader start-up, first-call allocations, compile).
    note: one line shown under the table (what exactly is compared, e.g. "eager, fused").
    min_runs: the harness never times fewer calls per side than this, whatever ``--runs`` says.
    peer: who the other side is ("ultralytics", or "detectkit eager" where the peer cannot run here).
    detectkit_ran / peer_ran: what each side ran, one short phrase each (shown in every row).
    cores: how many cores the case's subprocess is pinned to (``--core`` for 1, ``--cores2`` for 2),
        e.g. 2 for data loading with workers; more torch threads than 1 also get ``--cores2``.
    compare: ``compare(detectkit_output, peer_output) -> {name: value}`` on one call of each side
        after the warm-up, e.g. the largest box and score difference; it raises ``AssertionError``
        when the outputs differ beyond the case's tolerance (the row then reports the error).
    """

    name: str
    group: str
    unit: str
    items_per_call: int
    setup_detectkit: Callable[[int], Work]
    setup_ultralytics: Callable[[int], Work]
    warmup: int = 2
    note: str = ""
    min_runs: int = 1
    extra: dict = field(default_factory=dict)
    peer: str = "ultralytics"
    cores: int = 1
    detectkit_ran: str = ""
    peer_ran: str = ""
    compare: Callable[[object, object], dict] | None = None


@dataclass
class Timing:
    """Seconds per call for one side of one case."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)

    @property
    def runs(self) -> int:
        return len(self.seconds)


def speedup(detectkit: Timing, ultralytics: Timing) -> float:
    """>1 means detectkit is faster: ultralytics' median seconds per call over detectkit's."""
    return ultralytics.median / detectkit.median
