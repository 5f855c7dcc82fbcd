"""Structured (channel) pruning on torch-pruning, iterative across epochs, resumable.

Channels are removed for real (smaller convs, fewer MACs), so the architecture changes:

* **QARepVGG** blocks are *partially fused* first (3x3 + 1x1 + identity + ``alpha`` -> one 3x3
  conv, ``post_bn`` kept). The residual and ``alpha`` then live inside the kernel, so pruning
  cannot leave the branches inconsistent; the pruned model keeps training as plain conv-BN-ReLU
  blocks (the deploy form) and the blocks' ``in_channels``/``out_channels`` are updated.
* **Detection heads**: the final predictors (``cls_pred``/``reg_pred``, YOLO-World's
  class-embedding and contrastive layers) never lose output channels (``keep_layers``).
* **Attention** reshapes by a fixed head count, so every module whose name matches
  ``exclude_modules`` (default ``*attn*``) is left whole, on purpose. YOLO-World as a whole is
  not supported yet: torch-pruning's dependency graph of its text-conditioned neck/head fails
  (index errors in the importance step even with the attention blocks and the contrastive head
  excluded); ``prune_model`` raises a clear error for it.
* Scalar parameters (CSP bottleneck ``alpha``) are ignored: they scale whole tensors.
* Modules frozen by ``model.freeze`` keep their channels (added to ``exclude_modules``); the
  module freezes the new tensors again when the optimizer is rebuilt after the step.

The EMA weights (when a ``WeightAveraging`` callback runs) are loaded into the model before each
step, and the average restarts from the pruned model. What was removed is recorded as every parameter/buffer shape and channel attribute per module
and appended to the module's architecture ops (``{"op": "prune", ...}``); resume, ``validate``,
``detectkit.load`` and export rebuild a fresh model to those shapes before the weights load
(``detectkit.checkpoint.replay_architecture``). The algorithms live in ``detectkit.compress.prune``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from detectkit.callbacks.utils import copy_average_to_model, detector_of, rebuild_after_surgery
from lightning.pytorch.callbacks import Callback

from detectkit.checkpoint import ArchitectureRecorder
from detectkit.compress.latency import latency_weights, unit_latency
from detectkit.compress.prune import (  # noqa: F401 (re-exported: the algorithms live in detectkit.compress)
    DEFAULT_EXCLUDE,
    DEFAULT_KEEP,
    IMPORTANCE,
    apply_pruned_shapes,
    count_macs_params,
    importance_for,
    prune_model,
    prune_op,
    prune_to_macs,
    record_shapes,
)
from detectkit.compress.quantize import partial_fuse
from detectkit.compress.sensitivity import (
    budget_weights,
    pruning_sensitivity,
    recalibrate_batchnorm,
    take_images,
)
from detectkit.modules.freeze import module_patterns

__all__ = ["StructuredPruning", "prune_model", "prune_to_macs", "count_macs_params", "record_shapes", "apply_pruned_shapes"]

log = logging.getLogger(__name__)


class StructuredPruning(Callback):
    """Prune channels at scheduled epochs, fine-tuning in between, to a MACs or channel target.

    Args:
        target_macs_ratio: keep this fraction of the MACs (e.g. 0.5 = half the MACs), reached
            in ``steps`` equal steps; each step prunes in small increments until its target.
        channel_sparsity: alternatively remove this fraction of channels per group (in ``steps``).
        steps: pruning steps; step ``k`` runs at epoch ``start_epoch + k * epochs_between``.
        importance: ``"magnitude"`` (L1 of filters), ``"group_norm"`` (group L2), ``"taylor"``.
        image_size: input side used to trace the graph and count MACs.
        keep_layers: modules whose output channels are never pruned (head predictors).
        exclude_modules: modules left whole (attention), see the module docstring.
        round_to: channel counts stay multiples of this (tensor-core friendly).
        increment: channel ratio per sub-step when chasing a MACs target.
        layerwise: before the first step, rank units by pruning sensitivity on
            ``calib_batches`` training batches (:mod:`detectkit.compress.sensitivity`) and give
            sensitive units a smaller share of each step (MACs target only).
        layerwise_strength: how strongly the ranking skews the budget (0 = uniform).
        calib_batches: training batches for the sensitivity ranking and for re-estimating the
            BatchNorm statistics after each step (0: no recalibration).
        latency_size: with ``layerwise``, also profile the fused model in onnxruntime at this input
            side (:mod:`detectkit.compress.latency`) and give units that cost more time per MAC a
            larger share of the cut; ``None``: MACs and sensitivity only.
        latency_strength: exponent of that time-per-MAC multiplier (0 = ignore latency).
        latency_threads: onnxruntime intra-op threads for the profile (those of the deployment).
    """

    def __init__(
        self,
        target_macs_ratio: float | None = 0.5,
        channel_sparsity: float | None = None,
        steps: int = 1,
        start_epoch: int = 0,
        epochs_between: int = 1,
        importance: str = "group_norm",
        image_size: int = 320,
        keep_layers: Sequence[str] = DEFAULT_KEEP,
        exclude_modules: Sequence[str] = DEFAULT_EXCLUDE,
        round_to: int | None = 8,
        increment: float = 0.05,
        layerwise: bool = False,
        layerwise_strength: float = 1.0,
        calib_batches: int = 0,
        latency_size: int | None = None,
        latency_strength: float = 1.0,
        latency_threads: int = 1,
    ) -> None:
        if (target_macs_ratio is None) == (channel_sparsity is None):
            raise ValueError("give exactly one of target_macs_ratio or channel_sparsity")
        if importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
        self.target_macs_ratio, self.channel_sparsity = target_macs_ratio, channel_sparsity
        self.steps, self.start_epoch, self.epochs_between = int(steps), int(start_epoch), int(epochs_between)
        self.importance, self.image_size = importance, int(image_size)
        self.keep_layers, self.exclude_modules = list(keep_layers), list(exclude_modules)
        self.round_to, self.increment = round_to, float(increment)
        self.layerwise, self.layerwise_strength, self.calib_batches = layerwise, float(layerwise_strength), int(calib_batches)
        self.latency_size, self.latency_strength = latency_size, float(latency_strength)
        self.latency_threads = int(latency_threads)
        self.unit_weights: dict[str, float] | None = None
        self.sensitivity: list[tuple[str, float]] = []
        self.steps_done = 0
        self.base: tuple[float, int] | None = None  # MACs, params before pruning
        self.history: list[dict[str, float]] = []
        self.shapes: dict[str, dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target_macs_ratio, sparsity=self.channel_sparsity, steps=self.steps)

    def schedule(self) -> list[int]:
        return [self.start_epoch + k * self.epochs_between for k in range(self.steps)]

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not isinstance(pl_module, ArchitectureRecorder):
            raise TypeError(f"StructuredPruning needs a LightningModule that records architecture ops "
                            f"(detectkit.checkpoint.ArchitectureRecorder, e.g. DetectionModule), got {type(pl_module).__name__}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps_done < self.steps and trainer.current_epoch >= self.schedule()[self.steps_done]:
            self.prune_step(trainer, pl_module)
            rebuild_after_surgery(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def _taylor_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One loss backward on a training batch so Taylor importance sees dL/dw."""
        batch = next(iter(trainer.train_dataloader))
        images = batch["images"]
        images = (images.float() / 255.0 if images.dtype == torch.uint8 else images.float()).to(pl_module.device)
        model = partial_fuse(detector_of(pl_module))  # the pruned kernels must be the ones with gradients
        model.zero_grad(set_to_none=True)
        model.train()
        loss, _ = pl_module.compute_loss(model(images), batch["targets"].to(pl_module.device), images.shape[0])
        loss.backward()

    def _calibration_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return take_images(trainer.train_dataloader, max(1, self.calib_batches), pl_module.device)

    def prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        copy_average_to_model(trainer, pl_module)  # prune the EMA weights; the EMA restarts after
        model = detector_of(pl_module)
        if self.base is None:
            self.base = count_macs_params(model, self.image_size)
        base_macs, base_params = self.base
        k = self.steps_done + 1
        # frozen layers (model.freeze) are left whole: their weights are the loaded ones, by request
        exclude = [*self.exclude_modules, *module_patterns(getattr(pl_module, "freeze", None) or [])]
        kwargs = dict(importance=self.importance, image_size=self.image_size, keep_layers=self.keep_layers,
                      exclude_modules=exclude, round_to=self.round_to)
        if self.layerwise and self.unit_weights is None and self.channel_sparsity is None:
            self.sensitivity = pruning_sensitivity(
                model, self._calibration_images(trainer, pl_module), num_batches=max(1, self.calib_batches),
                **{**kwargs, "importance": "group_norm" if self.importance == "taylor" else self.importance})
            lat = None
            if self.latency_size:
                lat = latency_weights(unit_latency(model, [n for n, _ in self.sensitivity], self.latency_size,
                                                   self.latency_threads), self.latency_strength)
                log.info("pruning: time-per-MAC multipliers %s", {u: round(w, 2) for u, w in lat.items()})
            self.unit_weights = budget_weights(self.sensitivity, self.layerwise_strength, latency=lat)
            log.info("pruning: most sensitive units %s", [n for n, _ in self.sensitivity[:3]])
        if self.channel_sparsity is not None:
            # remaining channel fraction after step k is 1 - s*k/steps; prune the ratio that gets there
            before, after = 1 - self.channel_sparsity * (k - 1) / self.steps, 1 - self.channel_sparsity * k / self.steps
            if self.importance == "taylor":
                self._taylor_gradients(trainer, pl_module)
            prune_model(model, 1 - after / before, **kwargs)
            macs, params = count_macs_params(model, self.image_size)
        else:
            target = base_macs * (1 - (1 - self.target_macs_ratio) * k / self.steps)
            grads = (lambda: self._taylor_gradients(trainer, pl_module)) if self.importance == "taylor" else None
            macs, params = prune_to_macs(model, target, self.increment, before_step=grads,
                                         unit_weights=self.unit_weights, **kwargs)
        model.zero_grad(set_to_none=True)
        if self.calib_batches > 0:  # the layers after a cut see other inputs: fresh BN statistics
            recalibrate_batchnorm(model, self._calibration_images(trainer, pl_module))
        self.steps_done = k
        op = prune_op(model)  # resume/load rebuild these shapes before the weights load
        self.shapes = op["shapes"]
        pl_module.record_architecture(op)
        record = {"step": k, "epoch": trainer.current_epoch, "macs": macs, "params": params,
                  "macs_ratio": macs / base_macs, "params_ratio": params / base_params}
        self.history.append(record)
        log.info("pruning step %d/%d: MACs %.4g -> %.4g (%.1f%%), params %d -> %d", k, self.steps, base_macs, macs,
                 100 * macs / base_macs, base_params, params)
        for logger in trainer.loggers:
            logger.log_metrics({f"prune/{k_}": float(v) for k_, v in record.items() if k_ != "step"},
                               step=trainer.global_step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "base": self.base, "history": list(self.history),
                "shapes": self.shapes, "fused": True, "unit_weights": self.unit_weights,
                "sensitivity": [list(t) for t in self.sensitivity]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.base = tuple(state_dict["base"]) if state_dict.get("base") else None
        self.history = list(state_dict.get("history", []))
        self.shapes = state_dict.get("shapes") or self.shapes
        self.unit_weights = state_dict.get("unit_weights") or self.unit_weights
        self.sensitivity = [tuple(t) for t in state_dict.get("sensitivity", [])]
