"""validate/test/predict take what the checkpoint recorded; --ckpt_path last|best name the newest run's."""

from __future__ import annotations

import os

import pytest
from jsonargparse import Namespace

from detectkit.cli.lightning import apply_settings, resolve_ckpt_path
from detectkit.errors import UserError


def test_last_and_best_resolve_to_the_newest_run(tmp_path):
    for i, run in enumerate(("version_0", "version_1")):
        d = tmp_path / "logs" / run / "checkpoints"
        d.mkdir(parents=True)
        for name in ("last", "best"):
            (d / f"{name}.ckpt").write_bytes(b"x")
            os.utime(d / f"{name}.ckpt", (1000 + i, 1000 + i))
    newest = tmp_path / "logs" / "version_1" / "checkpoints"
    assert resolve_ckpt_path("last", [tmp_path]) == str(newest / "last.ckpt")
    assert resolve_ckpt_path("best", [tmp_path]) == str(newest / "best.ckpt")
    assert resolve_ckpt_path(str(tmp_path / "logs" / "version_0"), [tmp_path]).endswith("version_0/checkpoints/last.ckpt")
    with pytest.raises(UserError, match="no checkpoints/last.ckpt"):
        resolve_ckpt_path("last", [tmp_path / "elsewhere"])


def test_checkpoint_values_replace_the_recipe_unless_given():
    cfg = Namespace(data=Namespace(class_path="X", init_args=Namespace(image_size=640, val_center=True, classes=None)),
                    model=Namespace(val_conf=0.01))
    changed = apply_settings(cfg, {"data.image_size": 128, "data.classes": ["a", "b"], "model.val_conf": 0.01}, set())
    assert cfg.data.init_args.image_size == 128 and cfg.data.init_args.classes == ["a", "b"]
    assert changed == ["data.image_size 128 (recipe 640)"]  # one report, only what differed
    cfg.data.init_args.image_size = 320
    assert apply_settings(cfg, {"data.image_size": 128}, {"data.image_size"}) == []
    assert cfg.data.init_args.image_size == 320  # the command line wins


def test_checkpoint_postprocess_groups_replace_the_recipe_field_by_field():
    from detectkit.cli.lightning import checkpoint_settings

    ckpt = {"hyper_parameters": {"val_postprocess": {"conf": 0.05, "iou": 0.6, "top_k": 1000, "max_det": 300},
                                 "predict_postprocess": None}}
    settings = checkpoint_settings(ckpt)
    assert settings == {"model.val_postprocess": {"conf": 0.05, "iou": 0.6, "top_k": 1000, "max_det": 300}}
    cfg = Namespace(model=Namespace(val_postprocess=Namespace(conf=0.01, iou=0.7, top_k=1000, max_det=300)))
    changed = apply_settings(cfg, settings, {"model.val_postprocess.iou"})
    assert cfg.model.val_postprocess.conf == 0.05 and cfg.model.val_postprocess.iou == 0.7  # iou given: kept
    assert changed == ["model.val_postprocess.conf 0.05 (recipe 0.01)"]
    # a checkpoint of before the grouping (flat hyper-parameters) gives the same groups
    old = checkpoint_settings({"hyper_parameters": {"predict_conf": 0.4, "val_iou": 0.65, "lr": 1e-3}})
    assert old == {"model.predict_postprocess": {"conf": 0.4}, "model.val_postprocess": {"iou": 0.65}}
