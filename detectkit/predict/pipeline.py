"""``model.predict``: images, folders, globs, URLs, arrays or videos in, detections in original pixels out.

Follows super-gradients' ``DetectionPipeline``: images are decoded to RGB with PIL (like SG, no
EXIF rotation is applied), letterboxed (longest side 636, centre padded to 640 with 114 by
default), divided by 255, run through the model in eval mode, post-processed by
:func:`detectkit.ops.postprocess` and mapped back with the letterbox inverse.
"""

from __future__ import annotations

import copy
import glob
import io
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

from detectkit.data.letterbox import letterbox, unletterbox_boxes
from detectkit.ops.nms import postprocess
from detectkit.predict.results import VIDEO_EXTENSIONS, ImagePrediction, Predictions

__all__ = ["predict", "load_image", "iter_source", "IMAGE_EXTENSIONS"]

#: suffixes picked up from folders and globs (same list as super-gradients)
IMAGE_EXTENSIONS = (".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".pfm", ".pgm", ".png", ".ppm", ".tif",
                    ".tiff", ".webp")
_URL_SCHEMES = ("http", "https", "file")


@dataclass
class _Frame:
    image: np.ndarray  # HWC uint8 RGB
    source: str | None
    fps: float | None = None  # set for video frames


def predict(
    model: nn.Module,
    source: Any,
    conf: float = 0.25,
    iou: float = 0.7,
    size: int | tuple[int, int] = 640,
    longest: int | None = 636,
    max_det: int = 300,
    top_k: int = 1000,
    multi_label: bool = True,
    agnostic: bool = False,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    fuse: bool = False,
    stream: bool = False,
) -> Predictions | Iterator[ImagePrediction]:
    """Run a detector on ``source`` and return one :class:`ImagePrediction` per image or video frame.

    ``source``: a file path, folder (images sorted by name), glob pattern, http(s)/file:// URL,
    PIL image, HWC RGB uint8 array (or a 4-D batch of them), uint8 tensor, video file, or a
    list of those. ``conf``/``iou``/``top_k``/``max_det``/``multi_label``/``agnostic`` are the
    post-processing settings; ``size``/``longest`` the letterbox. The model's train/eval mode (and
    device, if ``device`` moves it) is restored afterwards; ``fuse=True`` fuses a copy, never the
    caller's model. ``stream=True`` returns a generator instead of a list, so long videos do not
    have to fit in memory.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stride = max(getattr(model, "strides", (1,)))
    if any(int(side) % stride for side in ((size, size) if isinstance(size, int) else size)):
        raise ValueError(f"size={size} must be a multiple of the model's largest stride ({stride})")
    settings = dict(size=size, longest=longest, conf=conf, iou=iou, top_k=top_k, max_det=max_det,
                    multi_label=multi_label, agnostic=agnostic)
    gen = _predict_stream(model, source, batch_size, device, fuse, settings)
    if stream:
        return gen
    results = list(gen)
    fps = {p.fps for p in results}
    return Predictions(results, fps=fps.pop() if len(fps) == 1 else None)


def _predict_stream(model: nn.Module, source: Any, batch_size: int, device: str | torch.device | None,
                    fuse: bool, settings: dict[str, Any]) -> Iterator[ImagePrediction]:
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    class_names = list(getattr(model, "class_names", None) or [])
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
        batch: list[_Frame] = []
        for frame in iter_source(source):
            batch.append(frame)
            if len(batch) == batch_size:
                yield from _run_batch(net, batch, class_names, device, dtype, **settings)
                batch = []
        if batch:
            yield from _run_batch(net, batch, class_names, device, dtype, **settings)
    finally:
        if not fuse and home != device:
            model.to(home)
        model.train(was_training)


def _run_batch(net: nn.Module, batch: list[_Frame], class_names: list[str], device: torch.device,
               dtype: torch.dtype, size: int | tuple[int, int], longest: int | None, conf: float, iou: float,
               top_k: int, max_det: int, multi_label: bool, agnostic: bool) -> list[ImagePrediction]:
    inputs, infos = [], []
    for frame in batch:
        padded, info = letterbox(frame.image, size=size, longest=longest, center=True)
        inputs.append(padded)
        infos.append(info)
    x = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2).to(device=device, dtype=dtype).div_(255.0)
    with torch.inference_mode():
        raw = net(x)
        if not (isinstance(raw, (tuple, list)) and len(raw) == 2 and all(isinstance(t, torch.Tensor) and t.ndim == 3
                                                                       for t in raw)
                and raw[0].shape[-1] == 4 and raw[0].shape[:2] == raw[1].shape[:2]):
            raise TypeError(f"{type(net).__name__} in eval mode must return (boxes [B,A,4], scores [B,A,C]) "
                            f"like detectkit.models.base.Detector; got {type(raw).__name__}")
        boxes, scores = raw
        dets = postprocess(boxes, scores, conf=conf, iou=iou, top_k=top_k, max_det=max_det,
                           multi_label=multi_label, agnostic=agnostic)
    out = []
    for frame, info, det in zip(batch, infos, dets):
        det = det.float().cpu()
        out.append(ImagePrediction(
            image=frame.image,
            boxes=unletterbox_boxes(det[:, :4], info).numpy(),
            scores=det[:, 4].numpy(),
            labels=det[:, 5].round().long().numpy(),
            class_names=class_names,
            source=frame.source,
            letterbox=info,
            fps=frame.fps,
        ))
    return out


def iter_source(source: Any) -> Iterator[_Frame]:
    """Decode ``source`` lazily into RGB uint8 frames (video frames are read one at a time)."""
    if isinstance(source, (list, tuple)):
        for item in source:
            yield from iter_source(item)
    elif isinstance(source, (str, os.PathLike)):
        yield from _iter_path_or_url(os.fspath(source))
    elif isinstance(source, Image.Image):
        yield _Frame(np.asarray(source.convert("RGB")), None)
    elif isinstance(source, torch.Tensor):
        yield from iter_source(source.detach().cpu().numpy())
    elif isinstance(source, np.ndarray):
        if source.ndim == 4:
            for image in source:
                yield _Frame(_check_array(image), None)
        else:
            yield _Frame(_check_array(source), None)
    else:
        raise TypeError(f"unsupported source type {type(source).__name__}: give a path, folder, glob, URL, "
                        "PIL image, numpy array, tensor, video file, or a list of those")


def load_image(path_or_url: str | os.PathLike) -> np.ndarray:
    """Read one image file or URL as an HWC RGB uint8 array."""
    frames = list(_iter_path_or_url(os.fspath(path_or_url)))
    if len(frames) != 1:
        raise ValueError(f"{path_or_url} holds {len(frames)} images, not one")
    return frames[0].image


def _is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme.lower() in _URL_SCHEMES and "://" in text


def _iter_path_or_url(text: str) -> Iterator[_Frame]:
    if _is_url(text):
        yield from _iter_url(text)
        return
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        for f in files:
            yield _Frame(_decode_image_file(f), str(f))
    elif path.is_file():
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            yield from _iter_video(path, str(path))
        else:
            yield _Frame(_decode_image_file(path), str(path))
    elif glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS]
        if not files:
            raise FileNotFoundError(f"no image or video files match {text!r}")
        for f in files:
            yield from _iter_path_or_url(str(f))
    else:
        raise FileNotFoundError(f"no such image, video or folder: {path}")


def _decode_image_file(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _iter_url(url: str) -> Iterator[_Frame]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot download {url}: {e}") from e
    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        # cv2.VideoCapture reads files, not bytes: keep the download in a temporary file while decoding.
        with tempfile.TemporaryDirectory(prefix="detectkit-") as tmp:
            local = Path(tmp) / f"video{suffix}"
            local.write_bytes(data)
            yield from _iter_video(local, url)
        return
    try:
        with Image.open(io.BytesIO(data)) as im:
            yield _Frame(np.asarray(im.convert("RGB")), url)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image downloaded from {url}: {e}") from e


def _iter_video(path: Path, name: str) -> Iterator[_Frame]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"cannot open video {name} (OpenCV could not decode it)")
    fps = float(cap.get(cv2.CAP_PROP_FPS)) or 25.0
    index = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            yield _Frame(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), f"{name}#{index}", fps)
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise ValueError(f"video {name} has no readable frames")


def _check_array(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 RGB (0-255), got {image.dtype}; convert float images "
                        "in [0, 1] with (image * 255).round().astype(np.uint8)")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
        return np.ascontiguousarray(image[:3].transpose(1, 2, 0))  # CHW -> HWC
    raise ValueError(f"cannot interpret array of shape {image.shape} as an image; expected HWC RGB")

