"""RoboflowDataModule offline: cache hit, local fallback with a message, clear error. Never
touches the network (the download function is replaced where a key is given)."""

from __future__ import annotations

import shutil

import pytest

from detectkit.data import LoaderConfig
from detectkit.data.datamodule import RoboflowDataModule
from detectkit.data.formats import roboflow as rf
from detectkit.data.records import DatasetError

ARGS = dict(workspace="wolfodorpythontests", project="sharks-tiny-q9lmf", version=774)


@pytest.fixture
def sharks(shared_dir):
    return shared_dir / "data/roboflow_sharks_tiny/sharks-tiny-coco"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)

    def offline(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(rf, "_download", offline)


def test_cache_hit_needs_no_key(tmp_path, sharks):
    target = tmp_path / ARGS["workspace"] / ARGS["project"] / "774" / "coco"
    shutil.copytree(sharks, target)
    (target / ".detectkit-complete").write_text("x")
    dm = RoboflowDataModule(**ARGS, cache_dir=str(tmp_path), image_size=64,
                            loader=LoaderConfig(batch_size=2, num_workers=0))
    assert dm.num_classes == 3 and dm.class_names == ["fish", "primary", "shark"]
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 7 and len(dm.datasets["val"]) == 2


def test_offline_download_falls_back_to_local_export(tmp_path, sharks, caplog):
    dm = RoboflowDataModule(
        **ARGS, api_key="k", cache_dir=str(tmp_path), local_path=str(sharks), image_size=64,
        loader=LoaderConfig(batch_size=2, num_workers=0),
    )
    assert dm.num_classes == 3
    assert "download failed (ConnectionError: network unreachable); using the local export" in caplog.text
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 7


def test_download_into_cache_then_reuse(tmp_path, sharks, monkeypatch):
    calls = []

    def fake_download(workspace, project, version, api_key, rf_format, location):
        calls.append(rf_format)
        shutil.copytree(sharks, location)

    monkeypatch.setattr(rf, "_download", fake_download)
    first = rf.fetch_roboflow(**ARGS, api_key="k", format="coco", cache_dir=tmp_path)
    second = rf.fetch_roboflow(**ARGS, api_key="k", format="coco", cache_dir=tmp_path)
    assert first == second and calls == ["coco"] and (first / "train/_annotations.coco.json").is_file()


def test_no_key_no_cache_no_local_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no API key.*nothing cached.*no local_path given"):
        RoboflowDataModule(**ARGS, cache_dir=str(tmp_path), loader=LoaderConfig(num_workers=0)).prepare_data()
