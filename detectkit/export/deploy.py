"""Assemble the deployable graph (preprocess -> detector -> NMS), export it, check it in its runtime.

One function, :func:`export_detector`, serves the ``ExportOnFitEnd`` callback, the QAT callback
and ``detectkit export``. The check is part of the export: a graph that does not reproduce the
PyTorch model in onnxruntime is an error, not a warning, because the file is what ships. The
same check, :func:`verify_export`, runs the OpenVINO IR in OpenVINO and the TorchScript file in
``torch.jit``: each format passes a :data:`Runner` for its own runtime. The check
always compares the raw head outputs (boxes/scores before NMS; an NMS graph is exported with
those tensors tapped, then untapped), and for NMS graphs also the detections; a check that
compared nothing (no raw outputs, zero detections on both sides) is an error too.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from detectkit.export.nms import (
    OUTPUT_NAMES,
    RAW_TAPS,
    DetectorWithNMS,
    NMSPostprocess,
    split_batch,
    split_flat,
)
from detectkit.export.preprocess import ImagePreprocess, WithPreprocess
from detectkit.ops.nms import PostprocessConfig

__all__ = ["ExportConfig", "ExportResult", "ExportCheckError", "build_export_module", "export_detector",
           "verify_onnx", "verify_export", "default_sample", "Runner", "onnx_op_counts"]

log = logging.getLogger(__name__)


class ExportCheckError(AssertionError):
    """The exported file's runtime does not reproduce PyTorch, or the check had nothing to compare."""

#: runs an exported file: ``(path, graph input, tap names) -> (the file's outputs, the tapped raw
#: boxes/scores or None when the file cannot expose them)``; one per runtime
Runner = Callable[[Path, np.ndarray, tuple[str, ...]], tuple[list[np.ndarray], list[np.ndarray] | None]]


@dataclass
class ExportConfig:
    """What the exported graph contains. ``nms``: ``None`` (raw boxes/scores), ``"batch"`` or ``"flat"``.
    ``image_size=None``: the model's own (``model.inference.image_size``, from its checkpoint)."""

    image_size: tuple[int, int] | None = None
    batch_size: int = 1
    dynamic_batch: bool = True
    nms: str | None = None
    conf: float = 0.25
    iou: float = 0.7
    top_k: int = 1000
    max_det: int = 300
    multi_label: bool = True
    agnostic: bool = False
    uint8_input: bool = False
    layout: str = "nchw"
    channel_order: str = "rgb"
    opset: int = 17

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        if self.image_size is not None:
            self.image_size = tuple(int(s) for s in self.image_size)
        if self.nms not in (None, "batch", "flat"):
            raise ValueError(f"nms must be None, 'batch' or 'flat', got {self.nms!r}")


    @property
    def postprocess(self) -> PostprocessConfig:
        """The NMS settings as the one :class:`PostprocessConfig`."""
        return PostprocessConfig(conf=self.conf, iou=self.iou, top_k=self.top_k, max_det=self.max_det,
                                 multi_label=self.multi_label, agnostic=self.agnostic)

    def for_model(self, model: nn.Module) -> ExportConfig:
        """A copy with ``image_size`` filled in from ``model.inference`` when it is None."""
        if self.image_size is not None:
            return self
        inference = getattr(model, "inference", None)
        size = tuple(inference.image_size) if inference is not None else (640, 640)
        return ExportConfig(**{**asdict(self), "image_size": size})


@dataclass
class ExportResult:
    """Where the file is, what it expects and how close it is to PyTorch."""

    path: str
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_names: list[str]
    #: worst difference from PyTorch: box coordinates relative to the image side, and scores, before
    #: NMS (raw outputs) and after it (the detections); the export's log line prints the same value
    max_abs_error: float | None = None
    raw_compared: bool = False
    detections_match: bool | None = None
    num_detections: int | None = None
    op_counts: dict[str, int] = field(default_factory=dict)
    #: where the check ran the file (onnxruntime, OpenVINO, torch.jit)
    runtime: str = "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_export_module(model: nn.Module, config: ExportConfig, expose_raw: bool = False) -> nn.Module:
    """The module that gets traced: ``[preprocess ->] model(eval) [-> NMS]`` (``expose_raw``: NMS
    graphs also output the boxes/scores before NMS, see :data:`detectkit.export.nms.RAW_TAPS`)."""
    module: nn.Module = model.eval()
    if config.nms is not None:
        module = DetectorWithNMS(module, NMSPostprocess.from_config(config.postprocess, config.nms), expose_raw)
    if config.uint8_input:
        module = WithPreprocess(module, ImagePreprocess(config.layout, config.channel_order))
    return module.eval()


