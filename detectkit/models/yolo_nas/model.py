"""YOLO-NAS detector (S/M/L) and its registry builders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from detectkit.models.base import Detector
from detectkit.models.outputs import HeadOutput
from detectkit.models.yolo_nas.backbone import YoloNASBackbone
from detectkit.models.yolo_nas.configs import CONFIGS, YoloNASConfig, resolve_config
from detectkit.models.yolo_nas.head import NDFLHeads
from detectkit.models.yolo_nas.neck import YoloNASPANNeck
from detectkit.nn.conv import fuse_conv_bn_act
from detectkit.nn.qarepvgg import QARepVGGBlock
from detectkit.ops.boxes import make_anchors
from detectkit.registry import register_model


def _is_tracing() -> bool:
    # Anchors must be recomputed from the traced shapes, never served from a Python-side cache.
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
    )


class YoloNAS(Detector):
    """YOLO-NAS: QARepVGG/CSP backbone + SPP, PAN neck with a C2 skip, three DFL heads (17 bins).

    Any point of the YOLO-NAS space builds (``cfg``: see :class:`YoloNASConfig`); S/M/L are three.
    ``backbone`` replaces the QARepVGG backbone (``cfg``'s neck and heads stay), e.g. a
    :class:`~detectkit.models.timm_backbone.TimmBackbone`.

    State-dict keys are identical to super-gradients' ``YoloNAS`` (minus the unused
    ``rbr_reparam`` placeholders), so its checkpoints load by name (see ``weights.py``).
    """

    default_loss = "ppyoloe"

    def __init__(self, cfg: YoloNASConfig, num_classes: int = 80, in_channels: int = 3,
                 backbone: nn.Module | None = None) -> None:
        super().__init__(num_classes, bins=cfg.reg_max + 1)
        self.cfg = cfg
        # any module returning [c2, c3, c4, c5] at strides 4..32 with ``out_channels`` (a timm network)
        self.backbone = backbone if backbone is not None else YoloNASBackbone(cfg, in_channels)
        self.neck = YoloNASPANNeck(self.backbone.out_channels, cfg.neck)
        self.heads = NDFLHeads(self.neck.out_channels, cfg.head_channels, num_classes, cfg.reg_max + 1)
        self.fusion: str | None = None
        self._anchor_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone (c2..c5) and neck (p3..p5) maps, for tests, distillation and inspection."""
        c2, c3, c4, c5 = self.backbone(x)
        p3, p4, p5 = self.neck([c2, c3, c4, c5])
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5, "p3": p3, "p4": p4, "p5": p5}

    def anchors(self, shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype):
        """``(anchor_points [A,2] px, stride_tensor [A,1])``, cached per shape/device/dtype in eager mode."""
        dtype = torch.promote_types(dtype, torch.float32)  # fp16/bf16 cannot hold 636.0 etc. exactly
        if _is_tracing():
            return make_anchors(shapes, self.strides, 0.5, device, dtype)
        key = (tuple(shapes), device, dtype)
        if key not in self._anchor_cache:
            if len(self._anchor_cache) > 16:
                self._anchor_cache.clear()
            self._anchor_cache[key] = make_anchors(shapes, self.strides, 0.5, device, dtype)
        return self._anchor_cache[key]

    def head_forward(self, x: torch.Tensor) -> HeadOutput:
        feats = self.neck(self.backbone(x))
        cls_logits, reg_distri = self.heads(feats)
        shapes = [(f.shape[2], f.shape[3]) for f in feats]
        anchor_points, stride_tensor = self.anchors(shapes, x.device, cls_logits.dtype)
        return HeadOutput(cls_logits, reg_distri, anchor_points, stride_tensor, self.dfl.bins, tuple(feats))

    def fuse(self, full: bool = True) -> YoloNAS:
        """Re-parameterise for inference, in place (use eval-mode statistics; call ``eval()`` first).

        ``full=True``: every QARepVGG block becomes one conv + ReLU and every Conv-BN is folded
        (deployment). ``full=False``: only the QARepVGG branches are merged (``post_bn`` and the
        Conv-BN pairs stay), which keeps the model trainable for QAT; same as super-gradients'
        ``prep_model_for_conversion()``. A fused model's ``state_dict`` only loads into a model
        fused the same way.
        """
        for m in self.modules():
            if isinstance(m, QARepVGGBlock):
                m.full_fusion() if full else m.partial_fusion()
        if full:
            fuse_conv_bn_act(self)
        if self.fusion != "full":
            self.fusion = "full" if full else "partial"
        self._anchor_cache.clear()
        return self

    def _apply(self, fn, recurse=True):  # .to()/.half() must not serve anchors of the old device
        self._anchor_cache = {}
        return super()._apply(fn, recurse)


