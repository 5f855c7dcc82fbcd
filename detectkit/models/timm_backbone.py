"""Any timm ``features_only`` network as a detector backbone: ``backbone="timm/<name>"``.

The YOLO-NAS neck fuses four maps (a stride-4 skip and strides 8, 16, 32), so the adapter picks,
from timm's ``feature_info``, the deepest map at each of those reductions and reports their
channels; a network without them is refused in one line. The name is plain data (``timm/resnet18``),
so a checkpoint record rebuilds the same network without reading any file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from detectkit.errors import UserError, suggest
from detectkit.extras import missing_extra_message

__all__ = ["TIMM_PREFIX", "NECK_STRIDES", "TimmBackbone", "is_timm_backbone", "timm_model_name", "pick_out_indices"]

#: how a backbone argument names a timm network: ``timm/resnet18``, ``timm/convnext_atto.d2_in1k``
TIMM_PREFIX = "timm/"
#: reductions of the maps the YOLO-NAS neck takes (c2, c3, c4, c5)
NECK_STRIDES = (4, 8, 16, 32)


def is_timm_backbone(backbone: str | None) -> bool:
    """True for ``timm/<name>``: the one backbone family besides each detector's own."""
    return isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX)


def timm_model_name(backbone: str) -> str:
    """``timm/resnet18`` -> ``resnet18``; anything else is a one-line error showing the syntax."""
    if not is_timm_backbone(backbone) or not backbone[len(TIMM_PREFIX):].strip():
        raise UserError(f"backbone {backbone!r}: expected 'timm/<model name>' (e.g. 'timm/resnet18'), "
                        "a name from timm.list_models()")
    return backbone[len(TIMM_PREFIX):].strip()


def pick_out_indices(reductions: Sequence[int], name: str, strides: Sequence[int] = NECK_STRIDES) -> list[int]:
    """Index of the deepest feature at each wanted stride (several stages may share a reduction:
    the last one has seen the most layers); a missing stride is a one-line error."""
    picked = []
    for stride in strides:
        at = [i for i, r in enumerate(reductions) if int(r) == stride]
        if not at:
            raise UserError(f"timm backbone {name!r} has feature maps at strides {list(map(int, reductions))}; "
                            f"the YOLO-NAS neck needs maps at strides {list(strides)}")
        picked.append(at[-1])
    return picked


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise UserError(missing_extra_message(err, "a timm backbone") or str(err)) from None
    return timm


def _create(timm, name: str, pretrained: bool, in_channels: int, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, in_chans=in_channels, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (x)", "features_only not implemented for x"
        if "Unknown model" in str(err):
            raise UserError(f"backbone 'timm/{name}': timm has no model {name!r}."
                            f"{suggest(name, timm.list_models())}") from None
        raise UserError(f"backbone 'timm/{name}': timm cannot build it with features_only=True ({err})") from None


class TimmBackbone(nn.Module):
    """``x [B,C,H,W] in [0,1] -> [c2, c3, c4, c5]`` at strides 4, 8, 16, 32 from a timm network.

    The input is normalised with the network's own pretrained mean/std inside the module (so the
    exported graph carries it and timm's ImageNet weights see the statistics they were trained on).
    """

    def __init__(self, backbone: str, pretrained: bool = False, in_channels: int = 3) -> None:
        super().__init__()
        timm = _import_timm()
        name = timm_model_name(backbone)
        net = _create(timm, name, bool(pretrained), in_channels)
        picked = pick_out_indices(net.feature_info.reduction(), backbone)
        if picked[-1] < len(net.feature_info.reduction()) - 1:  # stages past stride 32: build without them
            net = _create(timm, name, bool(pretrained), in_channels,
                          out_indices=tuple(net.feature_info.out_indices[i] for i in picked))
            picked = list(range(len(picked)))
        self.body = net
        self.picked = picked
        self.out_channels = [int(net.feature_info.channels()[i]) for i in picked]
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is None or std is None or len(mean) != in_channels:
            mean, std = [0.0] * in_channels, [1.0] * in_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        return [feats[i] for i in self.picked]
