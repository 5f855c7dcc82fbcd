"""INT8 quantization on nvidia-modelopt (TensorRT's scheme), without Lightning: PTQ, restoring a
quantized architecture (per-layer sensitivity: :mod:`detectkit.compress.sensitivity`). :class:`detectkit.callbacks.QuantizationAwareTraining`
schedules QAT with these; ``detectkit.checkpoint`` replays ``{"op": "quantize", ...}``
(:func:`quantize_op`) with :func:`restore_quantized`.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "quantization_config", "quantize_model", "partial_fuse", "restore_quantized", "is_quantized",
    "calibration_loop", "quantize_op", "batch_images", "quantizers_by_layer",
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


def batch_images(batch: Any) -> torch.Tensor:
    """The float (0..1) images of a loader batch (a dict, a tuple/list or a tensor)."""
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
                model(batch_images(batch).to(device))
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
def quantizers_by_layer(model: nn.Module) -> dict[str, list[nn.Module]]:
    layers: dict[str, list[nn.Module]] = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "TensorQuantizer" and m.is_enabled:
            layers.setdefault(name.rsplit(".", 1)[0], []).append(m)
    return layers


def quantize_op(model: nn.Module, skip_layers: Sequence[str] = ()) -> dict[str, Any]:
    """The architecture op of a quantized ``model`` (modelopt's state: which quantizers, where)."""
    import modelopt.torch.opt as mto

    return {"op": "quantize", "modelopt_state": mto.modelopt_state(model), "partial_fused": True,
            "skip_layers": list(skip_layers)}
