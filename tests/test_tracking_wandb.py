"""A short ``detectkit fit`` with W&B in offline mode: the run folder holds config, history, media.

Offline runs keep everything in ``run-<id>.wandb`` (a LevelDB-style log of protobuf ``Record``s,
what ``wandb sync`` uploads) plus the ``files/`` folder; the test reads both."""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tracking_helpers import tiny_config  # noqa: E402

pytest.importorskip("wandb")

_BLOCK = 32768


def wandb_records(path: Path) -> Iterator:
    """The ``Record`` protobufs of an offline ``.wandb`` file (LevelDB log framing)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind in (1, 2):  # FULL, FIRST
            buf = chunk
        else:  # MIDDLE, LAST
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_fit_logs_to_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from detectkit.cli import DetectkitCLI

    cfg = tiny_config(
        tmp_path,
        logger={"class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "detectkit-test", "offline": True, "save_dir": str(tmp_path / "run")}},
        callbacks=[
            {"class_path": "detectkit.callbacks.TrackRun", "init_args": {"half": True}},
            {"class_path": "detectkit.callbacks.LogValidationPredictions", "init_args": {"num_images": 2}},
        ],
    )
    cli = DetectkitCLI(args=["fit", "--config", str(cfg)])
    cli.trainer.logger.experiment.finish()  # what process exit does for a CLI run: flush the run file

    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_dir = runs[0]
    run_file = next(run_dir.glob("run-*.wandb"))
    deadline = time.monotonic() + 60  # wandb-core writes the file asynchronously; "exit" comes last
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
        assert time.monotonic() < deadline, "the offline run file never got its exit record"
        time.sleep(0.5)
    history, config, files, artifacts = set(), set(), set(), []
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.update(_key(i) for i in rec.history.item)
        elif kind == "config":
            config.update(_key(i) for i in rec.config.update)
        elif kind == "files":
            files.update(f.path for f in rec.files.files)
        elif kind == "artifact":
            artifacts.append((rec.artifact.type, [m.path for m in rec.artifact.manifest.contents]))

    # parameters: the flattened resolved CLI config, each once (Lightning's hparams not again)
    from detectkit.integrations.tracking import flatten_config

    own_config = next((tmp_path / "run" / "detectkit-test").glob("*/config.yaml"))  # the run's own folder
    expected = {k for k, v in flatten_config(yaml.safe_load(own_config.read_text())).items() if v is not None}
    assert config - {"_wandb"} == expected, sorted((config - {"_wandb"}) ^ expected)
    assert "lightning_config.yaml" in files
    assert (run_dir / "files" / "lightning_config.yaml").read_text() == own_config.read_text()
    assert "tracking_tiny" in own_config.read_text()
    # metrics history: losses, learning rate, mAP, per-class AP
    assert {"train/loss_epoch", "train/lr_decay", "train/lr_no_decay", "val/map_50", "val/AP/rectangle"} <= history, sorted(history)
    # images with W&B box overlays (predictions and ground truth) and the two plots
    assert {"val/predictions/0/boxes/predictions/path", "val/predictions/0/boxes/ground_truth/path"} <= history
    assert {"val/pr_curve/path", "val/confusion_matrix/path"} <= history
    pngs = [f for f in files if f.startswith("media/images/") and f.endswith(".png")]
    assert len(pngs) == 4 and all((run_dir / "files" / f).stat().st_size > 0 for f in pngs)
    gt = [f for f in (run_dir / "files").rglob("*.boxes2D.json") if json.loads(f.read_text())["box_data"]
          and "scores" not in json.loads(f.read_text())["box_data"][0]]
    assert gt, "no ground-truth box overlay written"
    # the fp16 weights file as the model artifact, not the training checkpoint
    assert [paths for t, paths in artifacts if t == "model"] == [["weights_fp16.pt"]], artifacts
    weights = own_config.parent / "weights_fp16.pt"
    ckpt = next((own_config.parent / "checkpoints").glob("last*.ckpt"))
    assert weights.stat().st_size < ckpt.stat().st_size / 4, (weights.stat().st_size, ckpt.stat().st_size)
    import torch

    import detectkit

    stored = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    loaded = detectkit.load(weights)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        boxes, scores = loaded(x)
        ref_boxes, ref_scores = cli.model.model.eval()(x)
    torch.testing.assert_close(scores, ref_scores, atol=5e-3, rtol=0)
    torch.testing.assert_close(boxes, ref_boxes, atol=0.5, rtol=0)  # pixels, after fp16 weights