def build_yolo_nas(
    variant: str,
    num_classes: int = 80,
    checkpoint: str | Path | None = None,
    pretrained: str | bool | None = None,
    class_names: Sequence[str] | None = None,
    in_channels: int = 3,
    download: bool = True,
    backbone: str | None = None,
) -> YoloNAS:
    """Build ``yolo_nas_{s,m,l}``; ``checkpoint`` is a super-gradients or detectkit state dict file.

    ``pretrained`` (a tag such as ``"coco"``, ``True``, a path or a URL) is resolved by
    ``detectkit.models.pretrained``: a tag missing from the cache is fetched and sha256-checked
    (``download=False``: an error naming the file to put there instead); the
    published weights' class names are used when ``class_names`` is not given and counts agree.

    ``backbone="timm/<name>"`` puts the variant's neck and heads on a timm network; then
    ``pretrained=True`` means timm's own weights for that network (the detector's neck and heads
    start from random init: no published YOLO-NAS weights fit another backbone).
    """
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{variant}: got {len(class_names)} class_names for num_classes={num_classes}")
    if checkpoint is not None and pretrained:
        raise ValueError(f"{variant}: pass either checkpoint= or pretrained=, not both")
    if backbone is not None:
        return _with_timm_backbone(variant, CONFIGS[variant], num_classes, checkpoint, pretrained, class_names,
                                   in_channels, backbone)
    if pretrained:  # a tag ("coco"), True, a local path or a URL: see detectkit.models.pretrained
        from detectkit.models.pretrained import pretrained_class_names, resolve_pretrained

        checkpoint = resolve_pretrained(variant, pretrained, download=download)
        names = pretrained_class_names(variant, pretrained)
        if class_names is None and names is not None and len(names) == num_classes:
            class_names = names
    model = YoloNAS(CONFIGS[variant], num_classes=num_classes, in_channels=in_channels)
    if class_names is not None:
        model.class_names = list(class_names)
    if checkpoint is not None:
        from detectkit.models.yolo_nas.weights import load_super_gradients_checkpoint

        load_super_gradients_checkpoint(model, checkpoint)
    return model


def _with_timm_backbone(
    name: str,
    cfg: YoloNASConfig,
    num_classes: int,
    checkpoint: str | Path | None,
    pretrained: str | bool | None,
    class_names: Sequence[str] | None,
    in_channels: int,
    backbone: str,
) -> YoloNAS:
    """``cfg``'s neck and heads on a timm network (see :mod:`detectkit.models.timm_backbone`)."""
    from detectkit.errors import UserError
    from detectkit.models.timm_backbone import TimmBackbone

    if pretrained not in (None, False, True):
        raise UserError(f"{name}: pretrained={pretrained!r} names YOLO-NAS weights, which only fit its own "
                        f"backbone; with backbone={backbone!r} use pretrained=True (timm's weights for it)")
    model = YoloNAS(cfg, num_classes=num_classes, in_channels=in_channels,
                    backbone=TimmBackbone(backbone, pretrained=bool(pretrained), in_channels=in_channels))
    if class_names is not None:
        model.class_names = list(class_names)
    if checkpoint is not None:
        from detectkit.models.yolo_nas.weights import load_super_gradients_checkpoint

        load_super_gradients_checkpoint(model, checkpoint)
    return model


@register_model
def yolo_nas_s(num_classes: int = 80, checkpoint: str | Path | None = None, **kwargs) -> YoloNAS:
    return build_yolo_nas("yolo_nas_s", num_classes, checkpoint, **kwargs)


@register_model
def yolo_nas_m(num_classes: int = 80, checkpoint: str | Path | None = None, **kwargs) -> YoloNAS:
    return build_yolo_nas("yolo_nas_m", num_classes, checkpoint, **kwargs)


@register_model
def yolo_nas_l(num_classes: int = 80, checkpoint: str | Path | None = None, **kwargs) -> YoloNAS:
    return build_yolo_nas("yolo_nas_l", num_classes, checkpoint, **kwargs)


@register_model
def yolo_nas_custom(
    num_classes: int = 80,
    checkpoint: str | Path | None = None,
    arch: YoloNASConfig | dict | str | Path | None = None,
    class_names: Sequence[str] | None = None,
    in_channels: int = 3,
    backbone: str | None = None,
    pretrained: bool | None = None,
) -> YoloNAS:
    """Any architecture of the YOLO-NAS space: ``arch`` is a dict, an architecture YAML path (e.g.
    from ``detectkit nas export``) or a variant name. The checkpoint record stores the architecture
    itself (a dict), never the path, so a checkpoint loads after the YAML file is gone.
    ``backbone="timm/<name>"``: ``arch``'s neck and heads on that timm network (``pretrained=True``:
    timm's weights for it)."""
    if arch is None:
        raise ValueError("yolo_nas_custom needs arch= (a dict, an architecture YAML path or a variant name)")
    cfg = resolve_config(arch)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"yolo_nas_custom: got {len(class_names)} class_names for num_classes={num_classes}")
    if backbone is not None:
        model = _with_timm_backbone("yolo_nas_custom", cfg, num_classes, checkpoint, pretrained, class_names,
                                    in_channels, backbone)
    else:
        if pretrained:
            raise ValueError("yolo_nas_custom: pretrained= needs backbone='timm/<name>' (published YOLO-NAS "
                             "weights are for yolo_nas_s/m/l)")
        model = YoloNAS(cfg, num_classes=num_classes, in_channels=in_channels)
        if class_names is not None:
            model.class_names = list(class_names)
        if checkpoint is not None:
            from detectkit.models.yolo_nas.weights import load_super_gradients_checkpoint

            load_super_gradients_checkpoint(model, checkpoint)
    # the builder's canonical, file-independent arguments (kept by create_model for the record)
    model.registry_kwargs = {"arch": cfg.to_dict()}
    if backbone is not None:
        model.registry_kwargs["backbone"] = backbone
    if class_names is not None:
        model.registry_kwargs["class_names"] = list(class_names)
    if in_channels != 3:
        model.registry_kwargs["in_channels"] = in_channels
    return model
