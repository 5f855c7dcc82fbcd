"""detectkit: Lightning-native YOLO-NAS and YOLO-World."""

from detectkit.registry import list_models, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "register_model", "load", "DetectionModule", "ModelEMA", "__version__"]

# ``create_model`` and ``load`` are the checkpoint package's: they also read detectkit checkpoint files
_LAZY = {
    "DetectionModule": "detectkit.modules.detector",
    "ModelEMA": "detectkit.modules.ema",
    "load": "detectkit.checkpoint",
    "create_model": "detectkit.checkpoint",
}


def __getattr__(name: str):
    # lazy: ``import detectkit`` must not pull in Lightning for users who only build models
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detectkit' has no attribute {name!r}")
