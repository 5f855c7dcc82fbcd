"""``detectkit export``: a trained checkpoint -> checked ONNX (optionally NMS/uint8), TensorRT,
OpenVINO IR or TorchScript. Every file is run in its own runtime right after it is written and
compared with PyTorch (one check, :func:`detectkit.export.deploy.verify_export`).

``--checkpoint`` is anything ``detectkit.load`` reads: a detectkit ``.ckpt`` or weights file
(its recorded pruned shapes and quantizers are rebuilt, then the weights load strictly), a
super-gradients ``.pth`` or an ultralytics ``.pt``.
``--int8`` exports the Q/DQ graph of a QAT/PTQ checkpoint as is, or runs PTQ first on
``--calib`` images (a folder) when the checkpoint is float.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a command runs, so `detectkit export --help` is instant
    import torch
    import torch.nn as nn

__all__ = [
    "add_export_arguments",
    "run_export",
    "load_for_export",
    "calibration_images",
    "main",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt", "openvino", "torchscript", "coreml", "tflite")
#: file suffix of each format's default output name
SUFFIX = {"onnx": ".onnx", "tensorrt": ".onnx", "openvino": ".xml", "torchscript": ".torchscript"}
#: formats detectkit cannot write and check on this platform, and why (one line each)
UNAVAILABLE = {
    "coreml": "--format coreml is not available: the package 'coremltools' converts on Linux but CoreML models run "
              "only on macOS, so the file could not be checked against PyTorch; use --format onnx, openvino or "
              "torchscript",
    "tflite": "--format tflite is not available: it needs the package 'litert-torch' (formerly ai-edge-torch), whose "
              "releases require torch < 2.14 while detectkit pins torch 2.14.1; use --format onnx, openvino or "
              "torchscript",
}


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument("--model", help="registry name (default: the checkpoint's hyper-parameters)")
    p.add_argument("--checkpoint", required=True, help="detectkit .ckpt or a weights file for the builder")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint, else 80")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="openvino: IR .xml+.bin (from the ONNX graph, NMS included); torchscript: traced raw "
                        "boxes/scores; coreml/tflite: not available here (the message says why)")
    p.add_argument("--int8", action="store_true", help="Q/DQ INT8 (QAT/PTQ checkpoint, or PTQ on --calib)")
    p.add_argument("--int8-backend", choices=("modelopt", "onnxruntime"), default="modelopt",
                   help="modelopt: TensorRT's Q/DQ scheme (QAT/PTQ); onnxruntime: static QDQ for CPU onnxruntime")
    p.add_argument("--calib", help="folder of calibration images for PTQ with --int8")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--nms", choices=("batch", "flat", "none"), default=None,
                   help="NMS inside the ONNX graph in super-gradients' output format (default: batch; "
                        "none: raw boxes and scores); tensorrt always uses EfficientNMS_TRT")
    p.add_argument("--output", help="output file (default: <model>.onnx)")
    p.add_argument("--size", type=int, default=None,
                   help="input side, a multiple of 32 (default: the size the checkpoint was validated at)")
    p.add_argument("--batch-size", type=int, default=1, help="example/optimal batch (the batch stays dynamic)")
    p.add_argument("--conf", type=float, default=None, help="NMS score threshold (default: the checkpoint's, 0.25)")
    p.add_argument("--iou", type=float, default=None, help="NMS IoU threshold (default: the checkpoint's, 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="candidates to NMS (default: the checkpoint's, 1000)")
    p.add_argument("--max-det", type=int, default=None, help="detections kept (default: the checkpoint's, 300)")
    p.add_argument("--agnostic", action="store_true", default=None, help="class-agnostic NMS")
    p.add_argument("--uint8", action="store_true", help="uint8 input with /255 (and layout/order) embedded")
    p.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw")
    p.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb")
    p.add_argument("--no-fp16", action="store_true", help="TensorRT: no FP16 kernels")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch in the file's runtime")
    return parser


def load_for_export(name: str | None, checkpoint: str, num_classes: int | None = None) -> nn.Module:
    """A detector with the checkpoint's architecture and weights, eval mode, on CPU (``detectkit.load``:
    safe reading, integrity check, recorded pruning/quantization replayed, EMA weights)."""
    from detectkit.checkpoint import CheckpointError, load

    try:
        return load(checkpoint, model=name, num_classes=num_classes).eval()
    except CheckpointError as e:
        raise SystemExit(str(e)) from None  # one line via detectkit.cli.main


def calibration_images(folder: str, size: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Letterboxed float RGB NCHW batches from the images in ``folder`` (PTQ calibration)."""
    import torch

    from detectkit.data.images import IMAGE_EXTENSIONS, read_image
    from detectkit.data.letterbox import letterbox

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"no images found in {folder}")
    tensors = [torch.from_numpy(letterbox(read_image(p), size)[0]).permute(2, 0, 1) for p in paths]
    return [torch.stack(tensors[i : i + batch_size]).float() / 255.0 for i in range(0, len(tensors), batch_size)]


def _default_stem(model: nn.Module) -> str:
    """The output file's default name: the registry name the checkpoint records (yolo_nas_s)."""
    from detectkit.registry import name_of

    return name_of(model) or type(model).__name__.lower()


