"""Structured (channel) pruning on torch-pruning, and the replay of a pruned architecture.

The algorithms without Lightning: :class:`detectkit.callbacks.StructuredPruning` schedules them
during a fit; :func:`apply_pruned_shapes` rebuilds a recorded pruned architecture on a fresh
model (``detectkit.checkpoint`` replays ``{"op": "prune", "shapes": record_shapes(model)}``).
See the callback's module docstring for what is pruned and what is kept whole.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from detectkit.compress.quantize import partial_fuse

__all__ = [
    "IMPORTANCE", "DEFAULT_KEEP", "DEFAULT_EXCLUDE", "count_macs_params", "importance_for", "prune_model",
    "prune_to_macs", "record_shapes", "split_c2f", "SplitC2f", "apply_pruned_shapes", "prune_op",
]

log = logging.getLogger(__name__)

IMPORTANCE = ("magnitude", "group_norm", "taylor")
DEFAULT_KEEP = ("*cls_pred*", "*reg_pred*", "*cls_embed*", "*contrast*", "*text*",
                # YOLO-World's head: box-distribution and region-embedding outputs, contrastive scorers
                "head.cv2.*.2", "head.cv3.*.2", "head.cv4.*")
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


class SplitC2f(nn.Module):
    """A ``C2f`` / ``C2fAttn`` whose ``cv1`` (one conv, output chunked in two) is two convs.

    Why: torch-pruning 1.6 maps channel indices through ``chunk`` by walking the split's
    consumers and assumes one consumer per chunk; in C2f the second half feeds both the concat and
    the first bottleneck (and its residual add), so the offsets come out wrong (e.g.
    ``[0, 768, 1536, 1280, 1536]`` for a 512-channel split) and importance fails with "index 768
    is out of bounds". Two convs compute the same thing with no split (torch-pruning's own YOLOv8
    recipe, ``C2f_v2``). Numerically identical to the module it replaces.
    """

    def __init__(self, c2f: nn.Module) -> None:
        super().__init__()
        import copy

        self.c = c2f.c
        self.cv0, self.cv1 = copy.deepcopy(c2f.cv1), copy.deepcopy(c2f.cv1)
        for half, sl in ((self.cv0, slice(0, c2f.c)), (self.cv1, slice(c2f.c, 2 * c2f.c))):
            _slice_out_channels(half, sl)
        self.cv2, self.m = c2f.cv2, c2f.m
        self.attn = getattr(c2f, "attn", None)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        ys = [self.cv0(x), self.cv1(x)]
        for block in self.m:
            ys.append(block(ys[-1]))
        if self.attn is not None:
            ys.append(self.attn(ys[-1], text, mask))
        return self.cv2(torch.cat(ys, 1))


def _slice_out_channels(unit: nn.Module, sl: slice) -> None:
    """Keep output channels ``sl`` of a conv + BN unit (ConvBNAct)."""
    conv, bn = unit.conv, unit.bn
    conv.weight = nn.Parameter(conv.weight.detach()[sl].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[sl].clone())
    conv.out_channels = conv.weight.shape[0]
    for name in ("weight", "bias"):
        setattr(bn, name, nn.Parameter(getattr(bn, name).detach()[sl].clone()))
    bn.running_mean, bn.running_var = bn.running_mean[sl].clone(), bn.running_var[sl].clone()
    bn.num_features = conv.out_channels


def split_c2f(model: nn.Module) -> int:
    """Replace every C2f / C2fAttn by a :class:`SplitC2f`, in place; returns how many."""
    from detectkit.models.yolo_world.neck import C2fAttn
    from detectkit.nn.c2f import C2f

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, C2f | C2fAttn)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SplitC2f(m))
    return len(targets)


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
    unit_ratios: dict[str, float] | None = None,
) -> nn.Module:
    """Remove ``ratio`` of the prunable channels of every group, in place (QARepVGG fused first).

    ``unit_ratios`` (submodule name -> ratio) overrides ``ratio`` for the groups rooted in that
    submodule (layer-wise budgets, see :mod:`detectkit.compress.sensitivity`).
    For ``importance="taylor"`` the parameters' ``.grad`` must hold a loss gradient.
    """
    partial_fuse(model)
    split_c2f(model)
    modules = dict(model.named_modules())
    ratio_dict = {}
    for name, r in (unit_ratios or {}).items():
        if name not in modules:
            raise KeyError(f"unit_ratios names {name!r}, which {type(model).__name__} does not have")
        ratio_dict[modules[name]] = float(min(max(r, 0.0), 0.95))
    was_training = model.training
    model.eval()
    x = torch.rand(1, 3, image_size, image_size, device=next(model.parameters()).device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = _tp().pruner.MetaPruner(
            model, x, importance=importance_for(importance), pruning_ratio=float(ratio),
            ignored_layers=_ignored(model, keep_layers, exclude_modules), round_to=round_to,
            global_pruning=global_pruning, pruning_ratio_dict=ratio_dict or None,
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
    unit_weights: dict[str, float] | None = None,
    **prune_kwargs: Any,
) -> tuple[float, int]:
    """Prune ``increment`` of the channels at a time until MACs <= ``target_macs``; returns (MACs, params).

    ``before_step`` runs before each increment (e.g. a backward pass for Taylor importance).
    ``unit_weights`` (from :func:`detectkit.compress.sensitivity.budget_weights`) scales the
    increment per submodule: sensitive units lose channels more slowly.
    """
    image_size = prune_kwargs.get("image_size", 64)
    macs, params = count_macs_params(model, image_size)
    for _ in range(200):
        if macs <= target_macs:
            break
        if before_step is not None:
            before_step()
        unit_ratios = {u: increment * w for u, w in unit_weights.items()} if unit_weights else None
        prune_model(model, increment, unit_ratios=unit_ratios, **prune_kwargs)
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
    if any(name not in modules for name in shapes) and split_c2f(model):  # pruned in the split form
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


def prune_op(model: nn.Module) -> dict[str, Any]:
    """The architecture op that :func:`detectkit.checkpoint.replay_architecture` replays."""
    return {"op": "prune", "shapes": record_shapes(model), "fused": True}
