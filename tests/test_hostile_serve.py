"""Hostile requests to ``detectkit serve`` (issue 25): a JSON body nested 100k levels deep, and a
``classes`` value nested past the limit, are a 4xx naming the depth limit (it was a 500 from a
RecursionError in the request gate), answered at once; the next good request still succeeds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("litserve")

from detectkit import create_model  # noqa: E402
from detectkit.checkpoint import save_weights  # noqa: E402
from detectkit.models.base import InferenceDefaults  # noqa: E402
from detectkit.serve.gate import canonical_request  # noqa: E402
from detectkit.serve.launch import LocalServer, free_port  # noqa: E402
from detectkit.serve.preprocess import RequestError  # noqa: E402

DEEP = "[" * 100_000 + "]" * 100_000


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_gate_refuses_deep_json_with_a_4xx():
    image = base64.b64encode(_png()).decode()
    for body, status in ((DEEP.encode(), 400), (json.dumps({"image": image, "x": json.loads("[" * 150 + "]" * 150)}).encode(), 400)):
        with pytest.raises(RequestError) as err:
            asyncio.run(canonical_request("application/json", body, ""))
        assert err.value.status == status and "nesting depth" in str(err.value) and "max_json_depth" in str(err.value)
    with pytest.raises(RequestError) as err:
        asyncio.run(canonical_request("image/png", _png(), "classes=" + "[" * 5000 + "]" * 5000))
    assert err.value.status == 422 and "classes" in str(err.value)
    image_bytes, params = asyncio.run(canonical_request("application/json", json.dumps({"image": image}).encode(), ""))
    assert image_bytes == _png() and params == {}


def test_the_server_answers_deep_json_with_400_and_keeps_serving(tmp_path):
    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=3).eval()
    model.inference = InferenceDefaults(image_size=(96, 96), longest=None)
    checkpoint = save_weights(model, tmp_path / "nas.ckpt")
    server = LocalServer(checkpoint, "--threads", "1", port=free_port(), log_path=tmp_path / "server.log",
                         env={"OMP_NUM_THREADS": "1"}, start_timeout=180)
    try:
        # bounded by the client's timeout: a slow parse raises ReadTimeout
        r = httpx.post(server.url + "/predict", content=DEEP, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 400 and "nesting depth" in r.json()["error"], r.text
        ok = httpx.post(server.url + "/predict", content=_png(), headers={"content-type": "image/png"}, timeout=60)
        assert ok.status_code == 200, ok.text
    finally:
        server.stop(graceful=False)
