"""Pruning sensitivity: which parts of a detector a channel cut hurts most, and the layer-wise
budget that follows (sensitive parts keep more channels).

:func:`pruning_sensitivity` prunes each *unit* (a submodule, by default every module two levels
deep that holds a prunable conv: ``backbone.stage1``, ``neck.neck2``, ``heads.head1`` ...) alone
by ``ratio`` on a copy of the model, recalibrates the copy's BatchNorm statistics on the same
batches (so the score is the damage that fine-tuning cannot undo cheaply, not stale statistics),
and measures the damage: by default the output error against the dense model on a few batches
(mean |score| difference + mean |box| difference / image side), or ``base - metric_fn(model)``
(e.g. mAP on a validation subset). :func:`budget_weights` turns the ranking into a per-unit
multiplier of the pruning ratio; :func:`detectkit.compress.prune.prune_to_macs` with
``unit_weights=`` then chases a global MACs target with those layer-wise ratios.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from detectkit.compress.prune import (
    DEFAULT_EXCLUDE,
    DEFAULT_KEEP,
    count_macs_params,
    prune_model,
    prune_to_macs,
)
from detectkit.compress.quantize import batch_images, partial_fuse, quantize_model, quantizers_by_layer

__all__ = ["prunable_units", "pruning_sensitivity", "budget_weights", "recalibrate_batchnorm", "output_error",
           "layerwise_prune", "quantization_sensitivity", "select_skip_layers"]

log = logging.getLogger(__name__)


def take_images(batches: Iterable[Any], num_batches: int, device: torch.device) -> list[torch.Tensor]:
    """The first ``num_batches`` image tensors (float, 0..1) of a loader or a list of tensors."""
    out = []
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        out.append(batch_images(batch).to(device))
    if not out:
        raise ValueError("no batches to measure on")
    return out


def prunable_units(model: nn.Module, depth: int = 2, exclude: Sequence[str] = (),
                   keep_layers: Sequence[str] = ()) -> list[str]:
    """Module names ``depth`` levels deep (fewer where the tree is shallower) that hold a Conv2d
    whose output channels may be pruned (not all of its convs matched by ``keep_layers``)."""
    units: list[str] = []
    for name, m in model.named_modules():
        if not name or any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        convs = [n for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]
        if convs and all(any(fnmatch.fnmatch(f"{name}.{n}".rstrip("."), p) for p in keep_layers) for n in convs):
            continue
        level = name.count(".") + 1
        has_conv = any(isinstance(c, nn.Conv2d) for c in m.modules())
        if not has_conv:
            continue
        leafish = level == depth or (level < depth and not any(
            any(isinstance(c, nn.Conv2d) for c in child.modules()) for child in m.children()))
        if leafish and not any(name.startswith(u + ".") for u in units):
            units.append(name)
    return units


def recalibrate_batchnorm(model: nn.Module, images: Sequence[torch.Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics (cumulative average) on ``images``.

    Pruning removes input channels of the layers after it, so their BN statistics no longer match;
    a few forward passes fix that without any training.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches below
    model.train()
    with torch.no_grad():
        for x in images:
            model(x)
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.train(was_training)
    return model


def output_error(model: nn.Module, inputs: Sequence[torch.Tensor], refs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean |score| error + mean |box| error / image side against ``refs`` (eval outputs); 0 if exact."""
    err = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, (rb, rs) in zip(inputs, refs):
            b, s = model(x)
            err += float((s - rs).abs().mean()) + float((b - rb).abs().mean()) / max(x.shape[-2:])
    model.train(was_training)
    return err / max(1, len(inputs))


def pruning_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    ratio: float = 0.3,
    num_batches: int = 4,
    units: Sequence[str] | None = None,
    metric_fn: Callable[[nn.Module], float] | None = None,
    recalibrate: bool = True,
    **prune_kwargs: Any,
) -> list[tuple[str, float]]:
    """``(unit, damage)`` from most to least sensitive: each unit pruned alone by ``ratio``.

    ``prune_kwargs`` go to :func:`detectkit.compress.prune.prune_model` (``image_size``,
    ``keep_layers``, ``exclude_modules``, ``importance``, ``round_to``). A unit torch-pruning
    leaves unchanged (everything in it kept) scores 0.
    """

    dense = partial_fuse(copy.deepcopy(model)).eval()
    device = next(dense.parameters()).device
    inputs = take_images(batches, num_batches, device)
    if recalibrate:  # the reference has the statistics the trials get: only the pruning differs
        recalibrate_batchnorm(dense, inputs).eval()
    with torch.no_grad():
        refs = [dense(x) for x in inputs]
    base = metric_fn(dense) if metric_fn is not None else 0.0
    names = list(units) if units is not None else prunable_units(
        dense, exclude=prune_kwargs.get("exclude_modules", DEFAULT_EXCLUDE),
        keep_layers=prune_kwargs.get("keep_layers", DEFAULT_KEEP))
    scores = []
    for name in names:
        trial = copy.deepcopy(dense)
        prune_model(trial, 0.0, unit_ratios={name: ratio}, **prune_kwargs)
        if recalibrate:
            recalibrate_batchnorm(trial, inputs)
        trial.eval()
        damage = base - metric_fn(trial) if metric_fn is not None else output_error(trial, inputs, refs)
        scores.append((name, float(damage)))
        log.debug("pruning sensitivity %s: %.4g", name, damage)
    return sorted(scores, key=lambda t: t[1], reverse=True)


