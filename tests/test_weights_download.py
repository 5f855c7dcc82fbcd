"""Published weights fetched for real over HTTP from a server the test starts on 127.0.0.1:
``create_model(name, pretrained=True)`` and ``detectkit weights list|download`` (cache folder,
sha256, safe loader, licence, offline message). Nothing leaves this machine."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import logging
import threading
from pathlib import Path

import pytest
import torch

import detectkit
from detectkit.cli import main as cli_main
from detectkit.models import pretrained
from detectkit.models.pretrained import PRETRAINED, WeightsUnavailable

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "yolo_nas_s_parity" / "yolo_nas_s_random.pth"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def served(tmp_path):
    """(folder the server serves, its base URL); the server runs for the test only."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/models"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("DETECTKIT_WEIGHTS", raising=False)
    monkeypatch.setenv("DETECTKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "weights"


def _pin(monkeypatch, model: str, digest: str | None) -> None:
    entry = PRETRAINED[model]["coco"]
    monkeypatch.setitem(PRETRAINED, model, {"coco": dataclasses.replace(entry, sha256=digest)})


def test_create_model_pretrained_true_fetches_checks_and_loads(served, home, monkeypatch, caplog):
    if not FIXTURE.is_file():
        pytest.skip(f"shared test data absent: {FIXTURE}")
    folder, url = served
    (folder / "models").mkdir()
    (folder / "models" / "yolo_nas_s_coco.pth").symlink_to(FIXTURE)
    monkeypatch.setenv(pretrained.URL_ENV, url)
    # the pinned digest is the real file's; this random-weight file stands in with its own digest
    _pin(monkeypatch, "yolo_nas_s", hashlib.sha256(FIXTURE.read_bytes()).hexdigest())
    with caplog.at_level(logging.INFO, "detectkit.models.pretrained"):
        model = detectkit.create_model("yolo_nas_s", pretrained=True)
    assert sorted(p.name for p in home.iterdir()) == ["yolo_nas_s_coco.pth"]  # no partial file left
    ref = torch.load(FIXTURE, map_location="cpu", weights_only=True)["net"]
    for key in ("backbone.stem.conv.branch_3x3.conv.weight", "heads.head3.cls_pred.bias"):
        torch.testing.assert_close(model.state_dict()[key], ref[key], rtol=0, atol=0)
    assert model.class_names[0] == "person"
    assert "Deci" in caplog.text  # the licence, when the file is fetched
    assert "100%" in caplog.text and "MB" in caplog.text  # not a terminal: plain progress lines
    (folder / "models" / "yolo_nas_s_coco.pth").unlink()  # the cached copy is used from now on
    detectkit.create_model("yolo_nas_s", pretrained="coco")


def test_a_file_that_is_not_the_published_one_is_refused(served, home, monkeypatch, capsys):
    folder, url = served
    (folder / "models").mkdir()
    (folder / "models" / "yolo_nas_m_coco.pth").write_bytes(b"not the weights" * 1000)
    rc = cli_main(["weights", "download", "yolo_nas_m", "--url", url])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "sha256 mismatch" in err
    assert PRETRAINED["yolo_nas_m"]["coco"].sha256 in err  # the real pin, not a test value
    assert list(home.iterdir()) == []  # neither the file nor a partial one
    # a copy put in the cache by hand is held to the same digest
    (home / "yolo_nas_m_coco.pth").write_bytes(b"truncated")
    with pytest.raises(WeightsUnavailable, match="delete it and run `detectkit weights download yolo_nas_m`"):
        detectkit.create_model("yolo_nas_m", pretrained=True)


def test_offline_says_which_file_to_put_where(home, monkeypatch, capsys):
    monkeypatch.setenv(pretrained.URL_ENV, "http://127.0.0.1:9/models")  # nothing listens there
    with pytest.raises(WeightsUnavailable) as err:
        detectkit.create_model("yolo_world_v2_s", pretrained=True)
    msg = str(err.value)
    assert "Offline" in msg and str(home / "yolov8s-worldv2.pt") in msg
    assert PRETRAINED["yolo_world_v2_s"]["coco"].url in msg  # where to get it by hand
    rc = cli_main(["weights", "download", "yolo_world_v2_s"])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "Offline" in err_lines[-1] and "internal error" not in err_lines[-1]


class _Code:
    def __reduce__(self):
        return (print, ("ran code from a checkpoint",))


def test_weights_cli_lists_downloads_records_digest_and_uses_the_safe_loader(served, home, monkeypatch, capsys):
    folder, url = served
    (folder / "models").mkdir()
    torch.save({"model": {"w": torch.ones(2)}}, folder / "models" / "yolov8s-worldv2.pt")
    assert cli_main(["weights", "list", "--json"]) == 0
    rows = {f"{r['model']}/{r['tag']}": r for r in json.loads(capsys.readouterr().out)}
    assert rows["yolo_world_v2_s/coco"]["cached"] is None and "AGPL" in rows["yolo_world_v2_s/coco"]["license"]
    assert rows["yolo_nas_l/coco"]["sha256"] == PRETRAINED["yolo_nas_l"]["coco"].sha256

    assert cli_main(["weights", "download", "yolo_world_v2_s", "--url", url]) == 0
    out = capsys.readouterr().out
    cached = home / "yolov8s-worldv2.pt"
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    assert f"yolo_world_v2_s: {cached}" in out and f"sha256: {digest}" in out and "licence:" in out and "AGPL" in out
    assert (home / "yolov8s-worldv2.pt.sha256").read_text().split()[0] == digest  # no published digest: recorded
    assert cli_main(["weights", "list"]) == 0
    assert "cached" in capsys.readouterr().out
    cached.write_bytes(cached.read_bytes()[:-10])  # damaged after the download: caught on next use
    with pytest.raises(WeightsUnavailable, match="sha256"):
        pretrained.fetch("yolo_world_v2_s")

    # a file holding pickled code is never run: refused by the safe loader and removed
    torch.save({"model": _Code()}, folder / "models" / "yolov8m-worldv2.pt")
    rc = cli_main(["weights", "download", "yolo_world_v2_m", "--url", url])
    captured = capsys.readouterr()
    assert rc == 1 and "safe loader refuses" in captured.err and "ran code" not in captured.out
    assert not (home / "yolov8m-worldv2.pt").exists() and not (home / "yolov8m-worldv2.pt.sha256").exists()