def example_input(config: ExportConfig, batch_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """A deterministic input in the graph's own dtype and layout."""
    n = batch_size or config.batch_size
    h, w = config.image_size
    g = torch.Generator().manual_seed(seed)
    if config.uint8_input:
        shape = ImagePreprocess(config.layout, config.channel_order).input_shape(n, h, w)
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.rand((n, 3, h, w), generator=g)


def to_model_input(images: torch.Tensor, config: ExportConfig) -> torch.Tensor:
    """Raw graph input -> the float RGB NCHW tensor the PyTorch detector takes."""
    if config.uint8_input:
        return ImagePreprocess(config.layout, config.channel_order)(images)
    return images


def export_detector(
    model: nn.Module,
    path: str | os.PathLike,
    config: ExportConfig | None = None,
    check: bool = True,
    sample: torch.Tensor | None = None,
    atol: float = 1e-3,
    exact: bool = True,
) -> ExportResult:
    """Export ``model`` (an eval-mode ``Detector``, fused or fake-quantized) to ONNX and check it.

    ``sample`` is a graph input (uint8 when ``uint8_input``) used for the check; by default a
    random batch of 2 (dynamic batch) is used. ``exact=False`` is for fake-quantized models,
    whose INT8 graph rounds differently from PyTorch's fake quantization (see :func:`verify_onnx`).
    The model is deep-copied so export never
    changes the caller's module (modelopt quantizers switch state while exporting).
    """
    config = (config or ExportConfig()).for_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().float().eval()
    module = build_export_module(model, config, expose_raw=config.nms is not None)
    dummy = example_input(config)
    output_names = list(OUTPUT_NAMES[config.nms])
    taps = list(RAW_TAPS) if config.nms is not None else []
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if config.dynamic_batch:
        dynamic_axes = {"images": {0: "batch"}}
        if config.nms is None:
            dynamic_axes.update({"boxes": {0: "batch"}, "scores": {0: "batch"}})
        elif config.nms == "batch":
            dynamic_axes.update({n: {0: "batch"} for n in output_names})
        else:
            dynamic_axes["predictions"] = {0: "num_detections"}
        dynamic_axes.update({n: {0: "batch"} for n in taps})
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=config.opset,
            input_names=["images"],
            output_names=output_names + taps,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
        _set_static_output_dims(path, module(dummy), dynamic_axes or {}, output_names + taps, keep=output_names)
    result = ExportResult(
        path=str(path),
        input_name="images",
        input_shape=tuple(dummy.shape),
        input_dtype=str(dummy.dtype).replace("torch.", ""),
        output_names=output_names,
        op_counts=onnx_op_counts(path),
    )
    if check:
        verify_onnx(model, path, config, default_sample(config) if sample is None else sample, result,
                    atol=atol, exact=exact)
    return result


def default_sample(config: ExportConfig) -> torch.Tensor:
    """The check's input when none is given: a batch of 2 when the batch is dynamic (so a file whose
    batch froze at the example's 1 fails), else the fixed batch."""
    return example_input(config, batch_size=2 if config.dynamic_batch else config.batch_size, seed=1)


def _set_static_output_dims(path: Path, outputs, dynamic_axes: dict, names: list[str], keep: list[str]) -> None:
    """Write the known static output dims (anchors, classes, max_det) into the graph's outputs,
    and drop the outputs not in ``keep`` (the raw taps of an NMS graph; their nodes stay).

    The TorchScript exporter leaves them symbolic after Concat/Transpose; consumers such as
    TensorRT plugins and serving configs read them from the graph.
    """
    import onnx

    outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
    shapes = dict(zip(names, (tuple(o.shape) for o in outputs)))
    model = onnx.load(str(path))
    for out in model.graph.output:
        if out.name not in shapes:
            continue
        dyn = dynamic_axes.get(out.name, {})
        for i, dim in enumerate(out.type.tensor_type.shape.dim):
            if i in dyn:
                dim.dim_param = dyn[i]
            elif i < len(shapes[out.name]):
                dim.dim_value = int(shapes[out.name][i])
    for out in [o for o in model.graph.output if o.name not in keep]:
        model.graph.output.remove(out)
    onnx.save(model, str(path))


def _verify_matched(ref: list[torch.Tensor], got: list[np.ndarray], path, runtime: str) -> int:
    """Q/DQ graphs: >= 90% of the detections on either side have a same-class IoU > 0.9 partner."""
    from torchvision.ops import box_iou

    matched, total = 0, 0
    for r, g in zip(ref, got):
        g = torch.as_tensor(g)
        total += max(len(r), len(g))
        if len(r) == 0 or len(g) == 0:
            continue
        iou = box_iou(r[:, :4].float(), g[:, :4].float())
        iou[r[:, 5, None] != g[None, :, 5]] = 0
        matched += int(min((iou.max(1).values > 0.9).sum(), (iou.max(0).values > 0.9).sum()))
    frac = matched / total if total else 1.0
    log.info("%s NMS check (quantized) %s: %.1f%% of %d detections matched", runtime, path, 100 * frac, total)
    if frac < 0.9:
        raise ExportCheckError(f"{path}: only {100 * frac:.1f}% of the detections match between {runtime} "
                               "and PyTorch")
    return int(sum(len(g) for g in got))


def onnx_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each op type the graph holds (e.g. QuantizeLinear for a Q/DQ model)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def run_onnx(path: str | os.PathLike, images: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Run the graph on CPU in onnxruntime."""
    import onnxruntime as ort

    if torch.is_tensor(images):
        images = images.cpu().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})


def _run_onnx_tapped(path: str | os.PathLike, images: np.ndarray | torch.Tensor,
                     taps: tuple[str, ...]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The graph's outputs, plus the tensors named ``taps`` when the graph has them (else None):
    the shipped file is run, with those intermediate tensors added as outputs in memory."""
    import onnx
    import onnxruntime as ort

    if torch.is_tensor(images):
        images = images.cpu().numpy()
    model = onnx.load(str(path))
    produced = {o for node in model.graph.node for o in node.output}
    n_out = len(model.graph.output)
    have = all(t in produced for t in taps)
    if have:
        model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in taps)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: images})
    return outputs[:n_out], (outputs[n_out:] if have else None)


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    config: ExportConfig,
    sample: torch.Tensor,
    result: ExportResult | None = None,
    atol: float = 1e-3,
    exact: bool = True,
) -> ExportResult | None:
    """:func:`verify_export` of an ONNX file in onnxruntime."""
    return verify_export(model, path, config, sample, result, atol, exact, _run_onnx_tapped, "onnxruntime")


