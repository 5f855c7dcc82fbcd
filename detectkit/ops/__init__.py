"""Pure functions on boxes: geometry, decoding and post-processing."""

from detectkit.ops.boxes import (
    bbox2distance,
    clip_boxes,
    cxcywh_to_xyxy,
    distance2bbox,
    make_anchors,
    paired_iou,
    xyxy_to_cxcywh,
)
from detectkit.ops.nms import PostprocessConfig, postprocess

__all__ = [
    "bbox2distance", "clip_boxes", "cxcywh_to_xyxy", "distance2bbox", "make_anchors",
    "paired_iou", "PostprocessConfig", "postprocess", "xyxy_to_cxcywh",
]
