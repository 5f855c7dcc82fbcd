"""Which pip extra brings which optional package, so a missing one is a one-line fix, not a traceback.

A base install (``pip install detectkit``) fits, validates and predicts; export, serving, search,
tracking, sliced inference, text prompts, Roboflow downloads, user albumentations pipelines
(``data.augment.extra``) and timm backbones (``backbone: timm/<name>``) need an extra. When an
import of one of those packages fails, :func:`missing_extra_message` names the extra to install. Standard library only.
"""

from __future__ import annotations

import re

__all__ = ["EXTRA_OF_MODULE", "missing_module", "missing_extra_message"]

#: top-level import name -> the extra (pyproject ``[project.optional-dependencies]``) that installs it
EXTRA_OF_MODULE: dict[str, str] = {
    "onnx": "export",
    "onnxruntime": "export",
    "onnx_graphsurgeon": "export",
    "modelopt": "export",
    "torch_pruning": "export",
    "openvino": "openvino",
    "transformers": "text",
    "mlflow": "tracking",
    "wandb": "tracking",
    "roboflow": "roboflow",
    "litserve": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "prometheus_client": "serve",
    "httpx": "serve",
    "optuna": "nas",
    "albumentations": "augment",
    "timm": "timm",
    "trackers": "track",
    "supervision": "track",
    "sahi": "slice",
}

# Lightning's loggers raise ModuleNotFoundError("Requirement 'mlflow>=1.0.0' not met ...") without ``name``
_REQUIREMENT = re.compile(r"(?:No module named|Requirement) '([A-Za-z0-9_.\-]+)")


def missing_module(error: BaseException) -> str | None:
    """The top-level module an error is about (``onnx`` for ``No module named 'onnx.helper'``): the
    error itself, what caused it (jsonargparse wraps a failed class_path import), or its message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = current.name if isinstance(current, ImportError) else None
        if not name:
            match = _REQUIREMENT.search(str(current))
            name = match.group(1) if match else None
        if name:
            return re.split(r"[.<>=!~\[ ]", name, maxsplit=1)[0].replace("-", "_")
        current = current.__cause__ or current.__context__
    return None


def missing_extra_message(error: BaseException, feature: str) -> str | None:
    """``<feature> needs the package 'onnx': pip install 'detectkit[export]'`` when ``error`` is a
    missing optional package, else None (a missing base package is a broken install, not this)."""
    module = missing_module(error)
    extra = EXTRA_OF_MODULE.get(module or "")
    if extra is None:
        return None
    return f"{feature} needs the package {module!r}, which is not installed: pip install 'detectkit[{extra}]'"
