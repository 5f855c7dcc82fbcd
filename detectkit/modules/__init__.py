"""Lightning pieces: the DetectionModule, SG's EMA callback, the lr schedule and the mAP glue."""

from detectkit.modules.detector import DetectionModule, param_groups
from detectkit.modules.ema import ModelEMA, ema_decay
from detectkit.modules.schedule import OptimConfig, warmup_cosine_factor, warmup_cosine_scheduler

__all__ = ["DetectionModule", "ModelEMA", "OptimConfig", "ema_decay", "param_groups", "warmup_cosine_factor",
           "warmup_cosine_scheduler"]
