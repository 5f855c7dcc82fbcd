"""``ExportOnFitEnd``: the trained detector leaves ``fit`` as a checked ONNX file (and an engine).

Which weights: the best checkpoint a ``ModelCheckpoint`` tracked (when its architecture still
matches the final model; a pre-QAT best checkpoint does not), else the final weights. With a
``WeightAveraging``/EMA callback both are the averaged weights (Lightning copies the average into
the module at ``on_train_end`` and saves it as the checkpoint's ``state_dict``). Float models
are fused; fake-quantized (QAT/PTQ) models are exported as Q/DQ graphs unfused (TensorRT folds
Conv+BN itself, and folding would invalidate the calibrated weight scales).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from detectkit.callbacks.utils import detector_of
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from detectkit.export.deploy import ExportConfig, ExportResult, export_detector

__all__ = ["ExportOnFitEnd", "log_artifact"]

log = logging.getLogger(__name__)


def _is_quantized(model: nn.Module) -> bool:
    return any(type(m).__name__ == "TensorQuantizer" for m in model.modules())


def log_artifact(trainer: pl.Trainer, path: str | os.PathLike, name: str | None = None) -> None:
    """Send a file to every logger that stores artifacts (MLflow, W&B); others keep the run dir."""
    path = str(path)
    for logger in trainer.loggers:
        kind = type(logger).__name__
        try:
            if kind == "MLFlowLogger":
                logger.experiment.log_artifact(logger.run_id, path, artifact_path="export")
            elif kind == "WandbLogger":
                import wandb

                artifact = wandb.Artifact(name or Path(path).stem.replace(".", "-"), type="model")
                artifact.add_file(path)
                logger.experiment.log_artifact(artifact)
        except Exception as e:  # an artifact upload must not lose the exported file
            log.warning("could not log %s to %s: %s", path, kind, e)


class ExportOnFitEnd(Callback):
    """Export the fitted detector to ONNX (dynamic batch, optional NMS/uint8 input) and TensorRT.

    Args:
        dirpath: output folder; default ``<the run's own folder>/export`` (see
            :func:`detectkit.integrations.tracking.run_dir`: runs sharing an MLflow/W&B ``save_dir`` keep theirs).
        filename: file stem; files are ``<stem>.onnx`` (+ ``<stem>.trt.onnx`` with
            ``EfficientNMS_TRT``, ``<stem>.engine`` or ``<stem>.trtexec.sh``, ``<stem>.json``).
        image_size: export resolution (int or (h, w), multiples of 32); default the size the model
            is validated at (the one its checkpoint records, so predict and the ONNX file agree).
        nms: ``None`` (raw boxes/scores), ``"batch"`` or ``"flat"`` (super-gradients' formats).
        conf, iou, top_k, max_det: post-processing embedded with ``nms``.
        uint8_input, layout, channel_order: embed ``/255``, NHWC->NCHW and BGR->RGB.
        tensorrt: also build (or script) a TensorRT engine from the ``EfficientNMS_TRT`` graph.
        fp16: TensorRT FP16; INT8 is used automatically for a fake-quantized model.
        use_best: prefer the best checkpoint of a ``ModelCheckpoint``.
        check: verify the file in onnxruntime against PyTorch (raises on mismatch).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "model",
        image_size: int | tuple[int, int] | None = None,
        nms: str | None = "batch",
        conf: float = 0.25,
        iou: float = 0.7,
        top_k: int = 1000,
        max_det: int = 300,
        uint8_input: bool = False,
        layout: str = "nchw",
        channel_order: str = "rgb",
        tensorrt: bool = True,
        fp16: bool = True,
        use_best: bool = True,
        check: bool = True,
    ) -> None:
        self.dirpath, self.filename = dirpath, filename
        self.config = ExportConfig(
            image_size=image_size, nms=nms, conf=conf, iou=iou, top_k=top_k, max_det=max_det,
            uint8_input=uint8_input, layout=layout, channel_order=channel_order,
        )
        self.tensorrt, self.fp16, self.use_best, self.check = tensorrt, fp16, use_best, check
        self.result: ExportResult | None = None
        self.files: list[str] = []

    # ----------------------------------------------------------------- hooks
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)
        trainer.strategy.barrier("ExportOnFitEnd")

    # ------------------------------------------------------------ the work
    def output_dir(self, trainer: pl.Trainer) -> Path:
        from detectkit.integrations.tracking import run_dir

        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "export"

    def export_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        """A CPU copy of the detector holding the weights to ship, fused unless quantized."""
        model = copy.deepcopy(detector_of(pl_module)).cpu().float().eval()
        best = self._best_checkpoint(trainer)
        if best is not None:
            from detectkit.checkpoint import read_checkpoint  # safe unpickling + integrity check

            state = read_checkpoint(best)["state_dict"]
            prefix = "model." if detector_of(pl_module) is not pl_module else ""
            weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                model.load_state_dict(weights, strict=True)
                log.info("ExportOnFitEnd: exporting the best checkpoint %s", best)
            except RuntimeError as e:
                log.warning("ExportOnFitEnd: best checkpoint %s does not fit the final architecture (%s); "
                            "exporting the final weights", best, str(e).splitlines()[0])
        if not _is_quantized(model) and hasattr(model, "fuse"):
            model.fuse()
        return model

    def _best_checkpoint(self, trainer: pl.Trainer) -> str | None:
        if not self.use_best:
            return None
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.best_model_path and os.path.isfile(cb.best_model_path):
                return cb.best_model_path
        return None

    def _sample(self, trainer: pl.Trainer) -> torch.Tensor | None:
        """A real validation batch at the export size (so the NMS check sees real detections)."""
        try:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
            if loader is None:
                return None
            images = next(iter(loader))["images"][:2]
        except Exception:
            return None
        if tuple(images.shape[-2:]) != self.config.image_size:
            return None
        if images.dtype != torch.uint8:
            images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        if not self.config.uint8_input:
            return images.float() / 255.0
        if self.config.channel_order == "bgr":
            images = images.flip(1)
        return images.permute(0, 2, 3, 1).contiguous() if self.config.layout == "nhwc" else images

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ExportResult:
        out = self.output_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        model = self.export_model(trainer, pl_module)
        defaults = getattr(pl_module, "inference_defaults", None)  # DetectionModule: what its checkpoint records
        if callable(defaults):
            model.inference = defaults()
        self.config = self.config.for_model(model)
        quantized = _is_quantized(model)
        onnx_path = out / f"{self.filename}.onnx"
        self.result = export_detector(
            model, onnx_path, self.config, check=self.check, sample=self._sample(trainer), exact=not quantized
        )
        files = [onnx_path]
        if quantized:
            log.info("ExportOnFitEnd: Q/DQ graph with %d QuantizeLinear nodes", self.result.op_counts.get("QuantizeLinear", 0))
        if self.tensorrt:
            files += self._tensorrt(model, out, int8=quantized)
        meta = out / f"{self.filename}.json"
        meta.write_text(json.dumps({**self.result.to_dict(), "quantized": quantized, "config": vars(self.config)}, indent=2, default=str))
        files.append(meta)
        self.files = [str(f) for f in files]
        metrics: dict[str, Any] = {}
        if self.result.max_abs_error is not None:
            metrics["export/max_abs_error"] = self.result.max_abs_error
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=trainer.global_step)
        for f in files:
            log_artifact(trainer, f)
        log.info("ExportOnFitEnd: wrote %s", ", ".join(self.files))
        return self.result

    def _tensorrt(self, model: nn.Module, out: Path, int8: bool) -> list[Path]:
        """Raw graph + ``EfficientNMS_TRT`` -> engine (or the trtexec script when TensorRT is absent)."""
        from detectkit.export.tensorrt import add_efficient_nms, build_engine

        raw_cfg = dataclasses.replace(self.config, nms=None)
        raw = out / f"{self.filename}.raw.onnx"
        export_detector(model, raw, raw_cfg, check=False)
        trt_onnx = add_efficient_nms(raw, out / f"{self.filename}.trt.onnx", self.config.conf, self.config.iou,
                                     self.config.max_det)
        raw.unlink()
        shape = (self.config.batch_size, 3, *self.config.image_size)
        if self.config.uint8_input and self.config.layout == "nhwc":
            shape = (self.config.batch_size, *self.config.image_size, 3)
        built = build_engine(trt_onnx, out / f"{self.filename}.engine", input_shape=shape, fp16=self.fp16, int8=int8)
        return [trt_onnx, built]

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"files": list(self.files)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.files = list(state_dict.get("files", []))