def run_export(args: argparse.Namespace) -> int:
    from detectkit.compress.quantize import is_quantized, quantize_model
    from detectkit.export.deploy import ExportConfig, export_detector
    from detectkit.export.tensorrt import add_efficient_nms, build_engine

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.format in UNAVAILABLE:
        raise SystemExit(UNAVAILABLE[args.format])
    if args.format == "torchscript" and args.nms not in (None, "none"):
        raise SystemExit("--format torchscript exports raw boxes and scores; drop --nms (apply "
                         "torchvision.ops.batched_nms to the outputs)")
    if args.format in ("openvino", "torchscript") and args.int8:
        raise SystemExit(f"--int8 exports ONNX (--format onnx or tensorrt), not --format {args.format}")
    if args.size is not None and args.size % 32:
        raise SystemExit(f"--size must be a multiple of 32, got {args.size}")
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
    model = load_for_export(args.model, args.checkpoint, args.num_classes)
    _fill_defaults_from_model(args, model)
    if args.nms is None:  # NMS inside the graph, as the README promises; CPU INT8 quantizes the raw graph
        raw_only = args.format == "torchscript" or (args.int8 and args.int8_backend == "onnxruntime")
        args.nms = "none" if raw_only else "batch"
    quantized = is_quantized(model)
    if args.int8 and args.int8_backend == "onnxruntime":
        return _export_onnxruntime_int8(model, args, quantized)
    if args.int8 and not quantized:
        if not args.calib:
            raise SystemExit("--int8 needs a QAT/PTQ checkpoint or --calib IMAGES_DIR for post-training quantization")
        model = quantize_model(model, calibration_images(args.calib, args.size), args.calib_batches).eval()
        quantized = True
    if not quantized and hasattr(model, "fuse"):
        model.fuse()
    name = args.model or _default_stem(model)
    output = Path(args.output or f"{name}{SUFFIX[args.format]}")
    nms = None if args.nms == "none" or args.format == "tensorrt" else args.nms
    config = ExportConfig(
        image_size=args.size, batch_size=args.batch_size, nms=nms, conf=args.conf, iou=args.iou, top_k=args.top_k,
        max_det=args.max_det, agnostic=args.agnostic, uint8_input=args.uint8, layout=args.layout,
        channel_order=args.channel_order,
    )
    if args.format == "onnx":
        result = export_detector(model, output, config, check=not args.no_check, exact=not quantized)
        summary: dict[str, Any] = {**result.to_dict(), "quantized": quantized}
    elif args.format == "openvino":
        from detectkit.export.openvino import export_openvino

        result = export_openvino(model, output, config, check=not args.no_check, exact=not quantized)
        summary = {**result.to_dict(), "weights": str(output.with_suffix(".bin")), "quantized": quantized}
    elif args.format == "torchscript":
        from detectkit.export.torchscript import export_torchscript

        if quantized:
            raise SystemExit("--format torchscript takes a float checkpoint; export a QAT/PTQ one with --format onnx")

        summary = {**export_torchscript(model, output, config, check=not args.no_check).to_dict(), "quantized": False}
    else:
        raw = output.with_suffix(".raw.onnx")
        result = export_detector(model, raw, config, check=not args.no_check, exact=not quantized)
        trt_onnx = add_efficient_nms(raw, output.with_suffix(".trt.onnx"), args.conf, args.iou, args.max_det,
                                     agnostic=args.agnostic)
        raw.unlink()
        shape = result.input_shape
        built = build_engine(trt_onnx, output.with_suffix(".engine"), input_shape=shape, fp16=not args.no_fp16,
                             int8=quantized)
        summary = {**result.to_dict(), "path": str(trt_onnx), "engine_or_script": str(built), "quantized": quantized}
    print(json.dumps(summary, default=str))
    return 0


def _fill_defaults_from_model(args: argparse.Namespace, model: nn.Module) -> None:
    """Options left unset take the model's own inference defaults (from its checkpoint record)."""
    from detectkit.models.base import InferenceDefaults

    inference = getattr(model, "inference", None) or InferenceDefaults()
    if args.size is None:
        h, w = inference.image_size
        if h != w:
            raise SystemExit(f"the checkpoint was validated at {h}x{w}; pass --size for a square export")
        args.size = int(h)
    post = inference.postprocess
    for name, value in (("conf", post.conf), ("iou", post.iou), ("top_k", post.top_k), ("max_det", post.max_det),
                        ("agnostic", post.agnostic)):
        if getattr(args, name) is None:
            setattr(args, name, value)


def _export_onnxruntime_int8(model: nn.Module, args: argparse.Namespace, quantized: bool) -> int:
    """FP32 graph -> onnxruntime static QDQ INT8 calibrated on ``--calib`` (CPU deployment)."""
    from detectkit.export.deploy import ExportConfig, export_detector
    from detectkit.export.ort_int8 import quantize_for_onnxruntime

    if quantized:
        raise SystemExit("--int8-backend onnxruntime quantizes a float checkpoint; this one is already fake-quantized")
    if not args.calib or args.format != "onnx" or args.nms != "none" or args.uint8:
        raise SystemExit("--int8-backend onnxruntime needs --calib, --format onnx, no --nms and no --uint8")
    model.fuse()
    output = Path(args.output or f"{args.model or _default_stem(model)}.onnx")
    fp32 = output.with_suffix(".fp32.onnx")
    export_detector(model, fp32, ExportConfig(image_size=args.size), check=not args.no_check)
    batches = calibration_images(args.calib, args.size, batch_size=1)[: args.calib_batches]
    quantize_for_onnxruntime(fp32, output, [b.numpy() for b in batches])
    fp32.unlink()
    from detectkit.export.deploy import onnx_op_counts

    print(json.dumps({"path": str(output), "quantized": True, "backend": "onnxruntime", "op_counts": onnx_op_counts(output)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from detectkit.errors import OptionParser

    parser = add_export_arguments(OptionParser(prog="detectkit export", description=__doc__))
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
