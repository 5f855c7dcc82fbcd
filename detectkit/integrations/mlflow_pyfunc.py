"""An MLflow ``pyfunc`` model over a detectkit weights file: ``mlflow.pyfunc.load_model(uri).predict(images)``.

``TrackRun`` saves one of these as the run's ``model`` artifact (and registers it when asked), so a
registered detectkit model loads anywhere MLflow models load (``mlflow models serve`` included)
with detectkit installed. The weights file inside (``artifacts/weights.pt``, or a full ``.ckpt``)
is read by :func:`detectkit.load`; prediction is ``model.predict`` with the checkpoint's own
defaults (image size, letterbox, post-processing), so the pyfunc gives what ``detectkit predict``
gives.

Input (``predict(model_input)``), one image per element/row:

* a ``pandas.DataFrame`` with an ``image`` column (or a single column) of file paths, URLs,
  base64-encoded image files (str) or raw encoded bytes: what a REST request to
  ``mlflow models serve`` carries;
* a list of those, or of HWC RGB uint8 ``numpy`` arrays / PIL images; a single one of any of
  those; a 4-D ``[N,H,W,3]`` uint8 array.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

__all__ = ["DetectkitPythonModel", "save_pyfunc_model", "pip_requirements", "OUTPUT_COLUMNS"]

OUTPUT_COLUMNS = ("image", "source", "box", "score", "class_id", "class_name")
_URL_PREFIXES = ("http://", "https://", "file://")


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

    def load_context(self, context: Any) -> None:
        import detectkit

        self.model = detectkit.load(context.artifacts["weights"])

    # ``pd.DataFrame`` is the serving format; lists, arrays and single images work as well from
    # Python. MLflow infers no schema from this hint (any other hint turns on its validation,
    # which would reject those inputs; none at all makes it warn).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = _images(model_input)
        rows: list[dict[str, Any]] = []
        if images:
            for i, pred in enumerate(self.model.predict(images)):
                names = pred.names
                for box, score, label, name in zip(pred.boxes.tolist(), pred.scores.tolist(), pred.labels.tolist(), names):
                    rows.append({"image": i, "source": pred.source, "box": [float(v) for v in box], "score": float(score),
                                 "class_id": int(label), "class_name": str(name)})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _images(model_input: Any) -> list[Any]:
    """The pyfunc inputs -> what ``model.predict`` takes (paths, URLs, arrays, PIL images)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            column = model_input["image"]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"a DataFrame input needs an 'image' column (got columns {list(model_input.columns)})")
        return [_image(v, i) for i, v in enumerate(column.tolist())]
    if isinstance(model_input, pd.Series):
        return [_image(v, i) for i, v in enumerate(model_input.tolist())]
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return [_image(a, i) for i, a in enumerate(model_input)]
    if isinstance(model_input, Sequence) and not isinstance(model_input, str | bytes):
        return [_image(v, i) for i, v in enumerate(model_input)]
    return [_image(model_input, 0)]


def _image(value: Any, index: int) -> Any:
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3 or value.dtype != np.uint8:
            raise ValueError(f"image {index}: arrays must be HWC RGB uint8, got shape {value.shape} {value.dtype}")
        return value
    if isinstance(value, bytes | bytearray):
        return _open(bytes(value), index)
    if isinstance(value, str):
        if value.startswith(_URL_PREFIXES) or os.path.exists(value):
            return value
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"image {index}: neither an existing file, a URL nor base64 image data: {value[:80]!r}"
            ) from None
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


def save_pyfunc_model(weights: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the MLflow model folder (``MLmodel``, ``artifacts/<weights file>``, requirements) at ``path``."""
    mlflow.pyfunc.save_model(
        path=str(path),
        # a "model from code" (a file naming the class), not a pickled object: loading runs no pickle
        python_model=str(Path(__file__).with_name("mlflow_model_code.py")),
        artifacts={"weights": str(weights)},
        pip_requirements=pip_requirements(),
        signature=_signature(),
        input_example=_input_example(),
    )
    return Path(path)
