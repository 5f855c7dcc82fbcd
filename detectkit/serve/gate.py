"""The HTTP side of ``detectkit serve``: request parsing and validation before anything is queued.

Why an ASGI middleware in front of LitServe's endpoint: LitServe 0.2.19 hands the endpoint's
body to the inference worker as ``await request.json()`` (or a multipart form, whose
``UploadFile`` cannot be pickled to the worker), and with ``max_batch_size > 1`` it decodes the
requests of a batch together, so one bad request raised there would fail the whole batch with
the same error. So this gate, running in the API-server processes, does per request:

* size limit (413, before the body is read when Content-Length says so), empty body (400),
  content type (415): raw image bytes (``image/*``, ``application/octet-stream``, parameters
  in the query string), multipart upload (field ``image`` or ``file``), or JSON with a base64
  ``image``;
* parameter validation (422): ``conf``/``iou`` in [0, 1], ``max_det`` >= 1, ``classes`` a
  non-empty list of names, ``annotate`` a boolean; unknown fields are named;
* image decoding and letterboxing (``preprocess.py``; corrupt or truncated image 400,
  decompression bomb 413), off the event loop;
* and forwards ONE canonical JSON body to LitServe: the letterboxed pixels, the letterbox
  geometry and the parameters.

It also answers ``/live``, ``/ready`` (503 while draining or while an inference worker is down)
and ``/metrics``, keeps the count of in-flight requests the graceful shutdown waits for, and
writes one JSON access-log line per request. Two faults are bounded here: a client that stalls
mid-body gets 408 after ``body_timeout`` s (it held the SIGTERM drain for its whole length), and
when the supervisor (``supervisor.py``) reports a dead inference worker, every request in flight
gets 503 at once (LitServe would leave it waiting for an answer that never comes); with no worker
up, new predictions are 503 too. The gate cannot tell which worker took a request, so with
several workers a death fails the other workers' in-flight requests as well: a retry is cheap,
a hang is not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import multiprocessing as mp
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from detectkit.limits import LimitError, loads_json
from detectkit.serve.preprocess import DEFAULT_MAX_PIXELS, RequestError, prepare

log = logging.getLogger("detectkit.serve")

PARAMS = ("conf", "iou", "max_det", "classes", "annotate")
MAX_CLASSES = 1024
MAX_CLASS_NAME = 200
IMAGE_FIELDS = ("image", "file")


@dataclass
class SharedState:
    """State the main process shares with the forked API-server processes (created before fork)."""

    in_flight: Any = field(default_factory=lambda: mp.Value("i", 0, lock=True))
    draining: Any = field(default_factory=mp.Event)
    # written by the worker supervisor (supervisor.py) in the main process
    worker_deaths: Any = field(default_factory=lambda: mp.Value("i", 0, lock=True))  # ever: a change fails in-flight
    workers_down: Any = field(default_factory=lambda: mp.Value("i", 0, lock=True))  # dead or still setting up again
    workers_total: int = 1

    def in_flight_count(self) -> int:
        return int(self.in_flight.value)


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


def parse_params(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate optional request parameters; strings (query/form) are converted."""
    unknown = sorted(set(raw) - set(PARAMS))
    if unknown:
        raise RequestError(422, f"unknown {source} field(s) {unknown}; allowed: image, {', '.join(PARAMS)}")
    out: dict[str, Any] = {}
    for name in ("conf", "iou"):
        if raw.get(name) is not None:
            value = _number(raw[name], name, float)
            if not 0.0 <= value <= 1.0:
                raise RequestError(422, f"{name} must be in [0, 1], got {value}")
            out[name] = value
    if raw.get("max_det") is not None:
        value = _number(raw["max_det"], "max_det", int)
        if not 1 <= value <= 100_000:
            raise RequestError(422, f"max_det must be in [1, 100000], got {value}")
        out["max_det"] = value
    if raw.get("annotate") is not None:
        out["annotate"] = _boolean(raw["annotate"])
    if "classes" in raw and raw["classes"] is not None:
        out["classes"] = _classes(raw["classes"])
    return out


