"""Published checkpoints: where they are cached, where they come from, and fetching them.

Cache folder: the ``DETECTKIT_WEIGHTS`` environment variable if set, else
``~/.cache/detectkit/weights``. Nothing is downloaded unless asked (``download=True`` or an
explicit URL), so offline machines get an error that says which file to put where.

**YOLO-NAS weights license.** The ``yolo_nas_{s,m,l}_coco.pth`` checkpoints are published by
Deci.AI under their own YOLO-NAS license (``LICENSE.YOLONAS.md`` in super-gradients), not under
Apache-2.0: among other terms, no commercial or production use without Deci's written consent.
detectkit does not ship them; downloading and using them is between you and Deci.
The YOLO-World v2 checkpoints (``yolov8{s,m,l,x}-worldv2.pt``) come from Ultralytics under
AGPL-3.0.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from torch.hub import download_url_to_file

__all__ = ["COCO_CLASSES", "PRETRAINED", "PretrainedWeights", "weights_dir", "resolve_pretrained",
           "pretrained_class_names", "download"]

#: the 80 COCO detection classes in contiguous-label order (label i = i-th name), as the published
#: COCO checkpoints predict them
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

YOLO_NAS_LICENSE = (
    "YOLO-NAS pretrained weights are licensed by Deci.AI under the YOLO-NAS license "
    "(https://github.com/Deci-AI/super-gradients/blob/master/LICENSE.YOLONAS.md), "
    "which forbids commercial/production use without Deci's consent"
)

ULTRALYTICS_LICENSE = (
    "YOLO-World checkpoints from Ultralytics are distributed under AGPL-3.0 "
    "(https://github.com/ultralytics/ultralytics/blob/main/LICENSE)"
)


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint. ``sha256`` is None where no official digest was published."""

    file_name: str
    url: str
    num_classes: int
    license: str
    sha256: str | None = None
    class_names: tuple[str, ...] = ()


# URLs as in super-gradients' pretrained_models.py after the 2024-09 move from sghub.deci.ai
# to sg-hub-nv.s3.amazonaws.com (commit e0ccacf, "redirect model weight links").
PRETRAINED: dict[str, dict[str, PretrainedWeights]] = {
    f"yolo_nas_{v}": {
        "coco": PretrainedWeights(
            file_name=f"yolo_nas_{v}_coco.pth",
            url=f"https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_{v}_coco.pth",
            num_classes=80,
            license=YOLO_NAS_LICENSE,
            class_names=COCO_CLASSES,
        )
    }
    for v in ("s", "m", "l")
}
# YOLO-World v2 as published by Ultralytics (converted from the official YOLO-World release); the
# files carry a COCO offline vocabulary. URLs from the Ultralytics YOLO-World docs table.
PRETRAINED.update({
    f"yolo_world_v2_{v}": {
        "coco": PretrainedWeights(
            file_name=f"yolov8{v}-worldv2.pt",
            url=f"https://github.com/ultralytics/assets/releases/download/v8.1.0/yolov8{v}-worldv2.pt",
            num_classes=80,
            license=ULTRALYTICS_LICENSE,
            class_names=COCO_CLASSES,
        )
    }
    for v in ("s", "m", "l", "x")
})

_URL_SCHEMES = ("http", "https", "file")


def weights_dir() -> Path:
    """The weight cache folder (``$DETECTKIT_WEIGHTS`` or ``~/.cache/detectkit/weights``)."""
    env = os.environ.get("DETECTKIT_WEIGHTS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "detectkit" / "weights"


def _is_url(text: str) -> bool:
    return "://" in text and urllib.parse.urlparse(text).scheme.lower() in _URL_SCHEMES


def pretrained_class_names(model_name: str, pretrained: str | bool) -> list[str] | None:
    """Class names the published weights ``pretrained`` predict, or None for paths/URLs/unknown tags."""
    tags = PRETRAINED.get(model_name, {})
    tag = next(iter(tags), None) if pretrained is True else pretrained
    entry = tags.get(tag) if isinstance(tag, str) else None
    return list(entry.class_names) if entry is not None and entry.class_names else None


def resolve_pretrained(model_name: str, pretrained: str | os.PathLike | bool, download: bool = False) -> Path:
    """A local checkpoint file for ``pretrained``: a tag (``"coco"``; ``True`` = the first tag), a path, or a URL.

    Tags are looked up in the cache and fetched only with ``download=True``; URLs are always
    downloaded into the cache (once, keyed by file name).
    """
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if pretrained is True:  # the model's default published weights
        tags = list(PRETRAINED.get(model_name, {}))
        if not tags:
            raise ValueError(f"no published pretrained weights are known for {model_name!r}")
        pretrained = tags[0]
    if not isinstance(pretrained, str) or not pretrained:
        raise TypeError(f"pretrained must be a tag, a path or a URL, got {pretrained!r}")
    if _is_url(pretrained):
        name = Path(urllib.parse.unquote(urllib.parse.urlparse(pretrained).path)).name
        if not name:
            raise ValueError(f"cannot name a cache file after URL {pretrained!r} (it has no file name)")
        dest = weights_dir() / name
        return dest if dest.is_file() else _download_file(pretrained, dest)
    tags = PRETRAINED.get(model_name, {})
    if pretrained in tags:
        entry = tags[pretrained]
        dest = weights_dir() / entry.file_name
        if dest.is_file():
            return dest
        if download:
            return _download_file(entry.url, dest, sha256=entry.sha256)
        raise FileNotFoundError(
            f"pretrained weights {model_name!r}/{pretrained!r} are not in the cache: put {entry.file_name} at\n"
            f"  {dest}\n"
            f"(download it from {entry.url}), set DETECTKIT_WEIGHTS to the folder that holds it, "
            f"or pass download=True when online. Note: {entry.license}."
        )
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    known = ", ".join(sorted(tags)) or "none"
    raise FileNotFoundError(
        f"pretrained={pretrained!r} is neither an existing file, a URL, nor a known tag for {model_name!r} "
        f"(known tags: {known})"
    )


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` (http(s) or file://) to ``dest`` atomically, optionally checking its sha256.

    torch.hub's ``download_url_to_file`` does the work (urllib, tqdm bar, temporary file in the
    destination folder renamed on success, hash checked before the rename, temporary file
    removed on any failure); this adds the full-digest check and errors that name the URL.
    """
    dest = Path(dest).expanduser()
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(dest), hash_prefix=sha256.lower() if sha256 else None, progress=progress)
    except RuntimeError as e:
        if "invalid hash value" in str(e):
            raise ValueError(f"sha256 mismatch for {url} (nothing written to {dest}): {e}") from e
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise OSError(f"cannot download {url} to {dest}: {e}") from e
    return dest


# resolve_pretrained's ``download`` flag shadows the function name inside it.
_download_file = download
