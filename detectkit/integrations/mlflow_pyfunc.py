"""An MLflow ``pyfunc`` model over a detectkit weights file: ``mlflow.pyfunc.load_model(uri).predict(images)``.

``TrackRun`` saves one of these as the run's ``model`` artifact (and registers it when asked), so a
registered detectkit model loads anywhere MLflow models load (``mlflow models serve`` included)
with detectkit installed. The weights file inside (``artifacts/weights.pt``, or a full ``.ckpt``)
is read by :func:`detectkit.load`; prediction is ``model.predict`` with the checkpoint's own
defaults (image size, letterbox, post-processing), so the pyfunc gives what ``detectkit predict``
gives.

Input (``predict(model_input)``), one image per element/row:

* a ``pandas.DataFrame`` with an ``image`` column (or a single column) of base64-encoded image
  files (str) or raw encoded bytes: what a REST request to ``mlflow models serve`` carries;
* a list of those, or of HWC RGB uint8 ``numpy`` arrays / PIL images; a single one of any of
  those; a 4-D ``[N,H,W,3]`` uint8 array;
* file paths and http(s) URLs only where the deployer allows them (:class:`InputPolicy`): a model
  endpoint that opened any path or URL it was sent would read the server's files and make
  requests inside its network for anyone who can call it. Allowed files must resolve (symlinks
  followed) inside an allowed folder; URLs must name an allowed host, redirects included, and
  downloads are capped in bytes and seconds. Error messages name the image index, never the
  server's paths.

Output: a ``pandas.DataFrame`` with one row per detection: ``image`` (0-based index of the
predicted image: the input's index, except that a folder or video given as one input expands to
its images/frames), ``source`` (the file or URL, ``None`` for arrays and bytes), ``box``
([x1, y1, x2, y2] in that image's pixels), ``score``, ``class_id``, ``class_name``.

The model is saved as a "model from code" (:mod:`detectkit.integrations.mlflow_model_code`: no pickled object
in the folder) with explicit ``pip_requirements``, so MLflow never inspects the environment or
the network to infer them.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

__all__ = ["DetectkitPythonModel", "InputPolicy", "save_pyfunc_model", "pip_requirements", "OUTPUT_COLUMNS"]

OUTPUT_COLUMNS = ("image", "source", "box", "score", "class_id", "class_name")
_URL_PREFIXES = ("http://", "https://")
ENV_DIRS = "DETECTKIT_PYFUNC_ALLOWED_DIRS"  # os.pathsep-separated folders
ENV_HOSTS = "DETECTKIT_PYFUNC_ALLOWED_HOSTS"  # comma-separated host names
ENV_MAX_MB = "DETECTKIT_PYFUNC_MAX_DOWNLOAD_MB"
ENV_TIMEOUT = "DETECTKIT_PYFUNC_DOWNLOAD_TIMEOUT"


@dataclass(frozen=True)
class InputPolicy:
    """What the deployer lets a caller name: folders for paths, hosts for URLs (none by default).

    From the model's ``model_config`` (``save_pyfunc_model(..., allowed_dirs=, allowed_hosts=)``)
    plus the environment of the serving process (``DETECTKIT_PYFUNC_ALLOWED_DIRS``, ``..._HOSTS``,
    ``..._MAX_DOWNLOAD_MB``, ``..._DOWNLOAD_TIMEOUT``), so an operator can open it without
    re-saving the model. ``max_bytes`` caps a download and an allowed file alike.
    """

    allowed_dirs: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 20 * 2**20
    timeout: float = 10.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ) -> InputPolicy:
        config = dict(config or {})
        dirs = [*config.get("allowed_dirs", ()), *filter(None, environ.get(ENV_DIRS, "").split(os.pathsep))]
        hosts = [*config.get("allowed_hosts", ()), *filter(None, environ.get(ENV_HOSTS, "").split(","))]
        max_mb = float(environ.get(ENV_MAX_MB) or config.get("max_download_mb", 20))
        timeout = float(environ.get(ENV_TIMEOUT) or config.get("download_timeout", 10.0))
        return cls(tuple(os.path.realpath(d) for d in dirs), tuple(h.strip().lower() for h in hosts if h.strip()),
                   int(max_mb * 2**20), timeout)

    def path(self, value: str, index: int) -> str:
        """An allowed regular file -> its real path (what is read is what was checked)."""
        if not self.allowed_dirs:
            raise ValueError(f"image {index}: not base64 image data, and this model takes no file paths "
                             f"(the deployer can allow folders with {ENV_DIRS})")
        real = os.path.realpath(value.removeprefix("file://"))
        if not any(os.path.commonpath([real, d]) == d for d in self.allowed_dirs):
            raise ValueError(f"image {index}: the path is outside the folders this model may read")
        try:
            st = os.stat(real)
        except OSError:
            raise ValueError(f"image {index}: no such file in the allowed folders") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"image {index}: not a regular file")
        if st.st_size > self.max_bytes:
            raise ValueError(f"image {index}: file is {st.st_size} bytes; the limit is {self.max_bytes} ({ENV_MAX_MB})")
        return real

    def download(self, url: str, index: int) -> bytes:
        """GET an allowed host's URL (each redirect checked too), at most ``max_bytes`` in ``timeout`` s."""
        import urllib.error
        import urllib.request

        self._check_host(url, index)
        policy = self

        class _CheckedRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
                policy._check_host(newurl, index)
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        opener = urllib.request.build_opener(_CheckedRedirect)
        deadline = time.monotonic() + self.timeout
        try:
            with opener.open(url, timeout=self.timeout) as response:
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ValueError(f"image {index}: download is {declared} bytes; the limit is {self.max_bytes}")
                chunks, total = [], 0
                while chunk := response.read(64 * 1024):
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ValueError(f"image {index}: download exceeds the limit of {self.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise ValueError(f"image {index}: download took longer than {self.timeout:g} s")
                    chunks.append(chunk)
                return b"".join(chunks)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "code", None) or type(getattr(e, "reason", e)).__name__
            raise ValueError(f"image {index}: download failed ({reason})") from None

    def _check_host(self, url: str, index: int) -> None:
        parsed = urllib.parse.urlsplit(url)
        host = (parsed.hostname or "").lower()
        if parsed.scheme not in ("http", "https") or host not in self.allowed_hosts:
            raise ValueError(f"image {index}: this model fetches no URL from that host "
                             f"(the deployer can allow hosts with {ENV_HOSTS})")


