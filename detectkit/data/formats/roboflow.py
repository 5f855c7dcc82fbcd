"""Roboflow exports: download once through the ``roboflow`` package, cache, or fall back to a
local export folder when offline (with a message saying why)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from detectkit.data.records import DatasetError

__all__ = ["fetch_roboflow", "roboflow_cache_dir", "ROBOFLOW_FORMATS"]

log = logging.getLogger("detectkit.data")

# our format name -> the roboflow package's export name
ROBOFLOW_FORMATS = {
    "coco": "coco",
    "yolo": "yolov8",
    "yolov8": "yolov8",
    "yolov5": "yolov5",
    "voc": "voc",
    "createml": "createml",
}
_COMPLETE = ".detectkit-complete"


def roboflow_cache_dir() -> Path:
    root = os.environ.get("DETECTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "detectkit")
    return Path(root) / "roboflow"


def _download(
    workspace: str, project: str, version: int, api_key: str, rf_format: str, location: Path
) -> None:
    try:
        from roboflow import Roboflow
    except ImportError as e:
        raise RuntimeError(
            "the 'roboflow' package is not installed (pip install 'detectkit[roboflow]')"
        ) from e
    rf = Roboflow(api_key=api_key)
    rf.workspace(workspace).project(project).version(int(version)).download(
        rf_format, location=str(location), overwrite=True
    )


def fetch_roboflow(
    workspace: str,
    project: str,
    version: int,
    api_key: str | None = None,
    format: str = "coco",
    cache_dir: str | Path | None = None,
    local_path: str | Path | None = None,
) -> Path:
    """The export folder for ``workspace/project/version`` in ``format``.

    Order: the cache (``cache_dir/workspace/project/version/format``), then a download (needs
    an API key: ``api_key`` or ``ROBOFLOW_API_KEY``, and the network), then ``local_path``.
    """
    if format not in ROBOFLOW_FORMATS:
        raise ValueError(f"format must be one of {sorted(ROBOFLOW_FORMATS)}, got {format!r}")
    cache = Path(cache_dir) if cache_dir is not None else roboflow_cache_dir()
    target = cache / workspace / project / str(version) / format
    if (target / _COMPLETE).is_file():
        log.info(
            "Roboflow %s/%s v%s (%s): using the cache at %s", workspace, project, version, format, target
        )
        return target
    key = api_key or os.environ.get("ROBOFLOW_API_KEY")
    if not key:
        reason = "no API key (pass api_key or set ROBOFLOW_API_KEY)"
    else:
        tmp = target.with_name(f".{format}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _download(workspace, project, version, key, ROBOFLOW_FORMATS[format], tmp)
            (tmp / _COMPLETE).write_text(f"{workspace}/{project}/{version}/{format}\n")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
            return target
        except Exception as e:  # network, auth, quota: all end in the local fallback below
            shutil.rmtree(tmp, ignore_errors=True)
            reason = f"download failed ({e.__class__.__name__}: {e})"
    if local_path is not None and Path(local_path).exists():
        log.warning(
            "Roboflow %s/%s v%s: %s; using the local export at %s",
            workspace,
            project,
            version,
            reason,
            local_path,
        )
        return Path(local_path)
    hint = f"local_path {local_path} does not exist" if local_path is not None else "no local_path given"
    raise DatasetError(
        f"Roboflow {workspace}/{project} v{version} ({format}): {reason}, nothing cached at {target}, and {hint}. "
        "Connect and pass an API key, or point local_path at an exported folder."
    )
