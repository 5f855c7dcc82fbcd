"""Small generic ONNX helpers: export any module with named (multi-)inputs, check it in onnxruntime.

:func:`detectkit.export.deploy.export_detector` builds the full detector graph (NMS, uint8
input) on a single ``images`` input; these helpers serve graphs with other signatures, such
as YOLO-World with runtime text embeddings (``images``, ``text_embeddings``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

__all__ = ["export_onnx", "ort_session", "run_onnx_session", "onnx_max_abs_error"]


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Path:
    """Trace ``module(*inputs)`` to ONNX (TorchScript exporter, ``dynamo=False``).

    ``dynamic_batch`` marks dim 0 of every input and output as ``batch`` unless ``dynamic_axes``
    already names that tensor's dim 0.
    """
    if len(inputs) != len(input_names):
        raise ValueError(f"{len(inputs)} inputs for {len(input_names)} input names")
    axes: dict[str, dict[int, str]] = {k: dict(v) for k, v in (dynamic_axes or {}).items()}
    if dynamic_batch:
        for name in (*input_names, *output_names):
            axes.setdefault(name, {}).setdefault(0, "batch")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            tuple(inputs),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=axes or None,
            do_constant_folding=True,
        )
    return path


def ort_session(
    path: str | os.PathLike,
    threads: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    profile_prefix: str | os.PathLike | None = None,
):
    """THE onnxruntime session of detectkit's timing, pruning profile and serving: all graph
    optimisations, ``threads`` intra-op threads (``None``: onnxruntime's default), one inter-op
    thread, and with ``profile_prefix`` a per-node profile (``session.end_profiling()``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def run_onnx_session(
    path: str | os.PathLike, inputs: dict[str, np.ndarray | torch.Tensor]
) -> list[np.ndarray]:
    """Run a graph on the CPU provider of onnxruntime with named inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = {i.name for i in session.get_inputs()}
    if set(inputs) != expected:
        raise ValueError(f"graph inputs are {sorted(expected)}, got {sorted(inputs)}")
    feed = {k: v.detach().cpu().numpy() if torch.is_tensor(v) else v for k, v in inputs.items()}
    return session.run(None, feed)


def onnx_max_abs_error(
    path: str | os.PathLike, module: nn.Module, inputs: Sequence[torch.Tensor], input_names: Sequence[str]
) -> list[float]:
    """Max abs difference onnxruntime vs PyTorch, one figure per output."""
    outputs = run_onnx_session(path, dict(zip(input_names, inputs)))
    with torch.no_grad():
        ref = module.eval()(*inputs)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(ref) != len(outputs):
        raise ValueError(f"PyTorch gave {len(ref)} outputs, onnxruntime {len(outputs)}")
    errors = []
    for r, o in zip(ref, outputs):
        if tuple(r.shape) != o.shape:
            raise ValueError(f"output shape differs: PyTorch {tuple(r.shape)} vs onnxruntime {o.shape}")
        errors.append(float(np.abs(r.detach().cpu().numpy() - o).max()) if o.size else 0.0)
    return errors