def pip_requirements() -> list[str]:
    """The packages the model needs, pinned to this environment (no inference, no network)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("detectkit", "torch", "torchvision", "pandas", "pillow"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


class DetectkitPythonModel(mlflow.pyfunc.PythonModel):
    """Loads the ``weights`` artifact with :func:`detectkit.load`; predicts detections per image."""

    policy: InputPolicy | None = None  # None: from the environment alone (a model made outside MLflow)

    def load_context(self, context: Any) -> None:
        import detectkit

        self.model = detectkit.load(context.artifacts["weights"])
        self.policy = InputPolicy.from_config(getattr(context, "model_config", None))

    # ``pd.DataFrame`` is the serving format; lists, arrays and single images work as well from
    # Python. MLflow infers no schema from this hint (any other hint turns on its validation,
    # which would reject those inputs; none at all makes it warn).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = _images(model_input, self.policy or InputPolicy.from_config())
        rows: list[dict[str, Any]] = []
        if images:
            for i, pred in enumerate(self.model.predict(images)):
                names = pred.names
                for box, score, label, name in zip(pred.boxes.tolist(), pred.scores.tolist(), pred.labels.tolist(), names):
                    rows.append({"image": i, "source": pred.source, "box": [float(v) for v in box], "score": float(score),
                                 "class_id": int(label), "class_name": str(name)})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _images(model_input: Any, policy: InputPolicy) -> list[Any]:
    """The pyfunc inputs -> what ``model.predict`` takes (allowed paths, arrays, PIL images)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            column = model_input["image"]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"a DataFrame input needs an 'image' column (got columns {list(model_input.columns)})")
        return [_image(v, i, policy) for i, v in enumerate(column.tolist())]
    if isinstance(model_input, pd.Series):
        return [_image(v, i, policy) for i, v in enumerate(model_input.tolist())]
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return [_image(a, i, policy) for i, a in enumerate(model_input)]
    if isinstance(model_input, Sequence) and not isinstance(model_input, str | bytes):
        return [_image(v, i, policy) for i, v in enumerate(model_input)]
    return [_image(model_input, 0, policy)]


def _image(value: Any, index: int, policy: InputPolicy) -> Any:
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3 or value.dtype != np.uint8:
            raise ValueError(f"image {index}: arrays must be HWC RGB uint8, got shape {value.shape} {value.dtype}")
        return value
    if isinstance(value, bytes | bytearray):
        return _open(bytes(value), index)
    if isinstance(value, str):
        if value.lower().startswith(_URL_PREFIXES):
            return _open(policy.download(value, index), index)
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return policy.path(value, index)  # refused unless the deployer allows its folder
        return _open(raw, index)
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
        return value
    raise TypeError(f"image {index}: unsupported input type {type(value).__name__}")


def _open(raw: bytes, index: int) -> Any:
    """Encoded bytes -> HWC uint8 RGB through the project's one decoder (EXIF, RGB, bomb limit)."""
    from detectkit.data.images import ImageReadError, decode_image

    try:
        return decode_image(raw, f"image {index}")
    except ImageReadError as e:
        raise ValueError(str(e)) from e


def _signature() -> Any:
    """The output columns, documented in the MLmodel file. No input schema: MLflow would then
    enforce one input type, and this model takes several (see the module docstring)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    outputs = Schema([ColSpec("long", "image"), ColSpec("string", "source", required=False), ColSpec(Array("double"), "box"),
                      ColSpec("double", "score"), ColSpec("long", "class_id"), ColSpec("string", "class_name")])
    return ModelSignature(inputs=None, outputs=outputs)


def _input_example() -> pd.DataFrame:
    """One request as ``mlflow models serve`` takes it: a base64 PNG (a 32x32 grey image)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (114, 114, 114)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def save_pyfunc_model(weights: str | os.PathLike, path: str | os.PathLike, *,
                      allowed_dirs: Sequence[str | os.PathLike] = (), allowed_hosts: Sequence[str] = (),
                      max_download_mb: float = 20.0, download_timeout: float = 10.0) -> Path:
    """Write the MLflow model folder (``MLmodel``, ``artifacts/<weights file>``, requirements) at ``path``.

    ``allowed_dirs`` / ``allowed_hosts`` (empty: bytes, arrays and base64 only) go into the model's
    ``model_config``; see :class:`InputPolicy`."""
    config = {"allowed_dirs": [str(d) for d in allowed_dirs], "allowed_hosts": list(allowed_hosts),
              "max_download_mb": max_download_mb, "download_timeout": download_timeout}
    mlflow.pyfunc.save_model(
        model_config=config,
        path=str(path),
        # a "model from code" (a file naming the class), not a pickled object: loading runs no pickle
        python_model=str(Path(__file__).with_name("mlflow_model_code.py")),
        artifacts={"weights": str(weights)},
        pip_requirements=pip_requirements(),
        signature=_signature(),
        input_example=_input_example(),
    )
    return Path(path)
