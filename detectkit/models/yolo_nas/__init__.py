"""YOLO-NAS S/M/L (architecture of Deci-AI super-gradients 3.7.1); importing registers the builders."""

from detectkit.models.yolo_nas.configs import CONFIGS, YoloNASConfig
from detectkit.models.yolo_nas.model import (
    YoloNAS,
    build_yolo_nas,
    yolo_nas_custom,
    yolo_nas_l,
    yolo_nas_m,
    yolo_nas_s,
)
from detectkit.models.yolo_nas.weights import load_super_gradients_checkpoint

__all__ = [
    "CONFIGS", "YoloNAS", "YoloNASConfig", "build_yolo_nas", "load_super_gradients_checkpoint",
    "yolo_nas_custom", "yolo_nas_l", "yolo_nas_m", "yolo_nas_s",
]
