"""What ``predict`` accepts, decoded lazily into RGB uint8 frames.

Files, folders, globs, http(s)/file:// URLs and PIL images all go through the one image decoder,
:func:`detectkit.data.images.read_image` / :func:`~detectkit.data.images.to_rgb` (EXIF
orientation applied, so a phone photo is predicted upright, exactly as the training data was
read); arrays and tensors are taken as RGB pixels. Videos, webcams (``"0"``) and live streams
(rtsp/rtmp/udp/tcp/srt URLs, http MJPEG or video streams) go through the one frame reader,
:func:`_read_capture`: OpenCV decoding in a background thread ahead of the model into a bounded
queue, every ``vid_stride``-th frame kept, timeouts on every open and read. A live stream that
stops is reopened ``retries`` times, then ends with one logged line and the frames read so far,
so ``detectkit predict`` finishes and writes what it has instead of hanging or dying.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detectkit.data.images import IMAGE_EXTENSIONS, decode_image, read_image, to_rgb

__all__ = ["Frame", "SourceOptions", "iter_source", "load_image", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "is_url",
           "is_live"]

log = logging.getLogger("detectkit.predict")

#: suffixes read with cv2.VideoCapture and written by Predictions.save(video_path)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
#: live-stream URL schemes, opened by OpenCV (FFmpeg) directly
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "udp", "tcp", "srt")
_URL_SCHEMES = ("http", "https", "file", *STREAM_SCHEMES)
_RECONNECT_DELAY = 0.5  # seconds between reopening attempts of a live stream


@dataclass(frozen=True)
class SourceOptions:
    """How videos and live sources are read.

    ``vid_stride``: keep every N-th frame (the others are decoded but not predicted);
    ``retries``: reopen attempts after a live stream stops before it ends; ``timeout``: seconds
    an open or a read may take (then it counts as a loss); ``queue_size``: frames decoded ahead.
    A live source whose consumer falls behind drops its oldest queued frame (it stays real-time);
    a file never drops one.
    """

    vid_stride: int = 1
    retries: int = 3
    timeout: float = 10.0
    queue_size: int = 32

    def __post_init__(self) -> None:
        for name, low in (("vid_stride", 1), ("retries", 0), ("queue_size", 1)):
            if int(getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")


@dataclass
class Frame:
    """One decoded image: HWC uint8 RGB pixels, where they came from, the video's fps (else None)."""

    image: np.ndarray
    source: str | None
    fps: float | None = None


def iter_source(source: Any, options: SourceOptions | None = None) -> Iterator[Frame]:
    """Decode ``source`` lazily into RGB uint8 frames (video frames are read one at a time)."""
    options = options or SourceOptions()
    if isinstance(source, (list, tuple)):
        for item in source:
            yield from iter_source(item, options)
    elif isinstance(source, int) and not isinstance(source, bool):
        yield from _iter_webcam(source, options)
    elif isinstance(source, (str, os.PathLike)):
        yield from _iter_path_or_url(os.fspath(source), options)
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
    frames = list(_iter_path_or_url(os.fspath(path_or_url), SourceOptions()))
    if len(frames) != 1:
        raise ValueError(f"{path_or_url} holds {len(frames)} images, not one")
    return frames[0].image


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme.lower() in _URL_SCHEMES and "://" in text


def is_live(source: Any) -> bool:
    """A webcam index (``0``, ``"0"``) or a stream URL: frames that come as they are captured."""
    if isinstance(source, int) and not isinstance(source, bool):
        return True
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else ""
    return text.isdigit() or (is_url(text) and urllib.parse.urlparse(text).scheme.lower() in STREAM_SCHEMES)


def _iter_path_or_url(text: str, options: SourceOptions) -> Iterator[Frame]:
    if text.isdigit() and not Path(text).exists():
        yield from _iter_webcam(int(text), options)
        return
    if is_url(text):
        yield from _iter_url(text, options)
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
            yield from _iter_video(path, str(path), options)
        else:
            yield Frame(read_image(path), str(path))
    elif glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS]
        if not files:
            raise FileNotFoundError(f"no image or video files match {text!r}")
        for f in files:
            yield from _iter_path_or_url(str(f), options)
    else:
        raise FileNotFoundError(f"no such image, video or folder: {path}")


def _iter_url(url: str, options: SourceOptions) -> Iterator[Frame]:
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme in STREAM_SCHEMES:
        yield from _iter_stream(url, options)
        return
    try:
        with urllib.request.urlopen(url, timeout=options.timeout) as response:
            live = scheme != "file" and _is_live_response(response.headers)
            data = b"" if live else response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot download {url}: {e}") from e
    if live:  # an MJPEG camera or a live http video: read it as it comes, never download it
        yield from _iter_stream(url, options)
        return
    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        # cv2.VideoCapture reads files, not bytes: keep the download in a temporary file while decoding.
        with tempfile.TemporaryDirectory(prefix="detectkit-") as tmp:
            local = Path(tmp) / f"video{suffix}"
            local.write_bytes(data)
            yield from _iter_video(local, url, options)
        return
    yield Frame(decode_image(data, url), url)


