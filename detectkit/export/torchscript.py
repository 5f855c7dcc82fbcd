"""TorchScript: ``torch.jit.trace`` of the deploy module, for C++ (libtorch) and Python without detectkit.

The file maps ``images`` (float RGB NCHW in [0, 1], or uint8 in the chosen layout with
``uint8_input``) to the raw ``(boxes [B,A,4], scores [B,A,C])`` of the detector contract; the
batch is dynamic, the image size is the traced one. NMS is not in the file: the in-graph NMS of
the ONNX export is an ONNX op whose eager form loops over the batch in Python, which a trace
would freeze; ``torchvision.ops.batched_nms`` (or :func:`detectkit.ops.nms.postprocess`) on the
outputs is the TorchScript way. The file is checked in ``torch.jit`` by the one export check.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from detectkit.export.deploy import (
    ExportConfig,
    ExportResult,
    build_export_module,
    default_sample,
    example_input,
    verify_export,
)
from detectkit.export.nms import OUTPUT_NAMES
from detectkit.utils.files import atomic_write

__all__ = ["RUNTIME", "export_torchscript", "run_torchscript"]

RUNTIME = "torch.jit"


def run_torchscript(path: Path, images: np.ndarray, taps: tuple[str, ...]) -> tuple[list[np.ndarray], None]:
    """The :data:`detectkit.export.deploy.Runner` of TorchScript (no taps: the file has no NMS)."""
    module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        outputs = module(torch.from_numpy(np.ascontiguousarray(images)))
    return [o.numpy() for o in outputs], None


def export_torchscript(model: nn.Module, path: str | os.PathLike, config: ExportConfig | None = None, check: bool = True,
                       sample: torch.Tensor | None = None, atol: float = 1e-3) -> ExportResult:
    """Trace ``model`` (eval-mode ``Detector``, optionally behind the uint8 preprocess) at batch 1,
    write it atomically to ``path`` and check it in ``torch.jit`` (by default on a batch of 2)."""
    config = (config or ExportConfig()).for_model(model)
    if config.nms is not None:
        raise ValueError("TorchScript exports raw boxes and scores (nms=None); apply NMS to its outputs")
    path = Path(path)
    model = copy.deepcopy(model).cpu().float().eval()
    dummy = example_input(config)
    with torch.no_grad():
        traced = torch.jit.trace(build_export_module(model, config), (dummy,), check_trace=False)
    atomic_write(path, lambda partial: torch.jit.save(traced, str(partial)))
    result = ExportResult(path=str(path), input_name="images", input_shape=tuple(dummy.shape),
                          input_dtype=str(dummy.dtype).replace("torch.", ""), output_names=list(OUTPUT_NAMES[None]),
                          runtime=RUNTIME)
    if check:
        verify_export(model, path, config, default_sample(config) if sample is None else sample, result, atol,
                      run=run_torchscript, runtime=RUNTIME)
    return result
