"""timm-style model registry: one place that maps a name to a builder."""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `import detectkit` (and the CLI's --help) must not pay for importing torch
    import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register a builder ``fn(num_classes=..., **kwargs) -> nn.Module`` under its function name."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, sorted."""
    discover()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, num_classes: int = 80, checkpoint: str | Mapping | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``checkpoint`` (a foreign file or a state dict) goes to the builder.

    The family's weight loader reads it (super-gradients ``.pth``, ultralytics ``.pt``, a state
    dict) and may re-initialise the class predictors for another ``num_classes``. A detectkit
    ``.ckpt`` or weights file is rebuilt from its record by :func:`detectkit.create_model`
    (:func:`detectkit.checkpoint.create_model`), which calls this function.
    """
    discover()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    model = _MODELS[name](num_classes=num_classes, checkpoint=checkpoint, **kwargs)
    # what a checkpoint record needs to rebuild this model (declared by detectkit.models.base.Detector)
    model.registry_name = name
    # A builder may set its own canonical form (yolo_nas_custom stores the architecture dict, not
    # the YAML path it was given, so the record never depends on a file that may vanish).
    given = {k: v for k, v in kwargs.items() if k not in ("pretrained", "download")}
    model.registry_kwargs = getattr(model, "registry_kwargs", None) or given
    return model


def name_of(model: nn.Module) -> str | None:
    """The registry name a model was built under (or whose builder is its class), else None."""
    name = getattr(model, "registry_name", None)
    if isinstance(name, str):
        return name
    return next((n for n, f in _MODELS.items() if f is type(model)), None)


#: packages whose import registers models (``@register_model``), checkpoint readers and architecture
#: ops (``detectkit.checkpoint.hooks``). Plugin discovery by name: they sit above the registry and
#: the checkpoint package in the layers, which must not import them.
PLUGINS: tuple[str, ...] = ("detectkit.models", "detectkit.compress")


def discover() -> None:
    """Import every package in :data:`PLUGINS` (once; later calls find them in ``sys.modules``)."""
    for name in PLUGINS:
        importlib.import_module(name)
