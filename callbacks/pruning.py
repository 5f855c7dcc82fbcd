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

The EMA weights (when a ``WeightAveraging`` callback runs) are loaded into the model before each
step, and the average restarts from the pruned model. What was removed is recorded as every parameter/buffer shape and channel attribute per module
(``state_dict()['shapes']``); resume rebuilds a fresh model to those shapes before the weights
load (see ``callbacks/utils.py``), and :func:`apply_pruned_shapes` does the same for export.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from detectkit.callbacks.quantization import partial_fuse
from detectkit.callbacks.utils import (
    copy_average_to_model,
    detector_of,
    prepare_architecture_restore,
    rebuild_after_surgery,
)
from lightning.pytorch.callbacks import Callback

__all__ = ["StructuredPruning", "prune_model", "prune_to_macs", "count_macs_params", "record_shapes", "apply_pruned_shapes"]

log = logging.getLogger(__name__)

IMPORTANCE = ("magnitude", "group_norm", "taylor")
DEFAULT_KEEP = ("*cls_pred*", "*reg_pred*", "*cls_embed*", "*contrast*", "*text*")
DEFAULT_EXCLUDE = ("*attn*", "*attention*")
_CHANNEL_ATTRS = ("in_channels", "out_channels", "num_features", "in_features", "out_features", "groups")


def _tp():
    import torch_pruning as tp

    return tp


def count_macs_params(model: nn.Module, image_size: int = 64) -> tuple[float, int]:
    """MACs (torch-pruning's counter) and parameters of an eval-mode forward at ``image_size``."""
    was_training = model.training
    model.eval()
    x = torch.rand(1, 3, image_size, image_size, device=next(model.parameters()).device)
    with torch.no_grad():
        macs, params = _tp().utils.count_ops_and_params(model, x)
    model.train(was_training)
    return float(macs), int(params)


def importance_for(name: str):
    tp = _tp()
    if name == "magnitude":  # L1 norm of each output filter of the group's first layer
        return tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    if name == "group_norm":  # L2 norm over every coupled layer of the group (DepGraph)
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":  # first-order Taylor |w * dL/dw|: needs gradients from a backward pass
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"importance must be one of {IMPORTANCE}, got {name!r}")


def _ignored(model: nn.Module, keep_layers: Sequence[str], exclude_modules: Sequence[str]) -> list:
    ignored: list = []
    for name, m in model.named_modules():
        if name and any(fnmatch.fnmatch(name, p) for p in keep_layers) and isinstance(m, nn.Conv2d | nn.Linear):
            ignored.append(m)
        elif name and any(fnmatch.fnmatch(name, p) for p in exclude_modules):
            ignored.append(m)
    ignored += [p for p in model.parameters() if p.numel() == 1]  # scalar scales
    return ignored


def _sync_block_attrs(model: nn.Module) -> None:
    """Blocks that cache their channel counts (QARepVGG) follow their pruned conv."""
    from detectkit.nn.qarepvgg import QARepVGGBlock

    for m in model.modules():
        if isinstance(m, QARepVGGBlock) and m.rbr_reparam is not None:
            m.in_channels, m.out_channels = m.rbr_reparam.in_channels, m.rbr_reparam.out_channels


