"""``predict``: images, folders, globs, URLs, arrays or videos in, detections in original pixels out.

Every image goes through the one decoder (:mod:`detectkit.predict.sources`, EXIF applied), the
one letterbox (:func:`detectkit.data.letterbox.letterbox`), the model in eval mode, the one
post-processing (:func:`detectkit.ops.nms.postprocess` with a :class:`PostprocessConfig`) and the
letterbox inverse. Settings the caller leaves at ``None`` come from ``model.inference``
(:class:`detectkit.models.base.InferenceDefaults`), i.e. from the checkpoint: a model trained and
validated at 128 px is predicted at 128 px with its validation letterbox, not at 640.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from detectkit.data.letterbox import letterbox
from detectkit.models.base import InferenceDefaults
from detectkit.ops.nms import PostprocessConfig
from detectkit.predict.results import ImagePrediction, Predictions
from detectkit.predict.slicing import SliceConfig, detect_sliced
from detectkit.predict.sources import IMAGE_EXTENSIONS, Frame, SourceOptions, iter_source, load_image
from detectkit.predict.step import detect_batch, to_input

__all__ = ["predict", "resolve_settings", "PredictSettings", "load_image", "iter_source", "IMAGE_EXTENSIONS"]

#: ``longest="auto"``: from ``model.inference`` (scaled with ``size`` when the caller changes it)
AUTO = "auto"


@dataclass(frozen=True)
class PredictSettings:
    """Everything that decides a prediction besides the pixels: letterbox and post-processing."""

    size: tuple[int, int]
    longest: int | None
    center: bool
    pad_value: int
    post: PostprocessConfig


def resolve_settings(
    model: nn.Module,
    size: int | tuple[int, int] | None = None,
    longest: int | None | str = AUTO,
    postprocess_config: PostprocessConfig | None = None,
    **post_overrides: Any,
) -> PredictSettings:
    """The caller's values over ``model.inference`` (a model without one gets the defaults).

    ``size`` given without ``longest`` keeps the model's letterbox shape: "fit inside" stays fit
    inside; super-gradients' 636-in-640 becomes the same ratio of the new size.
    """
    inference = getattr(model, "inference", None) or InferenceDefaults()
    base_size = tuple(int(s) for s in inference.image_size)
    if size is None:
        hw = base_size
    else:
        hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if longest == AUTO:
        longest = inference.longest
        if longest is not None and hw != base_size:
            longest = int(round(max(hw) * longest / max(base_size)))
    post = (postprocess_config or inference.postprocess).replace(**post_overrides)
    return PredictSettings(hw, longest, bool(inference.center), int(inference.pad_value), post)


def predict(
    model: nn.Module,
    source: Any,
    conf: float | None = None,
    iou: float | None = None,
    size: int | tuple[int, int] | None = None,
    longest: int | None | str = AUTO,
    max_det: int | None = None,
    top_k: int | None = None,
    multi_label: bool | None = None,
    agnostic: bool | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    fuse: bool = False,
    stream: bool = False,
    postprocess_config: PostprocessConfig | None = None,
    source_options: SourceOptions | None = None,
    slice: SliceConfig | None = None,  # noqa: A002  the name SAHI users and the CLI's --slice know
) -> Predictions | Iterator[ImagePrediction]:
    """Run a detector on ``source`` and return one :class:`ImagePrediction` per image or video frame.

    ``source``: a file path, folder (images sorted by name), glob pattern, http(s)/file:// URL,
    PIL image, HWC RGB uint8 array (or a 4-D batch of them), uint8 tensor, video file, or a
    list of those. ``conf``/``iou``/``top_k``/``max_det``/``multi_label``/``agnostic`` (or a whole
    ``postprocess_config``) are the post-processing, ``size``/``longest`` the letterbox; ``None``
    means the model's own (``model.inference``). The model's train/eval mode (and device, if
    ``device`` moves it) is restored afterwards; ``fuse=True`` fuses a copy, never the caller's
    model. ``stream=True`` returns a generator, so long videos need not fit in memory.
    ``source_options`` (:class:`~detectkit.predict.sources.SourceOptions`): video frame stride,
    live-stream reconnects and timeouts. ``slice`` (:class:`~detectkit.predict.slicing.SliceConfig`):
    predict each image tile by tile (small objects in large images), ``batch_size`` tiles per
    forward, and merge the tiles' boxes (needs the ``slice`` extra).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = resolve_settings(model, size, longest, postprocess_config, conf=conf, iou=iou, top_k=top_k,
                                max_det=max_det, multi_label=multi_label, agnostic=agnostic)
    stride = max(getattr(model, "strides", (1,)))
    if any(side % stride for side in settings.size):
        raise ValueError(f"size={settings.size} must be a multiple of the model's largest stride ({stride})")
    gen = _predict_stream(model, source, batch_size, device, fuse, settings, source_options, slice)
    if stream:
        return gen
    results = list(gen)
    fps = {p.fps for p in results}
    return Predictions(results, fps=fps.pop() if len(fps) == 1 else None)


