"""Robust image reading: every image becomes 8-bit RGB in its displayed orientation.

Annotation tools draw boxes on the image as displayed, i.e. after the EXIF orientation is
applied, so both the pixel data and the size used for normalised coordinates go through
``ImageOps.exif_transpose``.

Pixel limit: a PNG header can claim 30000x30000 pixels in a few bytes (a decompression bomb: 2.7 GB
once decoded). detectkit keeps Pillow's guard as it is and turns it into a named error: an image
over ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels by default, about 13,000 x 13,000) is
refused as unreadable (a named error, or a counted skip with ``skip_bad_images``); one over
``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485) is read and reported as a ``large_image`` warning by
:func:`check_images`. We do not raise Pillow's limit: it is a process-wide setting the user's own
code relies on too, and the model sees 640 px inputs, so an image that large should be tiled
rather than decoded whole. A user with real images that large sets ``PIL.Image.MAX_IMAGE_PIXELS``
(read at every call) before training.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detectkit.data.records import DetectionSplit, Problem

__all__ = [
    "ImageReadError",
    "read_image",
    "read_image_reduced",
    "reduced_size",
    "decode_image",
    "to_rgb",
    "image_size",
    "check_images",
    "IMAGE_EXTENSIONS",
    "pixel_limit",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# EXIF orientations 5..8 swap width and height when displayed.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


class ImageReadError(OSError):
    """An image that is missing or cannot be decoded; the message names the file. ``kind`` is the
    problem kind :func:`check_images` reports (``missing_image``, ``broken_symlink``,
    ``image_too_large``, ``unreadable_image``, ``not_a_file``: a FIFO, device or directory)."""

    def __init__(self, path: str | Path, reason: str, kind: str = "unreadable_image"):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{path}: {reason}")


def pixel_limit() -> int | None:
    """Largest image (width x height) that is decoded: Pillow's decompression-bomb error
    threshold, read now so a user who raises ``PIL.Image.MAX_IMAGE_PIXELS`` is obeyed."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def _bomb_error(path: Path, e: Exception) -> ImageReadError:
    return ImageReadError(
        path,
        f"refused as a possible decompression bomb ({e}); detectkit decodes images up to "
        f"{pixel_limit():,} pixels (2 x PIL.Image.MAX_IMAGE_PIXELS): tile the image, or raise "
        "PIL.Image.MAX_IMAGE_PIXELS if it is real",
        "image_too_large",
    )


def _missing(path: Path) -> ImageReadError:
    """Not a regular file: say whether it is absent, a symlink loop or a dangling symlink."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            target = os.readlink(path)
            what = "a symlink loop" if e.errno == errno.ELOOP else f"a dangling symlink ({e.strerror})"
            return ImageReadError(path, f"{what} (links to {target!r})", "broken_symlink")
    if path.exists():
        return ImageReadError(path, f"{_file_type(path)}, not an image file: refused (only regular files are read)",
                              "not_a_file")
    return ImageReadError(path, "image file not found", "missing_image")


_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _file_type(path: Path) -> str:
    """What a path that is no regular file is (a FIFO blocks a reader forever, /dev/zero never ends)."""
    mode = os.stat(path).st_mode
    what = next((name for test, name in _FILE_TYPES if test(mode)), "a special file")
    if path.is_symlink():
        return f"a symlink to {os.readlink(path)!r}, {what}"
    return what


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # broken EXIF blocks must not make a good image unreadable
        return 1


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed, from the header only (no decoding)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if _orientation(img) in _SWAPPING_ORIENTATIONS:
                w, h = h, w
    except Image.DecompressionBombError as e:
        raise _bomb_error(path, e) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(path, f"not a readable image ({e.__class__.__name__}: {e})") from e
    if w < 1 or h < 1:
        raise ImageReadError(path, f"image has size {w}x{h}")
    return int(w), int(h)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        hi = float(np.nanmax(arr)) if arr.size else 1.0
        scale = 255.0 if hi <= 1.0 else 255.0 / hi
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    # integer images: 16-bit data keeps its absolute scale (65535 -> 255)
    hi = int(arr.max()) if arr.size else 0
    if hi <= 255:
        return arr.astype(np.uint8)
    if hi <= 65535:
        return (arr.astype(np.uint32) // 257).astype(np.uint8)
    return (arr.astype(np.float64) * (255.0 / hi)).astype(np.uint8)


def to_rgb(img: Image.Image, name: str | Path = "<image>") -> np.ndarray:
    """The one decoder's conversion: EXIF orientation applied, then HWC uint8 RGB (grayscale,
    palette, RGBA composited on the padding grey, CMYK, 16-bit and float images converted).
    Used for files, downloaded bytes and PIL images handed to ``predict`` alike."""
    try:
        if _orientation(img) != 1:  # exif_transpose copies even when there is nothing to turn
            img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = _to_uint8(np.asarray(img))
            return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            # composite on the padding grey so transparent areas look like background
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (114, 114, 114, 255))
            img = Image.alpha_composite(bg, rgba)
        arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert copies even RGB
    except Image.DecompressionBombError as e:
        raise _bomb_error(Path(str(name)), e) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(name, f"cannot decode image ({e.__class__.__name__}: {e})") from e
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(name, f"decoded to an unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes (a download, an upload) -> HWC uint8 RGB; errors name ``name``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return to_rgb(img, name)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise _bomb_error(Path(name), e) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(name, f"not a readable image ({e.__class__.__name__}: {e})") from e


def read_image(path: str | Path) -> np.ndarray:
    """HWC uint8 RGB array of the displayed image (see :func:`to_rgb`): THE image file reader of
    detectkit (datasets, predict, calibration, drawing). Raises :class:`ImageReadError` naming the file."""
    return read_image_reduced(path, None)[0]


def read_image_reduced(path: str | Path, longest: int | None) -> tuple[np.ndarray, int]:
    """:func:`read_image` for a caller that shrinks the image to ``longest`` on its longest side
    anyway (training): a JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale in
    libjpeg's DCT (several times faster; the largest k that keeps the longest side >= ``longest``).
    Returns ``(image, k)``: the image is ``ceil(width / k) x ceil(height / k)`` and an original
    pixel edge x lands on x / k."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with Image.open(path) as img:  # header only: format, mode, size, EXIF, pixel limit
            if img.format == "JPEG" and img.mode == "RGB" and _orientation(img) == 1:
                k = 1
                while longest and k < 8 and max(img.size) >= 2 * k * longest:
                    k *= 2
                arr = _read_jpeg_rgb(path, img.size, k)
                if arr is not None:
                    return arr, k
            return to_rgb(img, path), 1
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise _bomb_error(path, e) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(path, f"cannot decode image ({e.__class__.__name__}: {e})") from e


