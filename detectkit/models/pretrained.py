"""Published checkpoints: where they come from, where they are cached, and fetching them.

Cache folder: ``$DETECTKIT_WEIGHTS`` if set, else ``$DETECTKIT_HOME/weights``, else
``~/.cache/detectkit/weights``. ``create_model(name, pretrained=True)`` and ``detectkit weights
download NAME`` fetch a missing file from its home (``$DETECTKIT_WEIGHTS_URL`` replaces the
folder part of every URL: a mirror, or a local server in tests), check its sha256 and log its
licence; offline, the error says which file to put where.

Homes (checked 2026-12): super-gradients' own ``pretrained_models.py`` moved the YOLO-NAS files
from ``sghub.deci.ai`` (gone) to ``sg-hub-nv.s3.amazonaws.com`` (Deci-AI/super-gradients PR
#2053, "redirect model weight links", by a maintainer; issue #2064 confirms downloads from it).
Deci publishes no digests; the sha256 pinned below are the ones another project pins for the
same files (LibreYOLO's ``_DECI_CHECKPOINT_SHA256``; the ``s`` digest also matches a Git-LFS copy
of the file). The YOLO-World v2 files are Ultralytics' GitHub release assets; Ultralytics
publishes no digests, so the digest of the first download (or of a file the user put in the
cache) is recorded beside it (``<file>.sha256``) and every later use is checked against it.

**Licences.** The ``yolo_nas_{s,m,l}_coco.pth`` checkpoints are Deci.AI's, under their own
YOLO-NAS license (``LICENSE.YOLONAS.md`` in super-gradients), not Apache-2.0: among other terms,
no commercial or production use without Deci's written consent. The YOLO-World v2 checkpoints
(``yolov8{s,m,l,x}-worldv2.pt``) are Ultralytics' under AGPL-3.0. detectkit ships neither.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from detectkit.errors import UserError

__all__ = ["COCO_CLASSES", "PRETRAINED", "PretrainedWeights", "WeightsUnavailable", "weights_dir",
           "resolve_pretrained", "pretrained_class_names", "download", "fetch", "source_url", "file_sha256",
           "URL_ENV"]

log = logging.getLogger(__name__)

#: replaces the folder part of every published URL (a mirror; a local server in tests)
URL_ENV = "DETECTKIT_WEIGHTS_URL"


class WeightsUnavailable(UserError, OSError):
    """The weights cannot be had here (offline, host gone, bad digest): says which file goes where."""


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
    """One published checkpoint. ``sha256`` is None where no digest is known (then the first
    download's digest is recorded beside the file and checked from then on)."""

    file_name: str
    url: str
    num_classes: int
    license: str
    sha256: str | None = None
    class_names: tuple[str, ...] = ()


# URLs as in super-gradients' pretrained_models.py after the 2024-09 move from sghub.deci.ai
# to sg-hub-nv.s3.amazonaws.com (PR #2053, commit e0ccacf, "redirect model weight links").
_YOLO_NAS_SHA256 = {
    "s": "c1b1d9148ab8ae5d5984699547e850955ff9efccaf568c67b3d605acb4bfe1cb",
    "m": "b194fc7fa196f76161c6356558bedf04fb99a62325a74a36a4bec3ca8ba48250",
    "l": "91a06beaa1ce1a651d6691e3198061da996eafc8890503238dedacbd4c392a32",
}
PRETRAINED: dict[str, dict[str, PretrainedWeights]] = {
    f"yolo_nas_{v}": {
        "coco": PretrainedWeights(
            file_name=f"yolo_nas_{v}_coco.pth",
            url=f"https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_{v}_coco.pth",
            num_classes=80,
            license=YOLO_NAS_LICENSE,
            sha256=_YOLO_NAS_SHA256[v],
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
_CHUNK = 1 << 20


def weights_dir() -> Path:
    """The weight cache folder: ``$DETECTKIT_WEIGHTS``, else ``$DETECTKIT_HOME/weights``, else
    ``~/.cache/detectkit/weights``."""
    env = os.environ.get("DETECTKIT_WEIGHTS")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("DETECTKIT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "detectkit") / "weights"


def _is_url(text: str) -> bool:
    return "://" in text and urllib.parse.urlparse(text).scheme.lower() in _URL_SCHEMES


def source_url(entry: PretrainedWeights, base_url: str | None = None) -> str:
    """Where ``entry`` is fetched from: its published URL, or ``base_url`` (else ``$DETECTKIT_WEIGHTS_URL``)
    followed by its file name."""
    base = base_url or os.environ.get(URL_ENV)
    return f"{base.rstrip('/')}/{entry.file_name}" if base else entry.url


def pretrained_class_names(model_name: str, pretrained: str | bool) -> list[str] | None:
    """Class names the published weights ``pretrained`` predict, or None for paths/URLs/unknown tags."""
    tags = PRETRAINED.get(model_name, {})
    tag = next(iter(tags), None) if pretrained is True else pretrained
    entry = tags.get(tag) if isinstance(tag, str) else None
    return list(entry.class_names) if entry is not None and entry.class_names else None


def _entry(model_name: str, tag: str | bool | None) -> tuple[str, PretrainedWeights]:
    tags = PRETRAINED.get(model_name, {})
    if not tags:
        known = ", ".join(sorted(PRETRAINED))
        raise UserError(f"no published weights are known for {model_name!r} (models with weights: {known})")
    tag = next(iter(tags)) if tag in (None, True) else tag
    if tag not in tags:
        raise UserError(f"{model_name!r} has no published weights {tag!r} (known: {', '.join(tags)})")
    return str(tag), tags[tag]


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _expected_digest(entry: PretrainedWeights, path: Path) -> str | None:
    """The pinned digest, else the one recorded at the first download (None: never seen)."""
    if entry.sha256:
        return entry.sha256.lower()
    side = _sidecar(path)
    return side.read_text().split()[0].lower() if side.is_file() else None


def _check_cached(model_name: str, entry: PretrainedWeights, path: Path) -> Path:
    """A cached file is used only if its digest is the expected one (a truncated copy, or another
    file under that name, would otherwise load as garbage or fail deep inside the loader)."""
    expected, got = _expected_digest(entry, path), file_sha256(path)
    if expected is None:  # put there by the user: from now on it is held to this digest
        _sidecar(path).write_text(f"{got}  {entry.file_name}\n")
        log.info("%s: no published sha256; recorded %s in %s", path, got, _sidecar(path))
    elif got != expected:
        raise WeightsUnavailable(
            f"{path}: sha256 {got} is not the published {model_name} weights' {expected}; delete it and "
            f"run `detectkit weights download {model_name}` (or put the file from {entry.url} there)")
    return path


def fetch(model_name: str, tag: str | bool | None = None, base_url: str | None = None,
          progress: bool = True, force: bool = False) -> Path:
    """The published weights ``model_name``/``tag`` in the cache, downloaded and sha256-checked if missing.

    The licence is logged when the file is fetched. ``force`` downloads again over a cached copy.
    """
    tag, entry = _entry(model_name, tag)
    dest = weights_dir() / entry.file_name
    if dest.is_file() and not force:
        return _check_cached(model_name, entry, dest)
    url = source_url(entry, base_url)
    log.warning("%s/%s: %s", model_name, tag, entry.license)
    try:
        digest = _download(url, dest, sha256=entry.sha256, progress=progress)
    except ValueError as e:  # digest mismatch: nothing was written
        raise WeightsUnavailable(str(e)) from None
    except OSError as e:
        raise WeightsUnavailable(
            f"cannot fetch the {model_name} weights: {e}. Offline or behind a proxy? Download "
            f"{entry.url} elsewhere and put it at {dest} (the cache folder: $DETECTKIT_WEIGHTS, else "
            f"$DETECTKIT_HOME/weights), or set {URL_ENV} to a mirror") from None
    if entry.sha256 is None:
        _sidecar(dest).write_text(f"{digest}  {entry.file_name}\n")
        log.info("%s: no published sha256; recorded %s", dest, digest)
    return dest


def resolve_pretrained(model_name: str, pretrained: str | os.PathLike | bool, download: bool = False) -> Path:
    """A local checkpoint file for ``pretrained``: a tag (``"coco"``; ``True`` = the first tag), a path, or a URL.

    Tags are looked up in the cache and fetched (:func:`fetch`) only with ``download=True``;
    URLs are always downloaded into the cache (once, keyed by file name).
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
        if dest.is_file() or download:
            return fetch(model_name, pretrained)
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


class _Progress:
    """A byte bar on a terminal; in a log (not a terminal), a plain line every 10%."""

    def __init__(self, name: str, total: int | None, enabled: bool) -> None:
        self.name, self.total, self.done, self.next_pct = name, total, 0, 10
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and self.total and 100 * self.done >= self.next_pct * self.total:
            pct = 100 * self.done // self.total
            log.info("%s: %d%% (%.1f of %.1f MB)", self.name, pct, self.done / 1e6, self.total / 1e6)
            self.next_pct = pct // 10 * 10 + 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _download(url: str, dest: Path, sha256: str | None = None, progress: bool = True) -> str:
    """Stream ``url`` into a temporary file beside ``dest``, hashing as it goes; rename it over
    ``dest`` only when complete and (with ``sha256``) matching. Returns the digest."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    size = response.headers.get("Content-Length")
                    if progress and not sys.stderr.isatty():
                        log.info("downloading %s -> %s", url, dest)
                    bar = _Progress(dest.name, int(size) if size else None, progress)
                    try:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                    finally:
                        bar.close()
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise OSError(f"cannot download {url} to {dest}: {reason}") from e
        got = digest.hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise ValueError(f"sha256 mismatch for {url}: got {got}, expected {sha256.lower()} "
                             f"(nothing written to {dest})")
        os.replace(tmp, dest)
        return got
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` (http(s) or file://) to ``dest`` atomically, optionally checking its sha256.

    A failed or mismatching download leaves ``dest`` as it was (no partial file); errors name
    the URL. Progress: a bar on a terminal, plain lines in a log.
    """
    dest = Path(dest).expanduser()
    _download(url, dest, sha256=sha256, progress=progress)
    return dest


# resolve_pretrained's ``download`` flag shadows the function name inside it.
_download_file = download
