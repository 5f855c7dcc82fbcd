"""Where inference time goes, per unit: the latency side of a layer-wise pruning budget.

MACs are a poor proxy for CPU latency in a detector: the high-resolution early layers (stem,
first stage) and the upsampled neck layers move large activations for few MACs and are
memory-bound, while the low-resolution layers hold most MACs and run near peak. A budget that
spends the MACs cut where the MACs are (or where sensitivity allows) removes half the MACs for
far less than half the time. :func:`unit_latency` measures, on the deployment runtime
(onnxruntime's per-node profile of the fused graph at the deployment size), the milliseconds and
MACs of every unit; :func:`latency_weights` turns them into the per-unit multiplier that
:func:`detectkit.compress.sensitivity.budget_weights` combines with the sensitivity ranking.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["unit_macs", "unit_latency", "latency_weights", "module_path"]

log = logging.getLogger(__name__)


def unit_macs(model: nn.Module, units: Sequence[str], image_size: int) -> dict[str, float]:
    """MACs of the Conv2d layers inside each unit for one ``image_size`` forward (eval mode)."""
    counts = dict.fromkeys(units, 0.0)
    hooks = []

    def hook_for(unit: str):
        def hook(m: nn.Conv2d, inputs, output) -> None:
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            counts[unit] += float(output.numel() * k)

        return hook

    for unit in units:
        for m in model.get_submodule(unit).modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(hook_for(unit)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return counts


def unit_latency(
    model: nn.Module, units: Sequence[str], image_size: int = 640, threads: int = 1, runs: int = 3
) -> dict[str, tuple[float, float]]:
    """``unit -> (ms, MACs)``: onnxruntime CPU per-node time of the fused model's ONNX graph.

    The graph is what deployment runs (``model.fuse()``, ``ORT_ENABLE_ALL``); node names keep the
    module path (``/backbone/stage1/...``, see :func:`module_path`), so each node's time is credited
    to the unit whose path prefixes it. Layout reorders and other unnamed nodes belong to no unit and are not counted.
    """
    from detectkit.export.onnx import export_onnx, ort_session

    fused = copy.deepcopy(model).cpu().eval()
    if hasattr(fused, "fuse"):
        fused.fuse()
    x = torch.rand(1, 3, image_size, image_size)
    ms = dict.fromkeys(units, 0.0)
    prefixes = sorted(((u + ".", u) for u in units), key=lambda t: -len(t[0]))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(fused, Path(tmp) / "model.onnx", [x], ["images"], ["boxes", "scores"], dynamic_batch=False)
        session = ort_session(path, threads, profile_prefix=Path(tmp) / "profile")
        feed = {"images": x.numpy()}
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    # the first profiled run includes allocations: drop it by keeping, per node, the `runs` smallest times
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1000.0)
    for node, times in per_node.items():
        t = sum(sorted(times)[:runs]) / max(1, min(runs, len(times)))
        unit = _owner(module_path(node), prefixes)
        if unit is not None:
            ms[unit] += t
    macs = unit_macs(fused, units, image_size)
    return {u: (ms[u], macs.get(u, 0.0)) for u in units}


def _owner(path: str, prefixes: list[tuple[str, str]]) -> str | None:
    """The unit a node belongs to: the one whose path prefixes the node's, or else, where
    onnxruntime named a fused node after a sibling (Conv+ReLU named ``.../act/Relu``), the only unit
    under the nearest ancestor."""
    for prefix, unit in prefixes:
        if (path + ".").startswith(prefix):
            return unit
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        under = [unit for prefix, unit in prefixes if prefix.startswith(".".join(parts[:i]) + ".")]
        if under:
            return under[0] if len(under) == 1 else None
    return None


def module_path(node_name: str) -> str:
    """The module path of an ONNX node named by the TorchScript exporter's scopes.

    Scopes repeat the parent's name for indexed children: ``/stem/stem.0/conv/Conv`` is
    ``stem.0.conv`` (+ the op), ``/heads/head1/cv2.0/cv2.0.1/conv/Conv`` is ``heads.head1.cv2.0.1.conv``.
    """
    path: list[str] = []
    prev = ""
    for part in node_name.strip("/").split("/"):
        path += part[len(prev) + 1 :].split(".") if prev and part.startswith(prev + ".") else part.split(".")
        prev = part
    return ".".join(path)


def latency_weights(latency: dict[str, tuple[float, float]], strength: float = 1.0) -> dict[str, float]:
    """Per-unit multiplier ``((ms_u / MACs_u) / (ms / MACs overall)) ** strength`` of the pruning ratio.

    A unit whose time per MAC is above the model's average saves more time per MAC removed, so it
    gets a larger share of the cut; units without measured time or MACs get 1.
    """
    total_ms = sum(ms for ms, macs in latency.values() if ms > 0 and macs > 0)
    total_macs = sum(macs for ms, macs in latency.values() if ms > 0 and macs > 0)
    if total_ms <= 0 or total_macs <= 0:
        return dict.fromkeys(latency, 1.0)
    mean = total_ms / total_macs
    return {u: ((ms / macs) / mean) ** strength if ms > 0 and macs > 0 else 1.0 for u, (ms, macs) in latency.items()}
