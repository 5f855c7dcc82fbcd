"""OpenVINO IR (``.xml`` + ``.bin``): the checked ONNX graph through OpenVINO's ONNX frontend.

Why from ONNX and not from ``torch``: the ONNX graph is already the one deployable assembly
(uint8 preprocess, detector, NMS in graph as ``NonMaxSuppression``, which OpenVINO runs
natively), so the IR keeps every ``detectkit export`` option without a second graph builder.

Why f32: OpenVINO's CPU plugin runs in bf16 by default on CPUs that have it (AMX / AVX512-BF16),
which moved boxes by 0.2 px at 64 px here, 200x the export tolerance. Weights are saved in fp32
(``compress_to_fp16=False``) and every compile asks for f32 inference (:data:`F32`), so the IR
reproduces PyTorch within the same tolerance as onnxruntime.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from detectkit.export.deploy import (
    ExportConfig,
    ExportResult,
    default_sample,
    export_detector,
    verify_export,
)
from detectkit.utils.files import atomic_write
from detectkit.utils.signal_stack import kept_signal_stack

__all__ = ["F32", "RUNTIME", "export_openvino", "save_openvino", "compile_openvino", "run_openvino",
           "check_openvino"]

#: the compile settings that keep OpenVINO's CPU plugin in float32 (its default may be bf16)
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
RUNTIME = "OpenVINO"


def save_openvino(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> Path:
    """Convert an ONNX file to IR at ``xml_path`` (weights beside it as ``.bin``, fp32).

    Both files go through :func:`atomic_write`, the weights first, so a reader never sees an
    ``.xml`` next to half a ``.bin``."""
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml_path.parent, prefix=f".{xml_path.stem}-") as tmp:
        staged = Path(tmp) / "model.xml"
        ov.save_model(ov.convert_model(str(onnx_path)), str(staged), compress_to_fp16=False)
        atomic_write(xml_path.with_suffix(".bin"), lambda partial: os.replace(staged.with_suffix(".bin"), partial))
        atomic_write(xml_path, lambda partial: os.replace(staged, partial))
    return xml_path


def compile_openvino(path: str | os.PathLike, threads: int | None = None, taps: tuple[str, ...] = ()):
    """THE compiled IR of the check and of ``serve --backend openvino``: CPU, f32, ``threads``
    inference threads (None: OpenVINO's default); ``taps`` are inner tensors added as outputs."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if taps:
        model.add_outputs(list(taps))
    config: dict[str, object] = dict(F32)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    with kept_signal_stack():  # OpenVINO swaps the thread's signal stack; see detectkit.utils.signal_stack
        return core.compile_model(model, "CPU", config)


def run_openvino(path: Path, images: np.ndarray, taps: tuple[str, ...]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The :data:`detectkit.export.deploy.Runner` of OpenVINO: the IR's outputs, and the ``taps``
    (raw boxes/scores before NMS, which keep their ONNX names in the IR) when it has them."""
    import openvino as ov

    names = {n for op in ov.Core().read_model(str(path)).get_ops() for out in op.outputs() for n in out.get_names()}
    have = bool(taps) and all(t in names for t in taps)
    compiled = compile_openvino(path, taps=taps if have else ())
    result = compiled(np.ascontiguousarray(images))
    outputs = [np.asarray(result[o]) for o in compiled.outputs]
    n_out = len(outputs) - (len(taps) if have else 0)
    return outputs[:n_out], (outputs[n_out:] if have else None)


def check_openvino(model: nn.Module, path: str | os.PathLike, config: ExportConfig, sample: torch.Tensor | None = None,
                   result: ExportResult | None = None, atol: float = 1e-3, exact: bool = True) -> ExportResult | None:
    """The export check (:func:`detectkit.export.deploy.verify_export`) with the IR run in OpenVINO."""
    config = config.for_model(model)
    sample = default_sample(config) if sample is None else sample
    return verify_export(model, path, config, sample, result, atol, exact, run_openvino, RUNTIME)


def export_openvino(model: nn.Module, path: str | os.PathLike, config: ExportConfig | None = None, check: bool = True,
                    sample: torch.Tensor | None = None, atol: float = 1e-3, exact: bool = True) -> ExportResult:
    """``model`` -> ONNX (:func:`export_detector`, same options) -> IR at ``path``, checked in OpenVINO.

    The ONNX file is an intermediate (removed); ``op_counts`` in the result are its node counts."""
    import openvino  # noqa: F401  (fail before the ONNX export when the extra is missing)

    config = (config or ExportConfig()).for_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().float().eval()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-") as tmp:
        result = export_detector(model, Path(tmp) / "model.onnx", config, check=False)
        save_openvino(Path(tmp) / "model.onnx", path)
    result.path = str(path)
    result.runtime = RUNTIME
    if check:
        check_openvino(model, path, config, sample, result, atol=atol, exact=exact)
    return result
