"""User augmentation pipelines: albumentations transforms named in a recipe (``data.augment.extra``).

The built-in pipeline (:mod:`detectkit.data.transforms`) is hand-written for speed and stays the
default; a researcher who wants one more augmentation lists albumentations transforms instead of
editing detectkit::

    data:
      augment:
        extra:
          - {name: RandomBrightnessContrast, p: 0.3}
          - {name: OneOf, transforms: [{name: Blur}, {name: MotionBlur}], p: 0.2}
          - {__class_fullname__: Perspective, scale: [0.02, 0.05], p: 0.2}   # A.to_dict's form
          - {name: my_augment.Sepia, p: 0.1}   # your own albumentations subclass, by import path

Each entry is ``name`` + the transform's arguments, or albumentations' own serialized form
(``A.to_dict(t)["transform"]`` or the whole ``A.to_dict`` output). Boxes go through albumentations'
``pascal_voc`` handling (pixel-edge xyxy, our coordinates) with the built-in pipeline's rules:
clipped to the image, dropped under ``min_box_size`` px a side, under ``min_visibility`` of their
area, or thinner than ``max_aspect_ratio``. albumentations is imported only when ``extra`` is set.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from detectkit.errors import UserError
from detectkit.extras import missing_extra_message

__all__ = ["EXTRA_MODES", "build_pipeline", "apply_pipeline", "transform_names"]

#: ``augment.extra_mode``: the user pipeline runs after the built-in one, or replaces it
EXTRA_MODES = ("after", "replace")
WHERE = "data.augment.extra"


def _albumentations() -> Any:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import
    try:
        import albumentations as A
    except ImportError as e:
        raise UserError(missing_extra_message(e, WHERE) or f"{WHERE} needs albumentations: {e}") from e
    return A


def transform_names() -> list[str]:
    """Every transform (and composition: OneOf, SomeOf, Sequential ...) albumentations exports."""
    A = _albumentations()
    from albumentations.core.composition import BaseCompose
    from albumentations.core.transforms_interface import BasicTransform

    return sorted(n for n, v in vars(A).items()
                  if isinstance(v, type) and issubclass(v, BasicTransform | BaseCompose) and not n.startswith("_"))


def _user_transform(path: str, where: str) -> type:
    """``my_augment.Sepia``: a class of the user's that subclasses an albumentations transform, so
    the box handling, probability and seeding below apply to it as to albumentations' own."""
    import importlib

    from albumentations.core.transforms_interface import BasicTransform

    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise UserError(f"{where}: cannot import {module_name!r} for transform {path!r} ({e}); "
                        f"run from the folder that holds it or put it on PYTHONPATH") from e
    except AttributeError:
        raise UserError(f"{where}: module {module_name!r} has no {attr!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, BasicTransform)):
        raise UserError(f"{where}: {path!r} is not an albumentations transform class "
                        f"(subclass albumentations.ImageOnlyTransform or DualTransform)")
    return cls


def _build_one(spec: Any, where: str) -> Any:
    """One transform from ``{name: X, **args}`` or a serialized dict; nested ``transforms`` lists
    (OneOf, SomeOf, Sequential) are built the same way."""
    A = _albumentations()
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: expected a mapping such as {{name: HorizontalFlip, p: 0.5}}, got {spec!r}")
    try:
        if "__class_fullname__" in spec or isinstance(spec.get("transform"), Mapping):
            return A.from_dict(dict(spec) if "transform" in spec else {"transform": dict(spec)})
        if "name" not in spec:
            raise UserError(f"{where}: give `name:` (an albumentations transform) or albumentations' serialized "
                            f"form (`__class_fullname__:`), got keys {sorted(spec)}")
        args = {k: v for k, v in spec.items() if k != "name"}
        name = str(spec["name"])
        if "." in name:  # the user's own transform, by import path like LightningCLI's class_path
            cls = _user_transform(name, where)
        else:
            names = transform_names()
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                hint = f"; close matches: {', '.join(close)}" if close else " (see albumentations' transform list)"
                raise UserError(f"{where}: unknown albumentations transform {name!r}{hint}")
            cls = getattr(A, name)
        if isinstance(args.get("transforms"), list):
            args["transforms"] = [_build_one(s, f"{where}.transforms[{i}]") for i, s in enumerate(args["transforms"])]
        params = inspect.signature(cls).parameters
        if "strict" in params:
            args.setdefault("strict", True)  # a misspelt argument is an error, not a warning
        elif not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(args) - set(params))
            if unknown:
                close = difflib.get_close_matches(unknown[0], list(params), n=1)
                tip = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"{where} ({name}): unknown argument {unknown[0]!r}{tip}")
        return cls(**args)
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # pydantic's explanation without its links and type tags
        text = re.sub(r"\s*(\[type=[^\]]*\]|For further information visit \S+)", "", str(e))
        text = " ".join(text.split()) or type(e).__name__
        raise UserError(f"{where} ({spec.get('name') or spec.get('__class_fullname__')}): "
                        f"{text if len(text) <= 300 else text[:297] + '...'}") from e


def build_pipeline(
    specs: Sequence[Any], min_box_size: float = 2.0, min_visibility: float = 0.1, max_aspect_ratio: float = 20.0
) -> Any:
    """An ``A.Compose`` of ``specs`` with box handling matching the built-in pipeline's filter."""
    A = _albumentations()
    transforms = [_build_one(s, f"{WHERE}[{i}]") for i, s in enumerate(specs)]
    boxes = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True,
                         min_visibility=min_visibility, min_width=min_box_size, min_height=min_box_size,
                         max_accept_ratio=max_aspect_ratio)
    with warnings.catch_warnings():  # pixel-only pipelines are fine: boxes pass through unchanged
        warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform to process it")
        return A.Compose(transforms, bbox_params=boxes)


def _reseed(transform: Any, rng: np.random.Generator) -> None:
    """A distinct seed per transform (``Compose.set_random_seed`` gives every child the same one,
    so two transforms with equal ``p`` would always fire together)."""
    transform.set_random_seed(int(rng.integers(2**32)))
    for child in getattr(transform, "transforms", ()):
        _reseed(child, rng)


def apply_pipeline(
    pipeline: Any, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``pipeline`` on one HWC uint8 RGB sample; random draws come from ``rng`` (so the sample
    depends on the seed, epoch and index only, as the built-in pipeline's do)."""
    _reseed(pipeline, rng)
    out = pipeline(image=image, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                   labels=np.asarray(labels, np.int64).reshape(-1))
    img = out["image"]
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        what = f"{img.dtype} {tuple(img.shape)}" if hasattr(img, "shape") else type(img).__name__
        raise UserError(f"{WHERE}: the pipeline must return an HxWx3 uint8 image, got {what} (leave out "
                        "Normalize / ToTensorV2 / ToGray(num_output_channels=1): detectkit converts the images itself)")
    out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
    return img, out_boxes, np.asarray(out["labels"], np.int64).reshape(-1)