def _predict_stream(model: nn.Module, source: Any, batch_size: int, device: str | torch.device | None,
                    fuse: bool, settings: PredictSettings,
                    source_options: SourceOptions | None = None,
                    slicing: SliceConfig | None = None) -> Iterator[ImagePrediction]:
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    class_names = list(getattr(model, "class_names", None) or [])
    category_ids = getattr(model, "category_ids", None)
    was_training = model.training
    net = model
    if fuse:
        net = copy.deepcopy(model).eval()
        fused = net.fuse()
        net = (fused if isinstance(fused, nn.Module) else net).to(device)
    elif home != device:
        model.to(device)  # like super-gradients; moved back below
    try:
        net.eval()
        batch: list[Frame] = []
        index = 0
        for frame in iter_source(source, source_options):
            batch.append(frame)
            if len(batch) == batch_size:
                yield from _run_batch(net, batch, index, class_names, category_ids, device, dtype, settings,
                                      slicing, batch_size)
                index += len(batch)
                batch = []
        if batch:
            yield from _run_batch(net, batch, index, class_names, category_ids, device, dtype, settings,
                                      slicing, batch_size)
    finally:
        if not fuse and home != device:
            model.to(home)
        model.train(was_training)


def _run_batch(net: nn.Module, batch: list[Frame], start: int, class_names: list[str], category_ids: Any,
               device: torch.device, dtype: torch.dtype, s: PredictSettings,
               slicing: SliceConfig | None = None, tile_batch: int = 8) -> list[ImagePrediction]:
    """Letterbox the frames, then the one batch step (:func:`detectkit.predict.step.detect_batch`);
    sliced, the frames' tiles go through it (:func:`detectkit.predict.slicing.detect_sliced`)."""
    if slicing is not None:
        infos: list[Any] = [None] * len(batch)  # many letterboxes per image: none describes it
        dets = detect_sliced(net, [frame.image for frame in batch], slicing, s, tile_batch, device, dtype)
    else:
        padded = [letterbox(frame.image, size=s.size, longest=s.longest, center=s.center, pad_value=s.pad_value)
                  for frame in batch]
        infos = [info for _, info in padded]
        dets = detect_batch(net, to_input([image for image, _ in padded], device, dtype), infos, s.post)
    ids = None if category_ids is None else [int(c) for c in category_ids]
    return [ImagePrediction(image=frame.image, boxes=det.boxes.numpy(), scores=det.scores.numpy(),
                            labels=det.labels.numpy(), class_names=class_names, source=frame.source, letterbox=info,
                            fps=frame.fps, index=start + i, category_ids=ids, best_score=det.best_score)
            for i, (frame, info, det) in enumerate(zip(batch, infos, dets))]