def reduced_size(width: int, height: int, k: int) -> tuple[int, int]:
    """(width, height) of an image decoded at 1/``k`` scale, as libjpeg rounds it (up)."""
    return -(-width // k), -(-height // k)


_REDUCED = {1: 0, 2: 16, 4: 32, 8: 48}  # OpenCV's IMREAD_REDUCED_* bits, without the colour bit


def _read_jpeg_rgb(path: Path, size: tuple[int, int], k: int = 1) -> np.ndarray | None:
    """Plain RGB JPEGs (the common case) through OpenCV's libjpeg-turbo straight into RGB: the same
    pixels as Pillow's decode (tested), without Pillow's two intermediate copies (about 1.5-2x faster,
    the training loader's largest per-image cost). ``None`` (caller falls back to Pillow) when OpenCV
    cannot read it or disagrees on the size."""
    import cv2

    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10
    if rgb is None:
        return None
    data = path.read_bytes()
    # OpenCV fills a truncated JPEG with grey and only warns; Pillow raises. A file that does not end
    # in the end-of-image marker goes to Pillow, which names the problem.
    if data.rstrip(b"\0\r\n ")[-2:] != b"\xff\xd9":
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), rgb | _REDUCED[k] | cv2.IMREAD_IGNORE_ORIENTATION)
    expected = reduced_size(size[0], size[1], k)
    if arr is None or arr.ndim != 3 or (arr.shape[1], arr.shape[0]) != expected:
        return None
    return arr


def check_images(split: DetectionSplit, decode: bool = False, progress: bool = False) -> list[Problem]:
    """Find missing/unreadable images and size mismatches (header reads unless ``decode``).

    Returns the problems (also appended to ``split.problems``); ``problem.file`` is the image.
    Severity ``error`` marks an unusable image; ``warning`` (``large_image``) one that is read.
    """
    from tqdm import tqdm

    found = []
    for rec in tqdm(
        split.records, desc=f"checking {split.split} images", unit="img", disable=not progress, leave=False
    ):
        try:
            if decode:
                arr = read_image(rec.path)
                w, h = arr.shape[1], arr.shape[0]
            else:
                w, h = image_size(rec.path)
        except ImageReadError as e:
            found.append(Problem(e.kind, str(rec.path), e.reason, "error"))
            continue
        if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
            found.append(
                Problem(
                    "large_image",
                    str(rec.path),
                    f"{w}x{h} = {w * h:,} pixels is over PIL.Image.MAX_IMAGE_PIXELS "
                    f"({Image.MAX_IMAGE_PIXELS:,}): read, but each read takes {w * h * 3 / 2**20:,.0f} MiB",
                )
            )
        if rec.width and rec.height and (w, h) != (rec.width, rec.height):
            found.append(
                Problem(
                    "size_mismatch",
                    str(rec.path),
                    f"annotations say {rec.width}x{rec.height} but the (EXIF-rotated) image is {w}x{h}",
                    "error",
                )
            )
    split.problems.extend(found)
    return found
