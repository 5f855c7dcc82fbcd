"""YOLO-World v2 (open vocabulary): importing this registers ``yolo_world_v2_{s,m,l,x}``."""

from detectkit.models.yolo_world import weights  # noqa: F401 (registers the ultralytics reader)
from detectkit.models.yolo_world.model import (
    YoloWorld,
    yolo_world_v2_l,
    yolo_world_v2_m,
    yolo_world_v2_s,
    yolo_world_v2_x,
)

__all__ = ["YoloWorld", "yolo_world_v2_s", "yolo_world_v2_m", "yolo_world_v2_l", "yolo_world_v2_x"]