def budget_weights(
    sensitivity: Sequence[tuple[str, float]], strength: float = 1.0, floor: float = 0.1, cap: float = 2.0,
    latency: dict[str, float] | None = None,
) -> dict[str, float]:
    """Per-unit multiplier of the pruning ratio, mean 1: the least sensitive unit is cut hardest.

    ``w_u`` is proportional to ``(1 / damage_u) ** strength`` (``strength=0``: uniform), normalised
    to mean 1 and clipped to ``[floor, cap]``: with the same global MACs target, the sensitive
    units keep more channels and the insensitive ones give more. ``latency`` (unit -> multiplier,
    :func:`detectkit.compress.latency.latency_weights`) scales each unit's share before the
    normalisation: units that cost more time per MAC give more, so the same MACs cut saves more time.
    """
    if not sensitivity:
        return {}
    damages = torch.tensor([max(float(d), 0.0) for _, d in sensitivity], dtype=torch.float64)
    eps = max(0.1 * float(damages.mean()), 1e-12)  # a unit with ~no damage gets ~10x the average share
    raw = (damages + eps).pow(-strength)
    if latency:
        raw = raw * torch.tensor([float(latency.get(name, 1.0)) for name, _ in sensitivity], dtype=torch.float64)
    w = (raw / raw.mean()).clamp(floor, cap)
    return {name: float(x) for (name, _), x in zip(sensitivity, w)}


def layerwise_prune(
    model: nn.Module,
    batches: Any,
    macs_ratio: float = 0.5,
    sensitivity_ratio: float = 0.3,
    strength: float = 1.0,
    num_batches: int = 4,
    recalibrate: bool = True,
    latency_size: int | None = None,
    latency_strength: float = 1.0,
    latency_threads: int = 1,
    **prune_kwargs: Any,
) -> dict[str, Any]:
    """One-shot layer-wise pruning to ``macs_ratio`` of the MACs, budgets from a sensitivity ranking.

    Ranks the units (:func:`~detectkit.compress.sensitivity.pruning_sensitivity`), turns the
    ranking into per-unit ratio multipliers, prunes to the MACs target, recalibrates BatchNorm on
    the same batches. With ``latency_size``, units that cost more onnxruntime time per MAC at that
    size (:mod:`detectkit.compress.latency`) give a larger share. Returns what it did
    (``sensitivity``, ``weights``, ``latency`` profile, MACs before/after).
    """
    image_size = prune_kwargs.get("image_size", 64)
    base, _ = count_macs_params(model, image_size)
    sens = pruning_sensitivity(model, batches, ratio=sensitivity_ratio, num_batches=num_batches, **prune_kwargs)
    profile, lat = None, None
    if latency_size:
        from detectkit.compress.latency import latency_weights, unit_latency

        profile = unit_latency(model, [n for n, _ in sens], latency_size, latency_threads)
        lat = latency_weights(profile, latency_strength)
    weights = budget_weights(sens, strength, latency=lat)
    macs, params = prune_to_macs(model, base * macs_ratio, unit_weights=weights, **prune_kwargs)
    if recalibrate:
        recalibrate_batchnorm(model, take_images(batches, num_batches, next(model.parameters()).device))
    return {"sensitivity": sens, "weights": weights, "latency": profile, "base_macs": base, "macs": macs,
            "params": params}


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
        inputs.append(batch_images(batch).to(device))
    with torch.no_grad():
        refs = [float_model(x) for x in inputs]
    base = metric_fn(float_model) if metric_fn is not None else 0.0
    qmodel = quantize_model(copy.deepcopy(float_model), inputs, len(inputs), fuse=False).eval()
    by_layer = quantizers_by_layer(qmodel)
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