def _number(value: Any, name: str, kind: type) -> Any:
    if isinstance(value, bool):
        raise RequestError(422, f"{name} must be a number, got {value!r}")
    try:
        if kind is int:
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        result = float(value)
    except (TypeError, ValueError):
        raise RequestError(422, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if result != result:  # NaN
        raise RequestError(422, f"{name} must be a number, got NaN")
    return result


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise RequestError(422, f"annotate must be true or false, got {value!r}")


def _classes(value: Any) -> list[str]:
    if isinstance(value, str):  # form/query: a JSON list or comma-separated names
        text = value.strip()
        if text.startswith("["):
            try:
                value = loads_json(text, "classes")
            except json.JSONDecodeError as e:
                raise RequestError(422, f"classes is not a valid JSON list: {e}") from None
            except LimitError as e:
                raise RequestError(422, str(e)) from None
        else:
            value = [n.strip() for n in text.split(",")] if text else []
    if not isinstance(value, list):
        raise RequestError(422, f"classes must be a list of class names, got {type(value).__name__}")
    if not value:
        raise RequestError(422, "classes is an empty vocabulary: give at least one class name")
    if len(value) > MAX_CLASSES:
        raise RequestError(422, f"classes has {len(value)} names; at most {MAX_CLASSES} per request")
    if not all(isinstance(n, str) and n.strip() and len(n) <= MAX_CLASS_NAME for n in value):
        raise RequestError(422, f"classes must be non-empty strings of at most {MAX_CLASS_NAME} characters")
    names = [n.strip() for n in value]
    if len(set(names)) != len(names):
        raise RequestError(422, "classes has duplicate names")
    return names


def _b64(text: Any, name: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise RequestError(422, f"JSON field {name!r} must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:  # data URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"JSON field {name!r} is not valid base64") from None


async def canonical_request(content_type: str, body: bytes, query: str) -> tuple[bytes, dict[str, Any]]:
    """One upload (raw / multipart / JSON) -> the image bytes and the validated parameters."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    # the query string's parameters hold for every body type (``?conf=0.1`` with a multipart upload
    # was silently ignored); a field in the body wins over the same name in the query
    query_fields = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    if ctype == "application/json":
        try:
            data = loads_json(body, "request body")  # depth-guarded: 100k nested brackets are a 400, not a 500
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"body is not valid JSON: {e}") from None
        except LimitError as e:
            raise RequestError(400, str(e)) from None
        if not isinstance(data, dict):
            raise RequestError(422, "JSON body must be an object with an 'image' field (base64)")
        if "image" not in data:
            raise RequestError(422, "JSON body has no 'image' field (base64-encoded image bytes)")
        image = _b64(data.pop("image"), "image")
        params = parse_params({**query_fields, **data}, "JSON")
    elif ctype == "multipart/form-data":
        image, fields = await _multipart(content_type, body)
        params = parse_params({**query_fields, **fields}, "form")
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        image = body
        params = parse_params(query_fields, "query")
    else:
        raise RequestError(
            415,
            f"unsupported content type {ctype or '(none)'!r}: send image bytes (image/jpeg, image/png, "
            "application/octet-stream), multipart/form-data with an 'image' file, or application/json "
            "with a base64 'image'",
        )
    if not image:
        raise RequestError(400, "the image is empty (0 bytes)")
    return image, params


async def _multipart(content_type: str, body: bytes) -> tuple[bytes, dict[str, Any]]:
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
    try:
        form = await Request(scope, receive).form(max_files=1, max_fields=len(PARAMS) + 1)
    except Exception as e:  # python-multipart raises several types for malformed bodies
        raise RequestError(400, f"malformed multipart body: {e}") from None
    try:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
        if len(files) != 1 or files[0][0] not in IMAGE_FIELDS:
            raise RequestError(422, f"multipart body must carry one file field named 'image' (or 'file'), got "
                                    f"{[k for k, _ in files] or 'none'}")
        return await files[0][1].read(), fields
    finally:
        await form.close()


class RequestGate:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and break streaming/disconnects)."""

    def __init__(self, app: Any, *, api_path: str, max_body_bytes: int, state: SharedState,
                 letterbox: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS, metrics: Any = None,
                 body_timeout: float = 10.0, watch_interval: float = 0.05) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.watch_interval = watch_interval
        self.letterbox = letterbox
        self.max_pixels = max_pixels
        self.api_path = api_path
        self.max_body_bytes = max_body_bytes
        self.state = state
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path == "/live" and method == "GET":
            await _reply(send, 200, json.dumps({"status": "alive"}).encode())
        elif path == "/ready" and method == "GET":
            if self.state.draining.is_set():
                await _reply(send, 503, json.dumps({"status": "draining"}).encode())
            elif self.state.workers_down.value > 0:
                await _reply(send, 503, json.dumps({"status": "inference worker restarting"}).encode())
            else:  # ready = LitServe's own check that every inference worker finished setup
                await self.app({**scope, "path": "/health", "raw_path": b"/health"}, receive, send)
        elif path == "/metrics" and method == "GET" and self.metrics is not None:
            body, ctype = self.metrics.render()
            body += (b"# HELP detectkit_requests_in_flight Prediction requests accepted and not yet answered\n"
                     b"# TYPE detectkit_requests_in_flight gauge\n"
                     b"detectkit_requests_in_flight %d\n" % self.state.in_flight_count())
            await _reply(send, 200, body, ctype)
        elif path == self.api_path and method == "POST":
            await self._predict(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _predict(self, scope: dict, receive: Any, send: Any) -> None:
        start = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["started"] = True
            await send(message)

        if self.state.draining.is_set():
            await _reply(send_status, 503, error_body(503, "server is shutting down; retry on another replica"),
                         extra=[(b"retry-after", b"1"), (b"connection", b"close")])
            self._record(start, status["code"], 0)
            return
        if self.state.workers_down.value >= self.state.workers_total:
            await _reply(send_status, 503, error_body(503, "no inference worker is up (one is restarting); retry "
                                                           "shortly"), extra=[(b"retry-after", b"2")])
            self._record(start, status["code"], 0)
            return
        deaths = self.state.worker_deaths.value  # a change while this request is in flight: 503, not a hang
        with self.state.in_flight.get_lock():
            self.state.in_flight.value += 1
        size = 0
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            body = await self._read_body(headers, receive)
            size = len(body)
            if not body:
                raise RequestError(400, "empty request body: send an image")
            image, params = await canonical_request(headers.get("content-type", ""), body,
                                                    scope.get("query_string", b"").decode("latin-1"))
            # decode + letterbox off the event loop, in parallel with the inference worker
            prepared = await asyncio.to_thread(prepare, image, self.letterbox, self.max_pixels,
                                               bool(params.get("annotate")))
            payload = {**params, **prepared, "received": time.time()}
            new_body = json.dumps(payload).encode()
        except RequestError as e:
            await _reply(send_status, e.status, error_body(e.status, e.message))
        else:
            new_headers = [(k, v) for k, v in scope.get("headers", [])
                           if k.lower() not in (b"content-type", b"content-length")]
            new_headers += [(b"content-type", b"application/json"), (b"content-length", str(len(new_body)).encode())]
            sent = False

            async def replay() -> dict:
                nonlocal sent
                if sent:
                    return await receive()  # disconnect notifications
                sent = True
                return {"type": "http.request", "body": new_body, "more_body": False}

            await self._forward({**scope, "headers": new_headers, "query_string": b""}, replay, send_status,
                                status, deaths)
        finally:
            with self.state.in_flight.get_lock():
                self.state.in_flight.value -= 1
            self._record(start, status["code"], size)

    async def _forward(self, scope: dict, receive: Any, send: Any, status: dict, deaths: int) -> None:
        """LitServe's endpoint, abandoned with a 503 if an inference worker dies before it answers."""
        task = asyncio.ensure_future(self.app(scope, receive, send))
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.watch_interval)
            if done:
                return task.result()
            if self.state.worker_deaths.value != deaths and "started" not in status:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await _reply(send, 503, error_body(503, "the inference worker died while this request was in "
                                                        "flight; it is being restarted: retry"),
                             extra=[(b"retry-after", b"2")])
                return

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes:
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {limit} "
                                    "(detectkit serve --max-body-mb)")
        chunks, total = [], 0
        deadline = time.monotonic() + self.body_timeout  # one deadline for the whole body: no trickling
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestError(408, f"request body not received within {self.body_timeout:g} s "
                                        "(detectkit serve --body-timeout)") from None
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes "
                                        "(detectkit serve --max-body-mb)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _record(self, start: float, status: int, size: int) -> None:
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.request(status, seconds)
        log.info("request", extra={"fields": {"event": "request", "path": self.api_path, "status": status,
                                              "ms": round(seconds * 1000, 2), "bytes": size}})


async def _reply(send: Any, status: int, body: bytes, ctype: str = "application/json",
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
