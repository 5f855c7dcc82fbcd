"""Weight cache resolution and the atomic, hash-checked download (file:// URLs, no network)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from detectkit.models.pretrained import PRETRAINED, download, resolve_pretrained, weights_dir


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("DETECTKIT_WEIGHTS", str(folder))
    return folder


@pytest.fixture()
def payload(tmp_path) -> tuple[Path, str]:
    src = tmp_path / "served" / "weights.pth"
    src.parent.mkdir()
    src.write_bytes(bytes(range(256)) * 1000)
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def test_cache_folder_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DETECTKIT_WEIGHTS", str(tmp_path / "w"))
    assert weights_dir() == tmp_path / "w"  # the older, more specific variable still wins
    monkeypatch.delenv("DETECTKIT_WEIGHTS")
    assert weights_dir() == tmp_path / "home" / "weights"
    monkeypatch.delenv("DETECTKIT_HOME")
    assert weights_dir() == Path.home() / ".cache" / "detectkit" / "weights"


def test_known_checkpoints_use_super_gradients_urls():
    for v in "sml":
        entry = PRETRAINED[f"yolo_nas_{v}"]["coco"]
        assert entry.file_name == f"yolo_nas_{v}_coco.pth"
        assert entry.url == f"https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_{v}_coco.pth"
        assert entry.num_classes == 80 and "Deci" in entry.license


def test_missing_tag_error_names_full_path_url_and_license(cache):
    with pytest.raises(FileNotFoundError) as err:
        resolve_pretrained("yolo_nas_s", "coco")
    msg = str(err.value)
    assert str(cache / "yolo_nas_s_coco.pth") in msg
    assert "https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_s_coco.pth" in msg
    assert "download=True" in msg and "DETECTKIT_WEIGHTS" in msg and "license" in msg.lower()
    assert not cache.exists() or not any(cache.iterdir())  # nothing was fetched


def test_tag_found_in_cache_is_held_to_its_digest(cache):
    cache.mkdir()
    (cache / "yolov8m-worldv2.pt").write_bytes(b"x")  # no published digest: this one is recorded
    assert resolve_pretrained("yolo_world_v2_m", "coco") == cache / "yolov8m-worldv2.pt"
    assert (cache / "yolov8m-worldv2.pt.sha256").read_text().split()[0] == hashlib.sha256(b"x").hexdigest()
    (cache / "yolo_nas_m_coco.pth").write_bytes(b"x")  # not the published file
    with pytest.raises(OSError, match="sha256 .* is not the published yolo_nas_m weights'"):
        resolve_pretrained("yolo_nas_m", "coco")


def test_path_and_unknown_inputs(cache, payload):
    src, _ = payload
    assert resolve_pretrained("yolo_nas_s", src) == src
    assert resolve_pretrained("yolo_nas_s", str(src)) == src
    with pytest.raises(FileNotFoundError, match="known tags: coco"):
        resolve_pretrained("yolo_nas_s", "imagenet")
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        resolve_pretrained("yolo_nas_s", str(src.parent / "no_such.pth"))


def test_url_is_downloaded_into_cache_once(cache, payload):
    src, digest = payload
    got = resolve_pretrained("yolo_nas_s", src.as_uri())
    assert got == cache / "weights.pth"
    assert hashlib.sha256(got.read_bytes()).hexdigest() == digest
    src.unlink()  # a second call must use the cached copy, not the URL
    assert resolve_pretrained("yolo_nas_s", src.as_uri()) == got


def test_download_sha256_ok(tmp_path, payload):
    src, digest = payload
    dest = download(src.as_uri(), tmp_path / "out" / "w.pth", sha256=digest.upper(), progress=False)
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["w.pth"]


def test_download_sha256_mismatch_leaves_nothing(tmp_path, payload):
    src, digest = payload
    out = tmp_path / "out"
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(ValueError, match="sha256 mismatch"):
        download(src.as_uri(), out / "w.pth", sha256=wrong, progress=False)
    assert list(out.iterdir()) == []  # no partial or final file


def test_download_keeps_existing_file_on_failure(tmp_path, payload):
    src, _ = payload
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"old good copy")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        download(src.as_uri(), dest, sha256="f" * 64, progress=False)
    assert dest.read_bytes() == b"old good copy"
    with pytest.raises(OSError, match="cannot download"):
        download((tmp_path / "absent.pth").as_uri(), dest, progress=False)
    assert dest.read_bytes() == b"old good copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served", "w.pth"]


def test_download_rejects_malformed_digest(tmp_path, payload):
    with pytest.raises(ValueError, match="64 hex digits"):
        download(payload[0].as_uri(), tmp_path / "w.pth", sha256="abc")


def test_coco_class_names_for_published_weights():
    from detectkit.models.pretrained import COCO_CLASSES, pretrained_class_names

    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert (COCO_CLASSES[0], COCO_CLASSES[2], COCO_CLASSES[79]) == ("person", "car", "toothbrush")
    assert pretrained_class_names("yolo_nas_l", "coco") == list(COCO_CLASSES)
    assert pretrained_class_names("yolo_nas_s", True) == list(COCO_CLASSES)
    assert pretrained_class_names("yolo_nas_s", "/some/file.pth") is None


def test_pretrained_true_means_default_tag(cache):
    cache.mkdir()
    (cache / "yolov8s-worldv2.pt").write_bytes(b"x")
    assert resolve_pretrained("yolo_world_v2_s", True) == cache / "yolov8s-worldv2.pt"
    with pytest.raises(ValueError, match="no published pretrained weights"):
        resolve_pretrained("tiny_unknown", True)


def test_create_model_without_download_names_the_file(cache):
    import detectkit

    with pytest.raises(FileNotFoundError, match=str(cache / "yolo_nas_s_coco.pth")):
        detectkit.create_model("yolo_nas_s", pretrained="coco", download=False)
    # with download (the default) it is fetched: tests/test_weights_download.py


def test_yolo_world_checkpoints_are_listed_with_their_license(cache):
    entry = PRETRAINED["yolo_world_v2_s"]["coco"]
    assert entry.file_name == "yolov8s-worldv2.pt"
    assert entry.url == "https://github.com/ultralytics/assets/releases/download/v8.1.0/yolov8s-worldv2.pt"
    assert "AGPL" in entry.license
    with pytest.raises(FileNotFoundError, match="AGPL"):
        resolve_pretrained("yolo_world_v2_x", "coco")
