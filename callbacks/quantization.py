"""INT8 quantization on nvidia-modelopt: QAT callback, PTQ, and per-layer sensitivity analysis.

TensorRT's INT8 scheme (``mtq.INT8_DEFAULT_CFG``): per-output-channel weight scales, per-tensor
activation scales, max calibration. The fake-quantized model exports to a Q/DQ ONNX graph
(``torch.onnx.export(dynamo=False, opset_version=17)``) that TensorRT builds as an explicitly
quantized engine and onnxruntime runs as is.

As in super-gradients' QAT recipe, QARepVGG blocks are first *partially* fused (three branches
-> one 3x3 conv, ``post_bn`` kept) so each block has one kernel to quantize, EMA is off during
QAT and the LR is lowered. The quantized architecture is saved as ``mto.modelopt_state`` in the
callback's checkpoint state; on resume it is rebuilt in ``setup`` (before Lightning loads the
weights, which include every quantizer's ``_amax``).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from detectkit.callbacks.utils import (
    copy_average_to_model,
    detector_of,
    prepare_architecture_restore,
    rebuild_after_surgery,
    weight_averaging_callbacks,
)
from lightning.pytorch.callbacks import Callback

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


def _mtq():
    import modelopt.torch.quantization as mtq

    return mtq


def is_quantized(model: nn.Module) -> bool:
    """The model holds modelopt quantizers (QAT/PTQ applied)."""
    return any(type(m).__name__ == "TensorQuantizer" for m in model.modules())


def quantization_config(skip_layers: Sequence[str] = ()) -> dict[str, Any]:
    """``INT8_DEFAULT_CFG`` plus one disabling entry per ``skip_layers`` module-name pattern (fnmatch)."""
    cfg = copy.deepcopy(_mtq().INT8_DEFAULT_CFG)
    entries = cfg["quant_cfg"]
    for pattern in skip_layers:
        if isinstance(entries, list):
            entries.append({"quantizer_name": f"{pattern}.*quantizer", "enable": False})
        else:  # older modelopt: dict keyed by pattern
            entries[f"{pattern}.*quantizer"] = {"enable": False}
    return cfg


def partial_fuse(model: nn.Module) -> nn.Module:
    """Merge QARepVGG branches, keep ``post_bn`` (SG's ``prep_model_for_conversion`` before QAT)."""
    from detectkit.nn.qarepvgg import QARepVGGBlock

    was_training = model.training
    model.eval()  # fusion folds eval-mode BN statistics
    fuse = getattr(model, "fuse", None)
    if fuse is not None and "full" in inspect.signature(fuse).parameters:
        fuse(full=False)
    else:
        for m in model.modules():
            if isinstance(m, QARepVGGBlock):
                m.partial_fusion()
    model.train(was_training)
    return model


def _images(batch: Any) -> torch.Tensor:
    images = batch["images"] if isinstance(batch, dict) else batch[0] if isinstance(batch, list | tuple) else batch
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def calibration_loop(batches: Iterable[Any], num_batches: int, device: torch.device) -> Callable[[nn.Module], None]:
    """modelopt ``forward_loop``: eval-mode forwards over the first ``num_batches`` batches."""

    def forward_loop(model: nn.Module) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if i >= num_batches:
                    break
                model(_images(batch).to(device))
        model.train(was_training)

    return forward_loop


def quantize_model(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 16,
    skip_layers: Sequence[str] = (),
    fuse: bool = True,
) -> nn.Module:
    """PTQ: partial QARepVGG fusion, INT8 quantizers, max calibration on ``num_batches`` batches."""
    if fuse:
        partial_fuse(model)
    device = next(model.parameters()).device
    return _mtq().quantize(model, quantization_config(skip_layers), calibration_loop(batches, num_batches, device))


def restore_quantized(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized architecture saved by :class:`QuantizationAwareTraining` (weights not loaded)."""
    import modelopt.torch.opt as mto

    if state.get("partial_fused", True):
        partial_fuse(model)
    return mto.restore_from_modelopt_state(model, state["modelopt_state"])


# ----------------------------------------------------------------------------- sensitivity
def _quantizers_by_layer(model: nn.Module) -> dict[str, list[nn.Module]]:
    layers: dict[str, list[nn.Module]] = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "TensorQuantizer" and m.is_enabled:
            layers.setdefault(name.rsplit(".", 1)[0], []).append(m)
    return layers


def _output_error(model: nn.Module, inputs: list[torch.Tensor], refs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean |score| error + mean |box| error / image size: 0 for an exact model."""
    err = 0.0
    with torch.no_grad():
        for x, (rb, rs) in zip(inputs, refs):
            b, s = model(x)
            err += float((s - rs).abs().mean()) + float((b - rb).abs().mean()) / max(x.shape[-2:])
    return err / max(1, len(inputs))


def quantization_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 4,
    metric_fn: Callable[[nn.Module], float] | None = None,
    layers: Sequence[str] | None = None,
) -> list[tuple[str, float]]:
    """Rank layers by the damage INT8 does to each one alone (super-gradients' unreleased "adaptive" QAT).

    The model is copied, partially fused and calibrated once; then, for each layer, only that
    layer's quantizers are enabled and the model is scored: ``metric_fn(model)`` (higher is
    better, e.g. mAP on a validation subset; the score is the drop from the float model) or,
    by default, the output error against the float model on the calibration batches. Returns
    ``(layer name, score)`` sorted from most to least sensitive; the head of the list is what
    :func:`select_skip_layers` keeps in float.
    """
    float_model = partial_fuse(copy.deepcopy(model)).eval()
    device = next(float_model.parameters()).device
    inputs = []
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        inputs.append(_images(batch).to(device))
    with torch.no_grad():
        refs = [float_model(x) for x in inputs]
    base = metric_fn(float_model) if metric_fn is not None else 0.0
    qmodel = quantize_model(copy.deepcopy(float_model), inputs, len(inputs), fuse=False).eval()
    by_layer = _quantizers_by_layer(qmodel)
    names = [n for n in by_layer if layers is None or any(fnmatch.fnmatch(n, p) for p in layers)]
    for qs in by_layer.values():
        for q in qs:
            q.disable()
    scores = []
    for name in names:
        for q in by_layer[name]:
            q.enable()
        if metric_fn is not None:
            score = base - metric_fn(qmodel)
        else:
            score = _output_error(qmodel, inputs, refs)
        for q in by_layer[name]:
            q.disable()
        scores.append((name, float(score)))
    return sorted(scores, key=lambda t: t[1], reverse=True)


def select_skip_layers(sensitivity: Sequence[tuple[str, float]], top_k: int) -> list[str]:
    """The ``top_k`` most sensitive layer names, ready for ``skip_layers``."""
    return [name for name, _ in list(sensitivity)[: max(0, top_k)]]


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
    #: rebuilt after pruning (order 0), before distillation adapters
    architecture_order = 1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module  # state_dict() serialises modelopt's state of this model
        if stage == "fit":
            prepare_architecture_restore(trainer, pl_module)

    def rebuild_architecture(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """Resume: quantize the (float) model the way the checkpoint's model was, weights not loaded."""
        if state.get("quantized") and not self.quantized:
            self._set_detector(pl_module, restore_quantized(detector_of(pl_module), state))
            self.quantized, self.quantized_at_epoch = True, state.get("quantized_at_epoch")
            self.skip_layers = list(state.get("skip_layers", self.skip_layers))
            log.info("QAT: rebuilt the quantized model from the checkpoint")

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
        self.quantized_at_epoch = state_dict.get("quantized_at_epoch")
        self.skip_layers = list(state_dict.get("skip_layers", self.skip_layers))
        self.sensitivity = [tuple(t) for t in state_dict.get("sensitivity", [])]
