"""Image decoding and letterboxing for the server, done in the HTTP processes.

Why here and not in the inference worker: the worker is one process per device and runs its
batch serially, so JPEG decoding and resizing there would add to every batch (and batching
could only amortise the model call). In the API-server processes (``--api-servers``) they run
in parallel with inference, off the event loop (``asyncio.to_thread``; Pillow and OpenCV release
the GIL), and a bad image is answered at once, without touching a batch. The worker receives the
letterboxed pixels and the :class:`LetterboxInfo` to map boxes back.

Both steps are the project's own: the one decoder (``detectkit.data.images.decode_image``: EXIF
orientation, palette/16-bit/alpha, Pillow's bomb guard) and the one letterbox with the settings
``detectkit.predict.pipeline.resolve_settings`` derives from ``model.inference``.
"""

from __future__ import annotations

import base64
import io
from dataclasses import asdict
from typing import Any

import numpy as np

from detectkit.data.letterbox import LetterboxInfo, letterbox
from detectkit.limits import Limits

#: decoded-pixel limit per image (a 20 MB PNG can hold a 50000x50000 image: a decompression bomb);
#: ``detectkit serve`` uses ``detectkit.limits.current().max_pixels`` unless --max-pixels says otherwise
DEFAULT_MAX_PIXELS = Limits.max_pixels


class RequestError(Exception):
    """A client error: an HTTP status and one message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Uploaded bytes -> HWC uint8 RGB, refusing bombs from the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    from detectkit.data.images import ImageReadError, decode_image

    try:
        with Image.open(io.BytesIO(data)) as header:
            w, h = header.size
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image too large to decode safely: {e}") from None
    except UnidentifiedImageError:  # Pillow's text names our in-memory buffer object: no help to a client
        raise RequestError(400, "not a readable image (not a format Pillow recognises: JPEG, PNG, BMP, WebP, ...)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"not a readable image ({e.__class__.__name__}: {e})") from None
    if w * h > max_pixels:
        raise RequestError(413, f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} "
                                "(a decompression bomb guard; detectkit serve --max-pixels)")
    try:
        return decode_image(data, "upload")
    except ImageReadError as e:
        raise RequestError(413 if e.kind == "image_too_large" else 400, f"corrupt or truncated image: {e.reason}") from None


def prepare(data: bytes, letterbox_settings: dict[str, Any], max_pixels: int, keep_original: bool) -> dict[str, Any]:
    """Decode + letterbox one upload into the JSON-able part of the worker's payload."""
    image = decode_upload(data, max_pixels)
    padded, info = letterbox(image, **letterbox_settings)
    out = {"pixels": base64.b64encode(padded.tobytes()).decode("ascii"), "shape": list(padded.shape),
           "letterbox": asdict(info)}
    if keep_original:  # drawn on by the worker (annotate=true)
        out["image"] = base64.b64encode(data).decode("ascii")
    return out


def unpack(payload: dict[str, Any]) -> tuple[np.ndarray, LetterboxInfo]:
    """The worker's side of :func:`prepare`."""
    shape = tuple(int(s) for s in payload["shape"])
    pixels = np.frombuffer(base64.b64decode(payload["pixels"]), dtype=np.uint8).reshape(shape)
    lb = payload["letterbox"]
    info = LetterboxInfo(scale=float(lb["scale"]), pad_left=int(lb["pad_left"]), pad_top=int(lb["pad_top"]),
                         orig_size=tuple(lb["orig_size"]), input_size=tuple(lb["input_size"]),
                         resized_size=tuple(lb["resized_size"]))
    return pixels, info