def prune_model(
    model: nn.Module,
    ratio: float,
    importance: str = "group_norm",
    image_size: int = 64,
    keep_layers: Sequence[str] = DEFAULT_KEEP,
    exclude_modules: Sequence[str] = DEFAULT_EXCLUDE,
    round_to: int | None = 8,
    global_pruning: bool = False,
) -> nn.Module:
    """Remove ``ratio`` of the prunable channels of every group, in place (QARepVGG fused first).

    For ``importance="taylor"`` the parameters' ``.grad`` must hold a loss gradient.
    """
    partial_fuse(model)
    was_training = model.training
    model.eval()
    x = torch.rand(1, 3, image_size, image_size, device=next(model.parameters()).device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = _tp().pruner.MetaPruner(
            model, x, importance=importance_for(importance), pruning_ratio=float(ratio),
            ignored_layers=_ignored(model, keep_layers, exclude_modules), round_to=round_to,
            global_pruning=global_pruning,
        )
        try:
            pruner.step()
        except (IndexError, RuntimeError) as e:
            raise RuntimeError(
                f"torch-pruning could not prune {type(model).__name__} ({e}). Text-conditioned necks "
                "(YOLO-World) are not supported: their dependency graph couples channels with the text "
                "embedding; pass exclude_modules covering the layers named in the error."
            ) from e
    _sync_block_attrs(model)
    model.train(was_training)
    return model


def prune_to_macs(
    model: nn.Module,
    target_macs: float,
    increment: float = 0.05,
    before_step: Callable[[], None] | None = None,
    **prune_kwargs: Any,
) -> tuple[float, int]:
    """Prune ``increment`` of the channels at a time until MACs <= ``target_macs``; returns (MACs, params).

    ``before_step`` runs before each increment (e.g. a backward pass for Taylor importance).
    """
    image_size = prune_kwargs.get("image_size", 64)
    macs, params = count_macs_params(model, image_size)
    for _ in range(200):
        if macs <= target_macs:
            break
        if before_step is not None:
            before_step()
        prune_model(model, increment, **prune_kwargs)
        new_macs, params = count_macs_params(model, image_size)
        if new_macs >= macs:  # nothing prunable left
            log.warning("pruning: stuck at %.4g MACs above the target %.4g", new_macs, target_macs)
            break
        macs = new_macs
    return macs, params


def record_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module: its own parameter/buffer shapes and channel attributes (the pruned architecture)."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        entry: dict[str, Any] = {}
        tensors = {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}
        for k, t in tensors.items():
            if t is not None:
                entry[k] = list(t.shape)
        for attr in _CHANNEL_ATTRS:
            v = getattr(m, attr, None)
            if isinstance(v, int):
                entry[f"@{attr}"] = v
        if entry:
            shapes[name] = entry
    return shapes


def apply_pruned_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]], fused: bool = True) -> nn.Module:
    """Resize a freshly built model to recorded shapes (values uninitialised: load weights next)."""
    if fused:
        partial_fuse(model)
    modules = dict(model.named_modules())
    for name, entry in shapes.items():
        m = modules.get(name)
        if m is None:
            raise KeyError(f"pruned architecture has module {name!r} that the model lacks")
        for k, v in entry.items():
            if k.startswith("@"):
                setattr(m, k[1:], int(v))
                continue
            old = getattr(m, k, None)
            if old is None or list(old.shape) == list(v):
                continue
            new = torch.empty(v, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(m, k, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                m.register_buffer(k, new, persistent=k not in m._non_persistent_buffers_set)
    return model


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
    """

    architecture_order = 0  # rebuilt first: quantizers are inserted into the pruned model

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
        if stage == "fit":
            prepare_architecture_restore(trainer, pl_module)

    def rebuild_architecture(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        if state.get("shapes") and self.shapes is None:
            apply_pruned_shapes(detector_of(pl_module), state["shapes"], fused=state.get("fused", True))
            self.shapes = state["shapes"]
            log.info("pruning: rebuilt the pruned architecture (%d steps done)", state.get("steps_done", 0))

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

    def prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        copy_average_to_model(trainer, pl_module)  # prune the EMA weights; the EMA restarts after
        model = detector_of(pl_module)
        if self.base is None:
            self.base = count_macs_params(model, self.image_size)
        base_macs, base_params = self.base
        k = self.steps_done + 1
        kwargs = dict(importance=self.importance, image_size=self.image_size, keep_layers=self.keep_layers,
                      exclude_modules=self.exclude_modules, round_to=self.round_to)
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
            macs, params = prune_to_macs(model, target, self.increment, before_step=grads, **kwargs)
        model.zero_grad(set_to_none=True)
        self.steps_done = k
        self.shapes = record_shapes(model)
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
                "shapes": self.shapes, "fused": True}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))
        self.base = tuple(state_dict["base"]) if state_dict.get("base") else None
        self.history = list(state_dict.get("history", []))
        self.shapes = state_dict.get("shapes") or self.shapes
