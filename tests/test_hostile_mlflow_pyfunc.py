"""Hostile inputs to the MLflow pyfunc model (issue 25): it read any local path or folder and fetched
any URL (server-side request forgery from a model endpoint), with no cap on the download and
errors that echoed internal paths. Now: bytes, arrays and base64 by default; paths inside the
deployer's folders and URLs of the deployer's hosts only (redirects checked), downloads capped in
bytes and seconds, and messages that name the image index, not the server's paths.
"""

from __future__ import annotations

import http.server
import io
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from timeout_helpers import time_limit

pytest.importorskip("mlflow")

from detectkit.integrations.mlflow_pyfunc import ENV_DIRS, InputPolicy  # noqa: E402


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/img.png":
            body = _png()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big":  # no content-length: the cap must count the bytes
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            time.sleep(3)
        elif self.path == "/redirect":  # to a host nobody allowed (the same server by IP)
            self.send_response(302)
            self.send_header("location", f"http://127.0.0.1:{self.server.server_port}/img.png")
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_port}"
    server.shutdown()


def test_paths_and_urls_are_refused_by_default_without_echoing_them(tmp_path, monkeypatch, http_server):
    monkeypatch.delenv(ENV_DIRS, raising=False)
    (tmp_path / "secret.png").write_bytes(_png())
    policy = InputPolicy.from_config(None, environ={})
    from detectkit.integrations.mlflow_pyfunc import _images

    for value in (str(tmp_path / "secret.png"), "/etc/passwd", "file:///etc/passwd", str(tmp_path)):
        with pytest.raises(ValueError, match="image 0: not base64 image data, and this model takes no file paths") as e:
            _images([value], policy)
        assert str(tmp_path) not in str(e.value) and "/etc" not in str(e.value)
    with pytest.raises(ValueError, match="image 0: this model fetches no URL from that host") as e:
        _images([http_server + "/img.png"], policy)
    assert "localhost" not in str(e.value)
    assert _images([_png()], policy)[0].shape == (48, 64, 3)  # bytes still work


def test_allowed_folders_only_and_no_escape(tmp_path):
    from detectkit.integrations.mlflow_pyfunc import _images

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(_png())
    (outside / "b.png").write_bytes(_png())
    (allowed / "link.png").symlink_to(outside / "b.png")
    policy = InputPolicy.from_config({"allowed_dirs": [str(allowed)]}, environ={})
    assert _images([str(allowed / "a.png")], policy) == [os.path.realpath(allowed / "a.png")]
    for escape in (str(allowed / ".." / "outside" / "b.png"), str(allowed / "link.png"), str(outside / "b.png"),
                   str(tmp_path / "allowedX" / "c.png")):
        with pytest.raises(ValueError, match="image 0: the path is outside the folders this model may read") as e:
            _images([escape], policy)
        assert str(tmp_path) not in str(e.value)
    with pytest.raises(ValueError, match="image 0: not a regular file"):
        _images([str(allowed)], policy)  # a folder would expand to every file in it
    small = InputPolicy(allowed_dirs=(os.path.realpath(allowed),), max_bytes=100)
    with pytest.raises(ValueError, match=r"image 0: file is \d+ bytes; the limit is 100"):
        _images([str(allowed / "a.png")], small)
    # the environment opens folders too (an operator, without re-saving the model)
    env = InputPolicy.from_config(None, environ={ENV_DIRS: str(allowed)})
    assert env.allowed_dirs == (os.path.realpath(allowed),)


def test_allowed_hosts_capped_downloads_and_checked_redirects(http_server):
    from detectkit.integrations.mlflow_pyfunc import _images

    policy = InputPolicy(allowed_hosts=("localhost",), max_bytes=1_000_000, timeout=1.0)
    image = _images([http_server + "/img.png"], policy)[0]
    assert image.shape == (48, 64, 3)
    with pytest.raises(ValueError, match="image 0: download exceeds the limit of 1000000 bytes"):
        _images([http_server + "/big"], policy)
    with pytest.raises(ValueError, match="image 0: download failed"), time_limit(2.5, "a download with timeout 1"):
        _images([http_server + "/slow"], policy)
    with pytest.raises(ValueError, match="image 0: this model fetches no URL from that host"):
        _images([http_server + "/redirect"], policy)  # localhost is allowed, 127.0.0.1 is not


def test_saved_model_takes_its_allow_list_from_model_config(tmp_path, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    from detectkit import create_model
    from detectkit.checkpoint import save_weights
    from detectkit.integrations.mlflow_pyfunc import save_pyfunc_model
    from detectkit.models.base import InferenceDefaults

    monkeypatch.delenv(ENV_DIRS, raising=False)
    torch.manual_seed(0)
    model = create_model("yolo_nas_s", num_classes=3).eval()
    model.inference = InferenceDefaults(image_size=(64, 64), longest=None)
    weights = save_weights(model, tmp_path / "w.ckpt")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png())
    (tmp_path / "b.png").write_bytes(_png())
    save_pyfunc_model(weights, tmp_path / "model", allowed_dirs=[images])
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    out = pyfunc.predict(pd.DataFrame({"image": [str(images / "a.png")]}))
    assert list(out.columns)[:2] == ["image", "source"]
    with pytest.raises(Exception, match="image 0: the path is outside the folders this model may read"):
        pyfunc.predict(pd.DataFrame({"image": [str(tmp_path / "b.png")]}))
