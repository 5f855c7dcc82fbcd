"""What ``predict`` accepts, decoded lazily into RGB uint8 frames.

Files, folders, globs, http(s)/file:// URLs and PIL images all go through the one image decoder,
:func:`detectkit.data.images.read_image` / :func:`~detectkit.data.images.to_rgb` (EXIF
orientation applied, so a phone photo is predicted upright, exactly as the training data was
read); arrays and tensors are taken as RGB pixels; videos are read frame by frame with OpenCV.
"""

from __future__ import annotations

import glob
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detectkit.data.images import IMAGE_EXTENSIONS, decode_image, read_image, to_rgb

__all__ = ["Frame", "iter_source", "load_image", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "is_url"]

#: suffixes read with cv2.VideoCapture and written by Predictions.save(video_path)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
_URL_SCHEMES = ("http", "https", "file")


@dataclass
class Frame:
    """One decoded image: HWC uint8 RGB pixels, where they came from, the video's fps (else None)."""

    image: np.ndarray
    source: str | None
    fps: float | None = None


def iter_source(source: Any) -> Iterator[Frame]:
    """Decode ``source`` lazily into RGB uint8 frames (video frames are read one at a time)."""
    if isinstance(source, (list, tuple)):
        for item in source:
            yield from iter_source(item)
    elif isinstance(source, (str, os.PathLike)):
        yield from _iter_path_or_url(os.fspath(source))
    elif isinstance(source, Image.Image):
        yield Frame(to_rgb(source, getattr(source, "filename", None) or "<PIL image>"), None)
    elif hasattr(source, "detach") and hasattr(source, "numpy"):  # a torch tensor
        yield from iter_source(source.detach().cpu().numpy())
    elif isinstance(source, np.ndarray):
        if source.ndim == 4:
            for image in source:
                yield Frame(_check_array(image), None)
        else:
            yield Frame(_check_array(source), None)
    else:
        raise TypeError(f"unsupported source type {type(source).__name__}: give a path, folder, glob, URL, "
                        "PIL image, numpy array, tensor, video file, or a list of those")


def load_image(path_or_url: str | os.PathLike) -> np.ndarray:
    """Read one image file or URL as an HWC RGB uint8 array."""
    frames = list(_iter_path_or_url(os.fspath(path_or_url)))
    if len(frames) != 1:
        raise ValueError(f"{path_or_url} holds {len(frames)} images, not one")
    return frames[0].image


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme.lower() in _URL_SCHEMES and "://" in text


def _iter_path_or_url(text: str) -> Iterator[Frame]:
    if is_url(text):
        yield from _iter_url(text)
        return
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        for f in files:
            yield Frame(read_image(f), str(f))
    elif path.is_file():
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            yield from _iter_video(path, str(path))
        else:
            yield Frame(read_image(path), str(path))
    elif glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS]
        if not files:
            raise FileNotFoundError(f"no image or video files match {text!r}")
        for f in files:
            yield from _iter_path_or_url(str(f))
    else:
        raise FileNotFoundError(f"no such image, video or folder: {path}")


def _iter_url(url: str) -> Iterator[Frame]:
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
    yield Frame(decode_image(data, url), url)


def _iter_video(path: Path, name: str) -> Iterator[Frame]:
    import cv2

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
            yield Frame(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), f"{name}#{index}", fps)
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