def _is_live_response(headers: Any) -> bool:
    """An MJPEG camera (multipart/x-mixed-replace), or video of no announced length (a live feed);
    a video file over http has a Content-Length and is downloaded, then read like a local one."""
    kind = (headers.get("Content-Type") or "").lower()
    return kind.startswith("multipart/x-mixed-replace") or (kind.startswith("video/") and not headers.get("Content-Length"))


def _iter_video(path: Path, name: str, options: SourceOptions) -> Iterator[Frame]:
    yield from _read_capture(lambda: _open_capture(str(path), options), name, live=False, options=options)


def _iter_stream(url: str, options: SourceOptions) -> Iterator[Frame]:
    yield from _read_capture(lambda: _open_capture(url, options), url, live=True, options=options)


def _iter_webcam(index: int, options: SourceOptions) -> Iterator[Frame]:
    yield from _read_capture(lambda: _open_capture(index, options), f"webcam{index}", live=True, options=options)


def _open_capture(target: str | int, options: SourceOptions) -> Any:
    """cv2.VideoCapture with open/read timeouts (honoured by the FFmpeg backend: files and URLs)."""
    import cv2

    if isinstance(target, int):
        return cv2.VideoCapture(target)
    ms = int(options.timeout * 1000)
    return cv2.VideoCapture(target, cv2.CAP_FFMPEG,
                            [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])


class _End:
    """The reader's last queue item: ``message`` is None at a normal end, else why a live source ended."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message


def _read_capture(open_capture: Callable[[], Any], name: str, live: bool, options: SourceOptions) -> Iterator[Frame]:
    """THE frame reader: a daemon thread decodes ahead into a bounded queue; this generator yields.

    A reader that sends nothing for longer than its own worst case (every open and read timing
    out) is abandoned as stalled, so no OpenCV call can hang the caller.
    """
    frames: queue.Queue[Any] = queue.Queue(maxsize=options.queue_size)
    stop = threading.Event()
    thread = threading.Thread(target=_reader, args=(open_capture, name, live, options, frames, stop), daemon=True,
                              name=f"detectkit-reader-{name}")
    thread.start()
    patience = 2 * options.timeout * (options.retries + 1) + options.retries * _RECONNECT_DELAY + 1.0
    try:
        while True:
            try:
                item = frames.get(timeout=patience)
            except queue.Empty:
                log.warning(f"{name}: no frame for {patience:.0f} s; ending the source with what was read")
                return
            if isinstance(item, _End):
                if item.message:
                    log.warning(item.message)
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _reader(open_capture: Callable[[], Any], name: str, live: bool, options: SourceOptions,
            frames: queue.Queue[Any], stop: threading.Event) -> None:
    import cv2

    cap = None
    index = kept = failures = 0
    fps = 25.0
    try:
        while not stop.is_set():
            if cap is None:
                cap = open_capture()
                if not cap.isOpened():
                    cap.release()
                    cap = None
                    if not live:
                        raise ValueError(f"cannot open video {name} (OpenCV could not decode it)")
                    failures += 1
                    if failures > options.retries and index == 0:  # never opened: nothing to end, an error
                        raise ValueError(f"cannot open {name} (tried {failures} times, {options.timeout:g} s each)")
                    if failures > options.retries:
                        _put(frames, _End(_lost_message(name, kept, options.retries)), live, stop)
                        return
                    stop.wait(_RECONNECT_DELAY)
                    continue
                fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
                if fps > 1000:  # some MJPEG servers report nonsense
                    fps = 25.0
            ok, frame = cap.read()
            if not ok or frame is None:
                if not live:
                    break
                cap.release()
                cap = None
                failures += 1
                if failures > options.retries:
                    _put(frames, _End(_lost_message(name, kept, options.retries)), live, stop)
                    return
                stop.wait(_RECONNECT_DELAY)
                continue
            failures = 0
            if index % options.vid_stride == 0:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                _put(frames, Frame(rgb, f"{name}#{index}", fps / options.vid_stride), live, stop)
                kept += 1
            index += 1
        if not live and index == 0:
            raise ValueError(f"video {name} has no readable frames")
        _put(frames, _End(), live, stop)
    except BaseException as e:  # handed to the consumer, raised there
        _put(frames, e, False, stop)
    finally:
        if cap is not None:
            cap.release()


def _put(frames: queue.Queue[Any], item: Any, drop_oldest: bool, stop: threading.Event) -> None:
    """Queue ``item``; a live frame replaces the oldest queued one when full, anything else waits."""
    while not stop.is_set():
        try:
            frames.put(item, timeout=0.1)
            return
        except queue.Full:
            if drop_oldest and isinstance(item, Frame):
                try:
                    frames.get_nowait()
                except queue.Empty:
                    pass


def _lost_message(name: str, kept: int, retries: int) -> str:
    return (f"{name} stopped sending frames; {retries} reconnect attempt{'s' if retries != 1 else ''} failed: "
            f"ended after {kept} frame{'s' if kept != 1 else ''}")


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
