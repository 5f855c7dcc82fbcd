"""YOLO-World detection head: DFL box branch + region embeddings scored against prompts.

Class logits are contrastive: ``<BN(embed(x)), normalize(t_k)> * exp(logit_scale) + bias``
for every prompt ``t_k``, so the number of classes is whatever the vocabulary holds.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from detectkit.nn.c2f import conv_silu
from detectkit.nn.conv import batch_norm, compose_1x1, conv_bn_kernel

#: logit given to masked (padding) prompts: sigmoid is exactly 0 and BCE against 0 is 0
MASKED_LOGIT = -1e4


class BNContrastiveHead(nn.Module):
    """Region-text similarity with a BatchNorm on the region side (ultralytics ``BNContrastiveHead``)."""

    def __init__(self, embed: int = 512) -> None:
        super().__init__()
        self.norm = batch_norm(embed)
        self.bias = nn.Parameter(torch.tensor([-10.0]))
        self.logit_scale = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        region = self.norm(x).reshape(b, c, h * w)
        prompts = F.normalize(text, dim=-1, p=2)  # [B, K, C]
        logits = prompts.matmul(region) * self.logit_scale.exp() + self.bias
        return logits.reshape(b, -1, h, w)

    def bake(self, text: torch.Tensor) -> nn.Conv2d:
        """A 1x1 conv equal to this head for the fixed prompts ``text [K, C]`` (BN folded in)."""
        prompts = F.normalize(text.detach(), dim=-1, p=2) * self.logit_scale.detach().exp()
        k, c = prompts.shape
        identity = torch.eye(c, dtype=prompts.dtype, device=prompts.device).reshape(c, c, 1, 1)
        bn_kernel, bn_bias = conv_bn_kernel(identity, None, self.norm)  # BN as a 1x1 conv
        conv = nn.Conv2d(c, k, 1).to(prompts.device, prompts.dtype)
        with torch.no_grad():
            conv.weight.copy_((prompts @ bn_kernel.reshape(c, c)).reshape(k, c, 1, 1))
            conv.bias.copy_(prompts @ bn_bias + self.bias)
        return conv


class WorldDetectHead(nn.Module):
    """Per level: ``cv2`` box DFL logits, ``cv3`` region embeddings, ``cv4`` contrastive scoring.

    Names follow ultralytics ``WorldDetect`` (``cv2``/``cv3``/``cv4``) so checkpoints map 1:1.
    """

    def __init__(
        self, in_channels: tuple[int, ...], num_classes: int = 80, embed: int = 512, bins: int = 16
    ) -> None:
        super().__init__()
        self.bins = bins
        c_box = max(16, in_channels[0] // 4, bins * 4)
        c_cls = max(in_channels[0], min(num_classes, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(conv_silu(c, c_box, 3), conv_silu(c_box, c_box, 3), nn.Conv2d(c_box, 4 * bins, 1))
            for c in in_channels
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(conv_silu(c, c_cls, 3), conv_silu(c_cls, c_cls, 3), nn.Conv2d(c_cls, embed, 1))
            for c in in_channels
        )
        self.cv4 = nn.ModuleList(BNContrastiveHead(embed) for _ in in_channels)
        self.baked = False
        with torch.no_grad():  # ultralytics' bias init for the box branch
            for branch in self.cv2:
                branch[-1].bias.fill_(1.0)

    def bake(self, text: torch.Tensor) -> None:
        """Fold the fixed prompts ``text [K, C]`` into the class branch: each level's scorer becomes
        a 1x1 conv, and since nothing non-linear lies between the embedding conv (``cv3[-1]``,
        ``c_cls -> embed``) and that scorer (``embed -> K``), the two are composed into ONE
        ``c_cls -> K`` conv: the ``embed``-channel map (512 for v2) is never computed. At 640 this
        drops about 0.8 GMAC of YOLO-World-S's 16 and the largest intermediate tensors of the head."""
        for branch, head in zip(self.cv3, self.cv4):
            branch[-1] = compose_1x1(branch[-1], head.bake(text))
        self.cv4 = nn.ModuleList(nn.Identity() for _ in self.cv4)
        self.baked = True

    def forward(
        self, feats: tuple[torch.Tensor, ...], text: torch.Tensor | None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``cls_logits [B,A,K]`` and ``reg_distri [B,A,4*bins]`` over all levels."""
        logits, distri = [], []
        for feat, box, emb, score in zip(feats, self.cv2, self.cv3, self.cv4):
            b = feat.shape[0]
            distri.append(box(feat).reshape(b, 4 * self.bins, -1))
            region = emb(feat)
            if self.baked:  # cv3 already ends in the composed K-class conv
                logits.append(region.flatten(2))
            else:
                if text is None:
                    raise RuntimeError("the head needs text embeddings unless the vocabulary is baked in")
                logits.append(score(region, text).flatten(2))
        cls_logits = torch.cat(logits, 2).transpose(1, 2)
        if mask is not None:
            cls_logits = cls_logits.masked_fill(~mask[:, None, :], MASKED_LOGIT)
        return cls_logits, torch.cat(distri, 2).transpose(1, 2)
