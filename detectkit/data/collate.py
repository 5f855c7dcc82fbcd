"""The one collate: samples -> the batch dict of the data contract."""

from __future__ import annotations

import torch

__all__ = ["collate"]


def collate(samples: list[dict]) -> dict:
    """``images`` uint8 [B,3,H,W], ``targets`` float32 [N,6] = (batch_index, class, x1, y1, x2, y2)
    in input pixels, ``meta`` list of per-image dicts. All images must share one size (the
    pipeline guarantees it); anything else is an error naming the images."""
    if not samples:
        raise ValueError("collate got an empty batch")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) != 1:
        listing = ", ".join(f"{s['meta'].get('path')}: {tuple(s['image'].shape)}" for s in samples[:8])
        raise ValueError(f"images in a batch must share one size; got {listing}")
    images = torch.stack([s["image"] for s in samples])
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [B,3,H,W] images, got {images.dtype} {tuple(images.shape)}")
    rows = []
    for i, s in enumerate(samples):
        boxes = s["boxes"].reshape(-1, 4).float()
        labels = s["labels"].reshape(-1).float()
        if len(boxes) != len(labels):
            raise ValueError(f"{s['meta'].get('path')}: {len(boxes)} boxes but {len(labels)} labels")
        idx = torch.full((len(boxes), 1), float(i))
        rows.append(torch.cat([idx, labels[:, None], boxes], 1))
    targets = torch.cat(rows) if rows else torch.zeros((0, 6))
    return {"images": images, "targets": targets.float(), "meta": [s["meta"] for s in samples]}
