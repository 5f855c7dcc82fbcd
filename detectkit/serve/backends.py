"""What runs the network inside a server worker: PyTorch, onnxruntime, OpenVINO or TensorRT.

Every backend maps a float RGB NCHW batch in [0, 1] to the raw ``(boxes [B,A,4], scores
[B,A,C])`` of the detector contract; post-processing stays in the one PyTorch
``detectkit.ops.postprocess`` for all of them, so per-request ``conf``/``iou``/``max_det`` work
on every backend and the results equal ``model.predict``. The ONNX graph is the raw export of
:func:`detectkit.export.deploy.export_detector` (dynamic batch, checked against PyTorch when
written); OpenVINO runs the IR converted from that graph (checked against PyTorch when written,
compiled in f32); YOLO-World is exported with its vocabulary baked in (fixed classes).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from detectkit.utils.files import atomic_write

log = logging.getLogger("detectkit.serve")

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")


class BackendUnavailable(RuntimeError):
    """The backend's package or hardware is not on this machine."""


class TorchBackend:
    """The PyTorch model (Conv+BN fused on a copy), optionally with per-image vocabularies."""

    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        net = copy.deepcopy(model).eval()
        fused = net.fuse() if hasattr(net, "fuse") else net
        self.net = (fused if isinstance(fused, nn.Module) else net).to(device).eval()
        self.device = device
        self.dtype = next((p.dtype for p in self.net.parameters() if p.is_floating_point()), torch.float32)
        self.supports_text = hasattr(self.net, "txt_feats") and not getattr(self.net, "reparameterized", False)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, text: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device, self.dtype)
        if text is None:
            return self.net(x)
        return self.net(x, text=text.to(self.device, self.dtype), text_mask=text_mask.to(self.device))


