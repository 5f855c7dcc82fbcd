"""TensorRT: the ``EfficientNMS_TRT`` graph variant, the engine build, and the ``trtexec`` fallback.

The ``tensorrt`` wheel comes from NVIDIA's index and needs CUDA, so it is imported lazily:
:func:`build_engine` builds a real engine when both are present and otherwise writes the
equivalent ``trtexec`` command beside the ONNX file (one log line says so). INT8 engines are
built from Q/DQ graphs (explicit quantization, the QAT/PTQ output): no calibrator is needed.

``EfficientNMS_TRT`` (TensorRT's ``efficientNMSPlugin``) replaces the ONNX ``NonMaxSuppression``
path for TensorRT: inputs ``boxes [B,A,4]`` (``box_coding=0``: x1,y1,x2,y2) and ``scores
[B,A,C]``; outputs ``num_dets [B,1] int32``, ``det_boxes [B,max,4] float32``, ``det_scores
[B,max] float32``, ``det_classes [B,max] int32`` (the same layout as super-gradients' batch
format, in TensorRT's dtypes).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
from pathlib import Path

import numpy as np

__all__ = [
    "tensorrt_available",
    "add_efficient_nms",
    "trtexec_command",
    "write_trtexec_script",
    "build_engine",
    "EFFICIENT_NMS_OUTPUTS",
]

log = logging.getLogger(__name__)

EFFICIENT_NMS_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")


def tensorrt_available() -> bool:
    """``tensorrt`` imports and a CUDA device is visible (both are needed to build an engine)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def add_efficient_nms(
    onnx_in: str | os.PathLike,
    onnx_out: str | os.PathLike,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    agnostic: bool = False,
    boxes_name: str = "boxes",
    scores_name: str = "scores",
) -> Path:
    """Append an ``EfficientNMS_TRT`` node to a raw (boxes, scores) graph with onnx-graphsurgeon."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(str(onnx_in)))
    tensors = graph.tensors()
    boxes, scores = tensors[boxes_name], tensors[scores_name]
    batch = boxes.shape[0] if boxes.shape is not None else "batch"
    outputs = [
        gs.Variable(EFFICIENT_NMS_OUTPUTS[0], dtype=np.int32, shape=[batch, 1]),
        gs.Variable(EFFICIENT_NMS_OUTPUTS[1], dtype=np.float32, shape=[batch, max_det, 4]),
        gs.Variable(EFFICIENT_NMS_OUTPUTS[2], dtype=np.float32, shape=[batch, max_det]),
        gs.Variable(EFFICIENT_NMS_OUTPUTS[3], dtype=np.int32, shape=[batch, max_det]),
    ]
    attrs = {
        "plugin_version": "1",
        "background_class": -1,  # every class is a real class
        "max_output_boxes": int(max_det),
        "score_threshold": float(conf),
        "iou_threshold": float(iou),
        "score_activation": 0,  # scores are already sigmoid probabilities
        "class_agnostic": int(agnostic),  # the plugin's attribute name; detectkit spells it `agnostic`
        "box_coding": 0,  # corners: x1, y1, x2, y2
    }
    graph.layer(op="EfficientNMS_TRT", name="efficient_nms", inputs=[boxes, scores], outputs=outputs, attrs=attrs)
    graph.outputs = outputs
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    Path(onnx_out).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(onnx_out))
    return Path(onnx_out)


def _shape_arg(name: str, shape: tuple[int, ...]) -> str:
    return f"{name}:{'x'.join(str(int(s)) for s in shape)}"


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    input_shape: tuple[int, ...],
    fp16: bool = True,
    int8: bool = False,
    max_batch: int = 8,
    input_name: str = "images",
    workspace_mib: int = 4096,
) -> list[str]:
    """The ``trtexec`` call equivalent to :func:`build_engine` (dynamic batch 1..``max_batch``)."""
    one = (1, *input_shape[1:])
    opt = (max(1, min(int(input_shape[0]), max_batch)), *input_shape[1:])
    most = (max_batch, *input_shape[1:])
    cmd = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={_shape_arg(input_name, one)}",
        f"--optShapes={_shape_arg(input_name, opt)}",
        f"--maxShapes={_shape_arg(input_name, most)}",
        f"--memPoolSize=workspace:{workspace_mib}M",
    ]
    if fp16:
        cmd.append("--fp16")
    if int8:
        cmd.append("--int8")  # explicit quantization from the Q/DQ nodes: no calibration cache
    return cmd


def write_trtexec_script(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, **kwargs) -> Path:
    """``<onnx>.trtexec.sh`` holding the build command, for a machine that has TensorRT."""
    cmd = trtexec_command(onnx_path, engine_path, **kwargs)
    script = Path(str(onnx_path)).with_suffix(".trtexec.sh")
    script.write_text("#!/usr/bin/env sh\n# Build the TensorRT engine for this ONNX file.\n" + shlex.join(cmd) + "\n")
    script.chmod(0o755)
    return script


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    input_shape: tuple[int, ...] = (1, 3, 640, 640),
    fp16: bool = True,
    int8: bool = False,
    max_batch: int = 8,
    input_name: str = "images",
    workspace_mib: int = 4096,
) -> Path:
    """Build a serialized TensorRT engine, or write the ``trtexec`` script when TensorRT is absent.

    Returns the engine path when built, else the script path.
    """
    engine_path = Path(engine_path or Path(str(onnx_path)).with_suffix(".engine"))
    kwargs = dict(input_shape=input_shape, fp16=fp16, int8=int8, max_batch=max_batch, input_name=input_name,
                  workspace_mib=workspace_mib)
    if not tensorrt_available():
        script = write_trtexec_script(onnx_path, engine_path, **kwargs)
        log.warning("TensorRT/CUDA not available: engine not built; run %s on a TensorRT machine", script)
        return script
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # EfficientNMS_TRT lives in the plugin library
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    opt = (max(1, min(int(input_shape[0]), max_batch)), *input_shape[1:])
    profile.set_shape(input_name, (1, *input_shape[1:]), opt, (max_batch, *input_shape[1:]))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.write_bytes(bytes(serialized))
    log.info("TensorRT engine written to %s", engine_path)
    return engine_path
