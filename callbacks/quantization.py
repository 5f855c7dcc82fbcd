"""INT8 quantization on nvidia-modelopt: QAT callback, PTQ, and per-layer sensitivity analysis.

TensorRT's INT8 scheme (``mtq.INT8_DEFAULT_CFG``): per-output-channel weight scales, per-tensor
activation scales, max calibration. The fake-quantized model exports to a Q/DQ ONNX graph
(``torch.onnx.export(dynamo=False, opset_version=17)``) that TensorRT builds as an explicitly
quantized engine and onnxruntime runs as is.

As in super-gradients' QAT recipe, QARepVGG blocks are first *partially* fused (three branches
-> one 3x3 conv, ``post_bn`` kept) so each block has one kernel to quantize, EMA is off during
QAT and the LR is lowered. The quantized architecture (``mto.modelopt_state``) is appended to the
module's architecture ops (``{"op": "quantize", ...}``); on resume/load it is rebuilt by the
module's ``on_load_checkpoint`` before Lightning loads the weights (every quantizer's ``_amax``).
The algorithms live in ``detectkit.compress.quantize``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from detectkit.callbacks.utils import (
    copy_average_to_model,
    detector_of,
    rebuild_after_surgery,
    weight_averaging_callbacks,
)
from lightning.pytorch.callbacks import Callback

from detectkit.checkpoint import ArchitectureRecorder
from detectkit.compress.quantize import (  # noqa: F401 (re-exported: the algorithms live in detectkit.compress)
    calibration_loop,
    is_quantized,
    partial_fuse,
    quantization_config,
    quantize_model,
    quantize_op,
    restore_quantized,
)
from detectkit.compress.sensitivity import quantization_sensitivity, select_skip_layers  # noqa: F401

__all__ = [
    "QuantizationAwareTraining",
    "quantization_config",
    "quantize_model",
    "partial_fuse",
    "restore_quantized",
    "is_quantized",
    "quantization_sensitivity",
    "select_skip_layers",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- callback
class QuantizationAwareTraining(Callback):
    """Quantize the detector at ``start_epoch`` and fine-tune it with fake quantization (or PTQ only).

    Args:
        start_epoch: first epoch trained quantized (the float model is trained before it).
        calib_batches: training batches used for max calibration.
        lr_factor: multiplies every LR from ``start_epoch`` (super-gradients lowers it for QAT).
        skip_layers: module-name patterns (fnmatch, e.g. ``"heads.*.cls_pred"``) kept in float.
        sensitivity_top_k: if > 0, run :func:`quantization_sensitivity` on the calibration
            batches and add the ``top_k`` most sensitive layers to ``skip_layers``.
        disable_ema: copy the EMA weights into the model, then drop the ``WeightAveraging``
            callback for the quantized epochs (EMA of fake-quantized weights fights the scales).
        ptq: calibration only: quantize when training starts and stop (``trainer.should_stop``);
            ``ExportOnFitEnd`` then writes the Q/DQ model, ``trainer.validate`` scores it.
    """

    def __init__(
        self,
        start_epoch: int = 0,
        calib_batches: int = 16,
        lr_factor: float = 0.1,
        skip_layers: Sequence[str] = (),
        sensitivity_top_k: int = 0,
        disable_ema: bool = True,
        ptq: bool = False,
    ) -> None:
        self.start_epoch = int(start_epoch)
        self.calib_batches = int(calib_batches)
        self.lr_factor = float(lr_factor)
        self.skip_layers = list(skip_layers)
        self.sensitivity_top_k = int(sensitivity_top_k)
        self.disable_ema = disable_ema
        self.ptq = ptq
        self.quantized = False
        self.quantized_at_epoch: int | None = None
        self.sensitivity: list[tuple[str, float]] = []
        self._module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(start_epoch=self.start_epoch, ptq=self.ptq)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module  # state_dict() serialises modelopt's state of this model
        if stage == "fit" and not isinstance(pl_module, ArchitectureRecorder):
            raise TypeError(f"QuantizationAwareTraining needs a LightningModule that records architecture ops "
                            f"(detectkit.checkpoint.ArchitectureRecorder, e.g. DetectionModule), got {type(pl_module).__name__}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ptq:
            if not self.quantized:
                self.quantize(trainer, pl_module)
            trainer.should_stop = True  # calibration only
        elif self.quantized and self.disable_ema:
            self._drop_ema(trainer, pl_module, copy_average=False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.ptq and not self.quantized and trainer.current_epoch >= self.start_epoch:
            self.quantize(trainer, pl_module)
            rebuild_after_surgery(trainer, pl_module, lr_factor=self.lr_factor, reset_averaging=not self.disable_ema)

    # ------------------------------------------------------------------ work
    @staticmethod
    def _set_detector(pl_module: pl.LightningModule, model: nn.Module) -> None:
        if detector_of(pl_module) is not pl_module:
            pl_module.model = model

    def _drop_ema(self, trainer: pl.Trainer, pl_module: pl.LightningModule, copy_average: bool) -> None:
        emas = weight_averaging_callbacks(trainer)
        if copy_average:  # continue from the EMA weights, like SG
            copy_average_to_model(trainer, pl_module)
        if emas:
            # a new list: Lightning may be iterating the old one right now
            trainer.callbacks = [cb for cb in trainer.callbacks if cb not in emas]
            log.info("QAT: EMA disabled for the quantized epochs")

    def calibration_batches(self, trainer: pl.Trainer) -> Iterable[Any]:
        loader = trainer.train_dataloader
        if loader is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader
        return loader

    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.disable_ema:
            self._drop_ema(trainer, pl_module, copy_average=True)
        model = detector_of(pl_module)
        batches = self.calibration_batches(trainer)
        skip = list(self.skip_layers)
        if self.sensitivity_top_k > 0:
            self.sensitivity = quantization_sensitivity(model, batches, num_batches=min(4, self.calib_batches))
            skip += select_skip_layers(self.sensitivity, self.sensitivity_top_k)
            log.info("QAT: most sensitive layers kept in float: %s", skip[len(self.skip_layers):])
        self.skip_layers = skip
        model = quantize_model(model, batches, self.calib_batches, skip_layers=skip)
        model.train(pl_module.training)
        self._set_detector(pl_module, model)
        pl_module.record_architecture(quantize_op(model, skip))  # resume/load rebuild the quantizers
        self.quantized, self.quantized_at_epoch = True, trainer.current_epoch
        n = sum(1 for m in model.modules() if type(m).__name__ == "TensorQuantizer" and m.is_enabled)
        log.info("QAT: %d quantizers calibrated on %d batches at epoch %d", n, self.calib_batches, trainer.current_epoch)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "quantized": self.quantized,
            "quantized_at_epoch": self.quantized_at_epoch,
            "skip_layers": list(self.skip_layers),
            "partial_fused": True,
            "sensitivity": list(self.sensitivity),
        }
        if self.quantized and self._module is not None:
            import modelopt.torch.opt as mto

            state["modelopt_state"] = mto.modelopt_state(detector_of(self._module))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the module's on_load_checkpoint has already rebuilt the quantizers from the record
        self.quantized = bool(state_dict.get("quantized", False))
        self.quantized_at_epoch = state_dict.get("quantized_at_epoch")
        self.skip_layers = list(state_dict.get("skip_layers", self.skip_layers))
        self.sensitivity = [tuple(t) for t in state_dict.get("sensitivity", [])]