def verify_export(
    model: nn.Module,
    path: str | os.PathLike,
    config: ExportConfig,
    sample: torch.Tensor,
    result: ExportResult | None = None,
    atol: float = 1e-3,
    exact: bool = True,
    run: Runner | None = None,
    runtime: str = "onnxruntime",
) -> ExportResult | None:
    """Compare the exported file, run by ``run`` in ``runtime``, with PyTorch on ``sample``; raise
    :class:`ExportCheckError` if they disagree or if nothing was compared. ONE check for every format.

    Raw head outputs (boxes relative to the image side, and scores; an NMS graph's tapped
    :data:`RAW_TAPS`) must agree within ``atol``. NMS graphs: the detections must also equal
    :func:`detectkit.ops.nms.postprocess` on the same input (same count, boxes/scores within
    ``atol`` relative to image size, same classes). An NMS graph without taps whose sample gives
    zero detections on both sides proved nothing: that is an error, not a pass.

    ``exact=False`` (Q/DQ graphs): onnxruntime's integer rounding and PyTorch's fake
    quantization may land one step apart, which moves scores by a quantization step and can
    push a borderline box across the threshold. Then raw outputs must agree within 0.1 (scores;
    boxes relative to the image size) and at least 90% of the detections on either side must
    have a same-class partner with IoU > 0.9 on the other.
    """
    from detectkit.ops.nms import postprocess

    config = config.for_model(model)
    run = run or _run_onnx_tapped
    images = sample.cpu().numpy() if torch.is_tensor(sample) else sample
    raw: list[np.ndarray] | None
    if config.nms is None:
        outputs, _ = run(Path(path), images, ())
        raw = outputs[:2]
    else:
        outputs, raw = run(Path(path), images, RAW_TAPS)
    model = model.eval()
    with torch.no_grad():
        boxes, scores = model(to_model_input(sample, config).float())
    scale = float(max(config.image_size))
    err = 0.0
    if raw is not None:
        err_boxes = float(np.abs(raw[0] - boxes.numpy()).max()) / scale
        err_scores = float(np.abs(raw[1] - scores.numpy()).max())
        err = max(err_boxes, err_scores)
        if result is not None:
            result.raw_compared = True
        if err > (atol if exact else 0.1):
            raise ExportCheckError(f"{path}: {runtime} differs from PyTorch before NMS: boxes "
                                   f"{err_boxes * scale:.4g} px, scores {err_scores:.4g}")
    if result is not None:
        result.runtime = runtime
    if config.nms is None:
        return _report_error(path, result, err, runtime)
    ref = postprocess(boxes, scores, **config.postprocess.to_dict())
    got = split_flat(outputs[0], len(ref)) if config.nms == "flat" else split_batch(*outputs)
    n_ref, n_got = int(sum(len(r) for r in ref)), int(sum(len(g) for g in got))
    if n_ref == 0 and n_got == 0 and raw is None:
        raise ExportCheckError(
            f"{path}: the check compared nothing: neither {runtime} nor PyTorch kept a detection on the "
            f"sample (conf {config.conf}) and the graph has no raw outputs to compare; give a sample with "
            "objects in it or a lower conf")
    if n_ref == 0 and n_got == 0:
        log.warning("%s NMS check %s: no detections on the sample at conf %g; only the raw outputs were "
                    "compared", runtime, path, config.conf)
    if not exact:
        n = _verify_matched(ref, got, path, runtime)
        if result is not None:
            result.detections_match, result.num_detections = True, n
        return _report_error(path, result, err, runtime)
    det_err = 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        r = r.numpy()
        if len(r) != len(g):
            raise ExportCheckError(f"{path}: image {i}: {runtime} kept {len(g)} detections, postprocess {len(r)}")
        if len(r) == 0:
            continue
        r, g = r[np.lexsort((r[:, 0], -r[:, 4]))], g[np.lexsort((g[:, 0], -g[:, 4]))]
        if not np.array_equal(r[:, 5], g[:, 5]):
            raise ExportCheckError(f"{path}: image {i}: classes differ between {runtime} and postprocess")
        det_err = max(det_err, float(np.abs(r[:, :4] - g[:, :4]).max()) / scale,
                      float(np.abs(r[:, 4] - g[:, 4]).max()))
    log.info("%s NMS check %s: %d detections match postprocess", runtime, path, n_ref)
    if det_err > atol:
        raise ExportCheckError(f"{path}: {runtime} detections differ from postprocess by {det_err:.4g}")
    if result is not None:
        result.detections_match, result.num_detections = True, n_ref
    return _report_error(path, result, max(err, det_err), runtime)


def _report_error(path, result: ExportResult | None, err: float, runtime: str) -> ExportResult | None:
    """ONE max_abs_error figure: the worst of box coordinates (relative to the image side) and
    scores, before NMS and after it. The log line and the report print the same value, in full
    (they once disagreed: the log gave boxes in pixels and left out the NMS comparison)."""
    figure = float(err)
    log.info("%s check %s: max_abs_error %s (boxes relative to the image side, and scores; "
             "before and after NMS)", runtime, path, figure)
    if result is not None:
        result.max_abs_error = figure
    return result
