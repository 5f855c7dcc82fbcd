"""docs/extending: one experiment YAML with a timm backbone, frozen layers, a per-group lr, albumentations
transforms (one of them the user's own, from a file next to the recipe) and the user's own callback.
Run the way a user runs it: the ``detectkit`` console script from that folder, one epoch; then export
and ``detectkit.load(...).predict`` from the checkpoint it wrote."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import detectkit
from detectkit.checkpoint import read_checkpoint
from detectkit.cli import main

pytest.importorskip("timm")
pytest.importorskip("albumentations")
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "extending"


def test_the_extension_example_trains_exports_and_predicts(tmp_path):
    work = tmp_path / "my_project"
    shutil.copytree(EXAMPLE, work)
    recipe = yaml.safe_load((work / "extending.yaml").read_text())
    detectkit_cmd = str(Path(sys.executable).with_name("detectkit"))
    done = subprocess.run(
        [detectkit_cmd, "fit", "--config", "quickstart", "--config", "extending.yaml",
         "--data.image_size=64", "--data.loader.batch_size=2", "--data.loader.num_workers=0",
         "--data.synthetic.train_images=4", "--data.synthetic.val_images=2", "--data.synthetic.size=64",
         "--data.cache_dir=data", "--trainer.logger.init_args.save_dir=runs", "--trainer.max_epochs=1",
         "--trainer.enable_progress_bar=false"],
        cwd=work, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                                   "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the user's callback ran, and the freeze it reports is the recipe's
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("TrainableSummary:")]
    assert ", 0 frozen" not in line

    (ckpt_path,) = work.rglob("last.ckpt")
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt["hyper_parameters"]["freeze"] == recipe["model"]["freeze"]
    assert ckpt["hyper_parameters"]["optim"]["lr_mult"] == {"neck": 0.5}
    assert ckpt["datamodule_hyper_parameters"]["augment"]["extra"][0]["name"] == "my_extensions.Sepia"
    frozen = [k for k in ckpt["current_model_state"] if k.startswith("model.backbone.body.layer1.")]
    trained = [k for k in ckpt["current_model_state"] if k.startswith("model.backbone.body.layer3.")]
    assert frozen and trained
    torch.manual_seed(0)  # the quickstart's seed: the same initial weights as the run
    init = detectkit.create_model("yolo_nas_s", num_classes=3, backbone="timm/resnet18").state_dict()
    raw = ckpt["current_model_state"]
    assert all(torch.equal(raw[k], init[k[len("model."):]]) for k in frozen if raw[k].is_floating_point())
    assert any(not torch.equal(raw[k], init[k[len("model."):]]) for k in trained if raw[k].is_floating_point())

    onnx = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt_path), "--output", str(onnx)]) == 0 and onnx.stat().st_size
    model = detectkit.load(ckpt_path)
    assert model.record["model_kwargs"] == {"backbone": "timm/resnet18"}
    preds = model.predict(np.zeros((64, 64, 3), np.uint8))
    assert len(preds) == 1
