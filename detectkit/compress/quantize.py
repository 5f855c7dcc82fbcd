"""INT8 quantization on nvidia-modelopt (TensorRT's scheme), without Lightning: PTQ, restoring a
quantized architecture, per-layer sensitivity. :class:`detectkit.callbacks.QuantizationAwareTraining`
schedules QAT with these; ``detectkit.checkpoint`` replays ``{"op": "quantize", ...}``
(:func:`quantize_op`) with :func:`restore_quantized`.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "quantization_config", "quantize_model", "partial_fuse", "restore_quantized", "is_quantized",
    "quantization_sensitivity", "select_skip_layers", "calibration_loop", "quantize_op",
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
    from detectkit.compress.sensitivity import output_error

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
            score = output_error(qmodel, inputs, refs)
        for q in by_layer[name]:
            q.disable()
        scores.append((name, float(score)))
    return sorted(scores, key=lambda t: t[1], reverse=True)


def select_skip_layers(sensitivity: Sequence[tuple[str, float]], top_k: int) -> list[str]:
    """The ``top_k`` most sensitive layer names, ready for ``skip_layers``."""
    return [name for name, _ in list(sensitivity)[: max(0, top_k)]]


def quantize_op(model: nn.Module, skip_layers: Sequence[str] = ()) -> dict[str, Any]:
    """The architecture op of a quantized ``model`` (modelopt's state: which quantizers, where)."""
    import modelopt.torch.opt as mto

    return {"op": "quantize", "modelopt_state": mto.modelopt_state(model), "partial_fused": True,
            "skip_layers": list(skip_layers)}
