"""The one collate: samples -> the batch dict of the data contract."""

from __future__ import annotations

import cv2
import numpy as np
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
    first = samples[0]["image"]
    if any(s["image"].dtype != torch.uint8 for s in samples) or first.ndim != 3 or first.shape[0] != 3:
        raise ValueError(f"expected uint8 [B,3,H,W] images, got {first.dtype} {(len(samples), *first.shape)}")
    images = _batch_buffer((len(samples), *first.shape))
    out = images.numpy()
    for i, s in enumerate(samples):
        hwc = s["image"].permute(1, 2, 0)
        if hwc.is_contiguous():
            # the dataset's CHW view of an HWC array: OpenCV's SIMD channel split is the fastest
            # HWC -> CHW copy here (2-3x torch's strided copy on one core), written straight into
            # the batch (half the time of splitting into new planes and copying those)
            planes = [out[i, k] for k in range(3)]
            written = cv2.split(hwc.numpy(), planes)
            for k, plane in enumerate(written):
                if not np.shares_memory(plane, out[i, k]):  # OpenCV allocated after all: copy
                    out[i, k] = plane
        else:
            images[i].copy_(s["image"])
    rows = []
    for i, s in enumerate(samples):
        boxes = s["boxes"].reshape(-1, 4).float()
        labels = s["labels"].reshape(-1).float()
        if len(boxes) != len(labels):
            raise ValueError(f"{s['meta'].get('path')}: {len(boxes)} boxes but {len(labels)} labels")
        idx = torch.full((len(boxes), 1), float(i))
        rows.append(torch.cat([idx, labels[:, None], boxes], 1))
    targets = torch.cat(rows) if rows else torch.zeros((0, 6))
    meta = [s["meta"] for s in samples]
    for key in _PACKED_META:
        _pack(meta, key)
    return {"images": images, "targets": targets.float(), "meta": meta}


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 batch tensor. Inside a DataLoader worker it is made in shared memory at once (as
    torch's ``default_collate`` does): the worker would otherwise copy the whole finished batch
    into a new shared-memory segment to send it, a second pass over ~20 MB per 640-px batch of 16."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


_PACKED_META = ("boxes", "labels", "iscrowd")


def _pack(meta: list[dict], key: str) -> None:
    """Make ``meta[i][key]`` views into ONE tensor per key. A loader worker sends every tensor of a
    batch through its own shared-memory segment; 3 tensors per image made that a third of a
    16-image batch's transfer cost. Views of one storage share one segment."""
    parts = [m.get(key) for m in meta]
    if not parts or not all(isinstance(t, torch.Tensor) for t in parts):
        return
    if len({t.dtype for t in parts}) != 1:
        return
    flat = torch.cat([t.reshape(-1) for t in parts])
    start = 0
    for m, t in zip(meta, parts):
        m[key] = flat[start : start + t.numel()].view(t.shape)
        start += t.numel()