class OnnxRuntimeBackend:
    """An onnxruntime session over the raw (boxes, scores) graph; CUDA provider when asked and present."""

    name = "onnxruntime"
    supports_text = False

    def __init__(self, path: str | os.PathLike, device: torch.device, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable("--backend onnxruntime needs `pip install detectkit[export]` (onnxruntime)") from e
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("onnxruntime on cuda needs onnxruntime-gpu (CUDAExecutionProvider absent)")
            providers.insert(0, "CUDAExecutionProvider")
        from detectkit.export.onnx import ort_session

        self.session = ort_session(path, threads, providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor, text: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if text is not None:
            raise ValueError("the ONNX graph has its vocabulary baked in; it takes no per-request classes")
        boxes, scores = self.session.run(None, {self.input_name: images.float().cpu().numpy()})
        return torch.from_numpy(boxes), torch.from_numpy(scores)


class OpenVINOBackend:
    """The OpenVINO IR of the raw (boxes, scores) graph, compiled for the CPU in f32."""

    name = "openvino"
    supports_text = False

    def __init__(self, xml_path: str | os.PathLike, device: torch.device, threads: int | None = None) -> None:
        check_openvino(device)
        from detectkit.export.openvino import compile_openvino

        self.compiled = compile_openvino(xml_path, threads)

    def __call__(self, images: torch.Tensor, text: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if text is not None:
            raise ValueError("the OpenVINO model has its vocabulary baked in; it takes no per-request classes")
        result = self.compiled(images.float().cpu().numpy())
        boxes, scores = (result[o] for o in self.compiled.outputs)
        return torch.from_numpy(boxes), torch.from_numpy(scores)


class TensorRTBackend:
    """A TensorRT engine built from the raw ONNX graph (dynamic batch 1..max_batch), run on CUDA."""

    name = "tensorrt"
    supports_text = False

    def __init__(self, engine_path: str | os.PathLike, device: torch.device) -> None:
        check_tensorrt(device)
        import tensorrt as trt

        self.device = device
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if n != self.input_name]

    def __call__(self, images: torch.Tensor, text: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if text is not None:
            raise ValueError("the TensorRT engine has its vocabulary baked in; it takes no per-request classes")
        x = images.to(self.device, torch.float32).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)  # the stream that produced x: no cross-stream race
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outputs["boxes"], outputs["scores"]


def check_tensorrt(device: torch.device | str) -> None:
    """A clear error when TensorRT cannot run here (checked before the server starts)."""
    from detectkit.export.tensorrt import tensorrt_available

    if not tensorrt_available():
        raise BackendUnavailable("--backend tensorrt needs the `tensorrt` package and a CUDA GPU; neither is usable "
                                 "here. Use --backend onnxruntime or torch, or install TensorRT on a GPU machine.")
    if torch.device(device).type != "cuda":
        raise BackendUnavailable("--backend tensorrt runs on a CUDA device; pass --device cuda")


def check_openvino(device: torch.device | str) -> None:
    """A clear error when OpenVINO cannot run here (checked before the server starts)."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        raise BackendUnavailable("--backend openvino needs the package 'openvino', which is not installed: "
                                 "pip install 'detectkit[openvino]'")
    if torch.device(device).type != "cpu":
        raise BackendUnavailable("--backend openvino runs on the CPU; pass --device cpu")


def _fingerprint(checkpoint: str | os.PathLike, *parts: Any) -> str:
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(repr(parts).encode())
    return digest.hexdigest()[:16]


def prepare_onnx(model: nn.Module, checkpoint: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Export (once per checkpoint content and input size) the raw graph the ORT/TensorRT backends run.

    The file is keyed by the checkpoint's bytes, the input size and the detectkit version, so a
    retrained checkpoint never reuses a stale graph. YOLO-World is exported with the checkpoint's
    vocabulary baked in.
    """
    import detectkit
    from detectkit.export.deploy import ExportConfig, export_detector

    size = tuple(model.inference.image_size)
    key = _fingerprint(checkpoint, size, detectkit.__version__)
    path = Path(cache_dir) / f"{Path(checkpoint).stem}-{size[0]}x{size[1]}-{key}.onnx"
    if path.is_file():
        log.info("reusing exported graph", extra={"fields": {"event": "onnx_cache_hit", "path": str(path)}})
        return path
    net = copy.deepcopy(model).cpu().float().eval()
    if hasattr(net, "reparameterize"):
        net = net.reparameterize()
    net = net.fuse() if hasattr(net, "fuse") else net
    # atomic: a concurrent server never reads a half-written file
    atomic_write(path, lambda partial: export_detector(net, partial, ExportConfig(image_size=size, dynamic_batch=True,
                                                                                  nms=None)))
    log.info("exported graph", extra={"fields": {"event": "onnx_exported", "path": str(path)}})
    return path


def prepare_openvino(model: nn.Module, onnx_path: Path) -> Path:
    """Convert (once) the cached raw graph to OpenVINO IR beside it, checked against ``model``."""
    from detectkit.export.deploy import ExportConfig
    from detectkit.export.openvino import check_openvino as check_ir
    from detectkit.export.openvino import save_openvino

    xml = onnx_path.with_suffix(".xml")
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    net = copy.deepcopy(model).cpu().float().eval()
    if hasattr(net, "reparameterize"):
        net = net.reparameterize()
    net = net.fuse() if hasattr(net, "fuse") else net
    staged = onnx_path.with_name(f"{onnx_path.stem}.{os.getpid()}.staged.xml")
    try:  # checked before it takes the cache name: a wrong IR is never reused
        save_openvino(onnx_path, staged)
        check_ir(net, staged, ExportConfig(image_size=tuple(model.inference.image_size), nms=None))
        # the checked IR takes its cache name through the one atomic write (fsynced, .bin before .xml)
        atomic_write(xml.with_suffix(".bin"), lambda partial: os.replace(staged.with_suffix(".bin"), partial))
        atomic_write(xml, lambda partial: os.replace(staged, partial))
    finally:
        staged.unlink(missing_ok=True)
        staged.with_suffix(".bin").unlink(missing_ok=True)
    log.info("converted graph", extra={"fields": {"event": "openvino_converted", "path": str(xml)}})
    return xml


def prepare_engine(onnx_path: Path, image_size: tuple[int, int], max_batch: int, fp16: bool = True) -> Path:
    """Build (once) a TensorRT engine with a 1..max_batch dynamic-batch profile."""
    from detectkit.export.tensorrt import build_engine

    engine = onnx_path.with_suffix(f".b{max_batch}{'.fp16' if fp16 else ''}.engine")
    if engine.is_file():
        return engine
    built = build_engine(onnx_path, engine, input_shape=(max_batch, 3, *image_size), fp16=fp16, max_batch=max_batch)
    if Path(built) != engine:
        raise BackendUnavailable(f"TensorRT engine not built (script written to {built})")
    return engine
