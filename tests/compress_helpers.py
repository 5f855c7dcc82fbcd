"""A real (tiny) detectkit Detector for the compression/export tests: ConvBNAct backbone, a
QARepVGG stage, three stride levels, DFL heads. It keeps those tests at CPU-seconds scale; the
YOLO-NAS-specific paths are tested on ``yolo_nas_s`` itself at 64 px."""

from __future__ import annotations

import torch
import torch.nn as nn

from detectkit.models.base import Detector
from detectkit.models.outputs import HeadOutput
from detectkit.nn.conv import ConvBNAct, fuse_conv_bn_act
from detectkit.nn.qarepvgg import QARepVGGBlock
from detectkit.ops.boxes import make_anchors


class TinyDetector(Detector):
    """Strides 8/16/32; ``fuse(full)`` follows YOLO-NAS (QARepVGG partial/full, Conv-BN fold)."""

    default_loss = "ppyoloe"

    def __init__(self, num_classes: int = 3, bins: int = 8, width: int = 8, cls_prior: float | None = None) -> None:
        super().__init__(num_classes, bins)
        w = width
        self.stem = nn.Sequential(ConvBNAct(3, w, 3, 2), ConvBNAct(w, w, 3, 2), ConvBNAct(w, 2 * w, 3, 2))
        self.rep = QARepVGGBlock(2 * w, 2 * w, use_alpha=True)
        self.down1 = ConvBNAct(2 * w, 2 * w, 3, 2)
        self.down2 = ConvBNAct(2 * w, 4 * w, 3, 2)
        chans = (2 * w, 2 * w, 4 * w)
        self.cls_pred = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in chans)
        self.reg_pred = nn.ModuleList(nn.Conv2d(c, 4 * bins, 1) for c in chans)
        if cls_prior is not None:
            for conv in self.cls_pred:
                nn.init.constant_(conv.bias, float(torch.logit(torch.tensor(cls_prior))))

    def head_forward(self, x: torch.Tensor) -> HeadOutput:
        p3 = self.rep(self.stem(x))
        p4 = self.down1(p3)
        p5 = self.down2(p4)
        feats = (p3, p4, p5)
        cls = torch.cat([h(f).flatten(2) for h, f in zip(self.cls_pred, feats)], 2).transpose(1, 2)
        reg = torch.cat([h(f).flatten(2) for h, f in zip(self.reg_pred, feats)], 2).transpose(1, 2)
        points, strides = make_anchors([f.shape[2:] for f in feats], self.strides, device=x.device, dtype=x.dtype)
        return HeadOutput(cls, reg, points, strides, self.dfl.bins, feats)

    def fuse(self, full: bool = True) -> TinyDetector:
        self.rep.full_fusion() if full else self.rep.partial_fusion()
        if full:
            fuse_conv_bn_act(self)
        return self


def tiny_datamodule(cache_dir):
    """8 train / 4 val generated 64 px images, no mixup: the callbacks' tests' data."""
    from detectkit.data import AugmentConfig, DetectionDataModule, LoaderConfig
    from detectkit.data.synthetic import SyntheticConfig

    syn = SyntheticConfig(train_images=8, val_images=4, size=64, num_classes=3)
    return DetectionDataModule(image_size=64, loader=LoaderConfig(batch_size=4, num_workers=0), synthetic=syn,
                               cache_dir=str(cache_dir), augment=AugmentConfig(mixup_prob=0.0))


def tiny_trainer(root, callbacks, max_epochs: int, train_batches: int = 2):
    """A quiet CPU Trainer with one validation batch per epoch."""
    import lightning.pytorch as pl

    return pl.Trainer(default_root_dir=root, max_epochs=max_epochs, limit_train_batches=train_batches,
                      limit_val_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0)
