"""Interim reader of the detectkit checkpoint record, used only until ``detectkit.load`` exists.

The `checkpoint` branch owns the real loader (integrity hash, foreign formats, pruned/QAT
architectures); :func:`detectkit.serve.api.load_detector` prefers it as soon as it is merged and
this file is then deleted. It reads the COMMON.md record from ``{"detectkit": record,
"state_dict": ...}`` with ``torch.load(weights_only=True)`` (never unpickling code).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from detectkit.models.base import InferenceDefaults
from detectkit.registry import create_model


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable detectkit checkpoint ({e.__class__.__name__}: {e})") from e
    record = ckpt.get("detectkit") if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or "model" not in record:
        raise ValueError(f"{path}: no detectkit record (this interim reader takes detectkit checkpoints only)")
    kwargs = {"num_classes": int(record["num_classes"]), **record.get("model_kwargs", {})}
    model = create_model(record["model"], **kwargs)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    model.class_names = list(record.get("class_names") or model.class_names)
    model.inference = InferenceDefaults.from_dict(record.get("inference"))
    model.category_ids = record.get("category_ids")
    return model.to(device or "cpu").eval()


def save(model: torch.nn.Module, path: str | os.PathLike, model_name: str, **model_kwargs: Any) -> None:
    """Write the record this reader takes (tests and examples until the checkpoint helper lands)."""
    record = {"format_version": 1, "model": model_name, "model_kwargs": model_kwargs,
              "num_classes": int(model.num_classes), "class_names": list(model.class_names),
              "inference": model.inference.to_dict(), "category_ids": getattr(model, "category_ids", None),
              "architecture": []}
    torch.save({"detectkit": record, "state_dict": model.state_dict()}, path)
