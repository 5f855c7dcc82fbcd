"""The LitServe API of ``detectkit serve``: one worker's decode -> batch -> predict -> encode.

Requests arrive validated, decoded and letterboxed by the HTTP gate (``gate.py``,
``preprocess.py``) as ``{"pixels", "shape", "letterbox", conf?, iou?, max_det?, classes?,
annotate?, image? (original bytes, for drawing), received}``. Per request, in the worker:

* ``decode_request`` unpacks that. Whatever can still fail per request (a vocabulary this
  model cannot take) becomes a :class:`Rejected` item instead of an exception, because LitServe
  fails every request of a batch when ``decode_request`` raises.
* ``predict`` runs the one batch step of ``model.predict``
  (:func:`detectkit.predict.step.detect_batch`), so the server returns the same detections: each
  request's settings are ``resolve_settings(model, conf=, iou=, max_det=)`` (``model.inference``
  with the request's overrides; the gate letterboxed with the same function's letterbox), the
  whole batch goes through one backend call, and each image through the one post-processing with
  its own :class:`PostprocessConfig` and vocabulary, and the letterbox inverse.
* YOLO-World: a request may bring its own ``classes``. Their text embeddings come from an LRU
  cache over the text encoder; a batch mixing vocabularies runs once through the masked path
  ``model(x, text=[B,K,512], text_mask=[B,K])`` (requests without classes use the model's own
  vocabulary as their row).
* ``encode_response`` builds COCO-style JSON through the one writer's ``coco_rows`` (``bbox`` =
  [x, y, w, h] in original pixels, ``category_id`` by the one rule: ``model.category_ids[label]``
  when set, else ``label + 1``; a request's own vocabulary has no dataset ids: ``label + 1``)
  and, if asked, the annotated image from the one drawer as base64 JPEG. An empty response
  carries ``best_score`` and a one-line ``hint`` (the threshold, the best score the model gave,
  the ``conf`` to send instead). Rejected items become a
  4xx ``JSONResponse`` for that request only.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
import numpy as np
import torch
from starlette.responses import JSONResponse

from detectkit.data.letterbox import LetterboxInfo
from detectkit.predict.pipeline import PredictSettings, resolve_settings
from detectkit.predict.step import detect_batch, no_detections_hint, to_input
from detectkit.predict.writers import coco_rows
from detectkit.serve.backends import (
    OnnxRuntimeBackend,
    OpenVINOBackend,
    TensorRTBackend,
    TorchBackend,
)
from detectkit.serve.metrics import BATCH_SIZE, INFERENCE_SECONDS, QUEUE_SECONDS, configure_json_logging
from detectkit.serve.preprocess import unpack

log = logging.getLogger("detectkit.serve")

@dataclass
class Rejected:
    """A request that failed in the worker (bad image, bad vocabulary): answered alone with ``status``."""

    status: int
    message: str


@dataclass
class Item:
    pixels: np.ndarray  # HWC uint8 RGB, letterboxed by the gate
    info: LetterboxInfo
    original: bytes | None  # the upload, kept when annotate=true
    settings: PredictSettings  # letterbox + post-processing: model.inference with the request's overrides
    classes: list[str] | None
    annotate: bool
    received: float | None


@dataclass
class Result:
    item: Item
    boxes: np.ndarray  # [N,4] xyxy original pixels
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    category_ids: list[int] | None
    best_score: float = 0.0  # before the threshold: the hint of an empty response
    extra: dict[str, Any] = field(default_factory=dict)


def load_detector(checkpoint: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """The one checkpoint loader, ``detectkit.load`` (eval mode, ``model.inference`` from the record)."""
    from detectkit.checkpoint import load

    return load(checkpoint, device=device)


class DetectionAPI(ls.LitAPI):
    """Serve one detectkit checkpoint. Everything heavy happens in :meth:`setup`, in the worker."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        backend: str = "torch",
        max_batch: int = 16,
        batch_timeout_ms: float = 10.0,
        model_file: str | os.PathLike | None = None,
        text_encoder: str | None = None,
        vocabulary_cache: int = 256,
        threads: int | None = None,
        log_level: str = "info",
        drained_marker: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout_ms / 1000.0, api_path="/predict")
        self.checkpoint = str(checkpoint)
        self.backend_name = backend
        self.model_file = None if model_file is None else str(model_file)
        self.text_encoder_spec = text_encoder
        self.vocabulary_cache = vocabulary_cache
        self.threads = threads
        self.log_level = log_level
        self.drained_marker = None if drained_marker is None else str(drained_marker)

    # ------------------------------------------------------------------ setup
    def setup(self, device: str) -> None:
        if multiprocessing.current_process().name == "inference-worker":  # LitServe's worker process
            # Ctrl-C, systemd or `timeout` signal the whole process group: this worker must not die
            # while accepted requests wait for it. The main process drains, writes the marker, and
            # LitServe then stops us with SIGTERM, which is obeyed from then on.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, self._on_sigterm)
        configure_json_logging(self.log_level)
        if self.threads:
            torch.set_num_threads(self.threads)
        self.torch_device = torch.device(device)
        model = load_detector(self.checkpoint, device="cpu").eval()
        self.model = model
        self.inference = model.inference
        self.class_names = list(model.class_names)
        self.category_ids = getattr(model, "category_ids", None)
        self.stride = max(getattr(model, "strides", (32,)))
        self.input_size = resolve_settings(model).size
        if self.backend_name == "torch":
            self.runner = TorchBackend(model, self.torch_device)
        elif self.backend_name == "onnxruntime":
            self.runner = OnnxRuntimeBackend(self.model_file, self.torch_device, self.threads)
        elif self.backend_name == "openvino":
            self.runner = OpenVINOBackend(self.model_file, self.torch_device, self.threads)
        elif self.backend_name == "tensorrt":
            self.runner = TensorRTBackend(self.model_file, self.torch_device)
        else:
            raise ValueError(f"unknown backend {self.backend_name!r}")
        self.encoder = None
        self.default_text: torch.Tensor | None = None
        if self.runner.supports_text:
            from detectkit.models.yolo_world.text import TextEmbeddingCache

            self.text_cache = TextEmbeddingCache(max_entries=self.vocabulary_cache)
            self.default_text = model.txt_feats.detach().float().cpu()
            if self.text_encoder_spec:
                from detectkit.modules.world import resolve_text_encoder

                self.encoder = resolve_text_encoder(self.text_encoder_spec)
        log.info("worker ready", extra={"fields": {
            "event": "worker_ready", "checkpoint": self.checkpoint, "backend": self.backend_name,
            "device": str(self.torch_device), "image_size": list(self.inference.image_size),
            "classes": len(self.class_names), "open_vocabulary": self.encoder is not None,
            "max_batch": self.max_batch_size, "batch_timeout_ms": self.batch_timeout * 1000}})

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.drained_marker is None or os.path.exists(self.drained_marker):
            os._exit(0)
        log.info("SIGTERM deferred until the server has drained", extra={"fields": {"event": "sigterm_deferred"}})

    # ------------------------------------------------------------------ decode
    def decode_request(self, request):  # no annotation: LitServe then passes the parsed JSON body
        try:
            pixels, info = unpack(request)
            if pixels.shape[:2] != tuple(self.input_size):
                raise _BadImage(500, f"gate letterboxed to {pixels.shape[:2]}, the model takes {self.input_size}")
            original = base64.b64decode(request["image"]) if "image" in request else None
            settings = resolve_settings(self.model, conf=request.get("conf"), iou=request.get("iou"),
                                        max_det=request.get("max_det"))
            classes = request.get("classes")
            if classes is not None:
                if not self.runner.supports_text:
                    return Rejected(400, "this model serves a fixed vocabulary "
                                         f"({self.backend_name} backend or not a YOLO-World model); "
                                         "omit 'classes' or serve a YOLO-World checkpoint with --backend torch")
                if self.encoder is None:
                    return Rejected(400, "per-request classes need a text encoder: start the server with "
                                         "--text-encoder (CLIP folder or embeddings file)")
            return Item(pixels, info, original, settings, classes, bool(request.get("annotate", False)),
                        request.get("received"))
        except _BadImage as e:
            return Rejected(e.status, str(e))

    # ------------------------------------------------------------------ batch / predict
    def batch(self, inputs: list[Item | Rejected]) -> list[Item | Rejected]:
        return list(inputs)  # per-request settings and vocabularies: predict handles the list itself

    def unbatch(self, output: list[Any]) -> list[Any]:
        return list(output)

    def predict(self, items: list[Item | Rejected] | Item | Rejected) -> list[Result | Rejected] | Result | Rejected:
        if not isinstance(items, list):  # --max-batch 1: LitServe's unbatched loop passes one request
            return self.predict([items])[0]
        start = time.time()
        out: list[Any] = list(items)
        for i, item in enumerate(out):
            if not isinstance(item, Item):
                continue
            if item.received is not None:
                self._metric(QUEUE_SECONDS, start - item.received)
            if item.classes is not None:
                try:  # encode (or find in the LRU) now, so one unknown name fails only its own request
                    self.text_cache.get(self.encoder, item.classes)
                except (KeyError, ValueError) as e:
                    out[i] = Rejected(422, f"cannot encode classes: {e}")
        good = [i for i, item in enumerate(out) if isinstance(item, Item)]
        if good:
            text, mask, names = self._vocabularies([out[i] for i in good])
            self._run(out, good, text, mask, names)
            self._metric(BATCH_SIZE, len(good))
            self._metric(INFERENCE_SECONDS, time.time() - start)
        return out

    def _metric(self, key: str, value: float) -> None:
        if self._logger_queue is not None:  # None when the API is driven outside a LitServer
            self.log(key, value)

    def _vocabularies(self, items: list[Item]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[list[str]]]:
        """Per-image text embeddings: None (all default), ``[K,D]`` (one shared), or ``[B,K,D]`` + mask."""
        names = [it.classes if it.classes is not None else self.class_names for it in items]
        if all(it.classes is None for it in items):
            return None, None, names
        embeddings = [self.text_cache.get(self.encoder, it.classes) if it.classes is not None else self.default_text
                      for it in items]
        if len({tuple(n) for n in names}) == 1:
            return embeddings[0], None, names
        k = max(e.shape[0] for e in embeddings)
        text = torch.zeros(len(items), k, embeddings[0].shape[1])
        mask = torch.zeros(len(items), k, dtype=torch.bool)
        for b, e in enumerate(embeddings):
            text[b, : e.shape[0]] = e
            mask[b, : e.shape[0]] = True
        return text, mask, names

    def _run(self, out: list[Any], idx: list[int], text: torch.Tensor | None, mask: torch.Tensor | None,
             names: list[list[str]]) -> None:
        """The one batch step (:func:`detectkit.predict.step.detect_batch`) with each request's own
        post-processing and vocabulary, over this worker's backend."""
        items: list[Item] = [out[i] for i in idx]
        if text is not None and text.ndim == 2:
            text = text.unsqueeze(0).expand(len(idx), -1, -1)
            mask = None
        dets = detect_batch(functools.partial(self.runner, text=text, text_mask=mask),
                            to_input([it.pixels for it in items]), [it.info for it in items],
                            [it.settings.post for it in items], [len(vocab) for vocab in names])
        for i, item, det, vocab in zip(idx, items, dets, names):
            custom = item.classes is not None
            out[i] = Result(item=item, boxes=det.boxes.numpy(), scores=det.scores.numpy(), labels=det.labels.numpy(),
                            class_names=list(vocab), category_ids=None if custom else self.category_ids,
                            best_score=det.best_score)

    # ------------------------------------------------------------------ encode
    def encode_response(self, output: Result | Rejected) -> Any:
        if isinstance(output, Rejected):
            return JSONResponse({"error": output.message, "status": output.status}, status_code=output.status)
        h, w = output.item.info.orig_size
        # the one COCO row writer (and its category-id rule), plus the names a client wants
        rows = coco_rows(0, output.boxes, output.scores, output.labels, output.category_ids)
        detections = []
        for row, label in zip(rows, output.labels.tolist()):
            del row["image_id"]
            name = output.class_names[label] if 0 <= label < len(output.class_names) else str(label)
            detections.append({**row, "label": label, "class_name": name})
        response: dict[str, Any] = {"width": int(w), "height": int(h), "detections": detections}
        if not detections:  # say why, and what to send instead
            response["best_score"] = round(output.best_score, 4)
            response["hint"] = no_detections_hint(output.item.settings.post.conf, output.best_score, 0,
                                                  option='"conf": {} in the request')
        if output.item.annotate:
            response["annotated_image"] = self._annotated_jpeg(output)
        return response

    def _annotated_jpeg(self, output: Result) -> str:
        from PIL import Image

        from detectkit.data.images import decode_image
        from detectkit.predict.draw import draw_boxes  # the one drawer

        image = decode_image(output.item.original, "upload")  # decoded by the gate once already
        drawn = draw_boxes(image, output.boxes, output.labels, output.scores, output.class_names)
        buf = io.BytesIO()
        Image.fromarray(drawn).save(buf, format="JPEG", quality=90)
        return base64.b64encode(buf.getvalue()).decode("ascii")


class _BadImage(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


__all__ = ["DetectionAPI", "Item", "Rejected", "Result", "load_detector"]
