"""The ``detectkit`` command: recipes parse, fit/validate/predict run end to end on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from detectkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["quickstart", "yolo_nas_s_coco", "yolo_nas_m_coco", "yolo_nas_l_coco", "yolo_nas_s_finetune"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "experiments" / f"{name}.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    callbacks = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert "detectkit.modules.ema.ModelEMA" in callbacks
    if name.endswith("_coco"):  # super-gradients' COCO recipe
        o, v = cfg["model"]["optim"], cfg["model"]["val_postprocess"]
        assert (o["lr"], o["weight_decay"], o["warmup_steps"], o["final_lr_ratio"]) == (2e-4, 1e-5, 1000, 0.1)
        assert (v["conf"], v["iou"], v["top_k"], v["max_det"]) == (0.01, 0.7, 1000, 300)
        assert cfg["trainer"]["max_epochs"] == 300
        ema = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelEMA"))
        assert ema["init_args"]["decay"] == 0.9997 and ema["init_args"]["decay_type"] == "threshold"
    # the data section is in subclass mode: a plain recipe mapping means DetectionDataModule
    assert cfg["data"]["class_path"] == "detectkit.data.DetectionDataModule"
    data = cfg["data"]["init_args"]
    if name == "yolo_nas_s_coco":
        assert data["loader"]["batch_size"] == 32
    if name == "yolo_nas_s_finetune":
        o = cfg["model"]["optim"]
        assert (o["lr"], o["weight_decay"], o["warmup_epochs"]) == (5e-4, 1e-4, 3)
        assert cfg["trainer"]["max_epochs"] == 100 and data["loader"]["batch_size"] == 16


def _shipped_recipes() -> list[Path]:
    return sorted((ROOT / "experiments").rglob("*.yaml"))


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", _shipped_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(path, capsys):
    """Every recipe under experiments/ goes through the real parser: a recipe (model + data)
    alone, an overlay on top of quickstart.yaml (as their headers say), a NAS study through the
    fit arguments of its proxy training. An old flat key (``data.batch_size``) would fail here."""
    recipe = yaml.safe_load(path.read_text()) or {}
    quickstart = str(ROOT / "experiments" / "quickstart.yaml")
    if "proxy" in recipe:  # a NAS study: its proxy recipe plus its overrides
        proxy = recipe["proxy"]["recipe"]  # a shipped recipe's name or a path from the repo root
        proxy = proxy if "/" not in proxy and not proxy.endswith(".yaml") else str(ROOT / proxy)
        args = ["--config", proxy, *recipe["proxy"].get("overrides", [])]
    elif "model" in recipe:
        args = ["--config", str(path)]
    else:
        args = ["--config", quickstart, "--config", str(path)]
    cfg = _print_config(args, capsys)
    assert set(cfg["model"]["optim"]) >= {"lr", "warmup_steps", "warmup_epochs", "warmup_fraction"}
    assert "batch_size" in cfg["data"]["init_args"]["loader"]


@pytest.mark.parametrize("flat, new", [
    ("--data.batch_size=4", "--data.loader.batch_size"),
    ("--model.lr=0.1", "--model.optim.lr"),
    ("--model.val_conf=0.1", "--model.val_postprocess.conf"),
])
def test_old_flat_option_names_its_new_place(flat, new, capsys):
    assert main(["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"), flat, "--print_config"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"detectkit fit: error: {flat.split('=')[0]} moved to {new} " \
                  f"(in a recipe: {new.rsplit('.', 1)[1]} under {': '.join(new[2:].split('.')[:-1])}:)"


def test_old_flat_recipe_key_names_its_new_place(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  mixup_prob: 0.2\n")
    assert main(["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"), "--config", str(old),
                 "--print_config"]) == 1
    assert capsys.readouterr().err.strip() == ("detectkit fit: error: --data.mixup_prob moved to "
                                               "--data.augment.mixup_prob (in a recipe: mixup_prob under data: augment:)")


def _tiny(tmp: Path) -> list[str]:
    return [
        "--config", str(ROOT / "experiments" / "quickstart.yaml"),
        "--data.image_size=64", "--data.loader.batch_size=2", "--data.loader.num_workers=0",
        "--data.synthetic.train_images=4", "--data.synthetic.val_images=2", "--data.synthetic.size=64",
        f"--data.cache_dir={tmp / 'data'}",
        f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
        "--trainer.enable_progress_bar=false",
    ]


def test_fit_validate_predict(tmp_path):
    assert main(["fit", *_tiny(tmp_path), "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                 "--trainer.check_val_every_n_epoch=1"]) == 0
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, list(tmp_path.rglob("*"))
    assert sorted(tmp_path.rglob("config.yaml"))  # LightningCLI saved the resolved config
    assert main(["validate", *_tiny(tmp_path), f"--ckpt_path={ckpts[0]}"]) == 0
    with pytest.warns(UserWarning, match="randomly initialised weights"):  # no weights given: say so
        assert main(["validate", *_tiny(tmp_path), "--trainer.limit_val_batches=1"]) == 0
    metrics = sorted(tmp_path.rglob("metrics.csv"))
    assert metrics and any("val/map_50" in p.read_text() for p in metrics)

    assert main(["predict", *_tiny(tmp_path), f"--ckpt_path={ckpts[0]}", "--model.predict_postprocess.conf=0.0"]) == 0
    results = sorted(tmp_path.rglob("predictions.json"))
    assert results, list(tmp_path.rglob("*"))
    rows = json.loads(results[0].read_text())
    assert rows, "predict_conf=0 must yield detections"
    assert set(rows[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["image_id"] for r in rows} <= {0, 1}
    assert {r["category_id"] for r in rows} <= {1, 2, 3}  # ids of the generated annotations.json (1-based)
    images = sorted((results[0].parent / "images").glob("*.jpg"))
    assert len(images) == 2


def test_data_subcommand_is_dispatched(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--images", "2", "--val", "1", "--size", "64"]) == 0
    assert (out / "train" / "annotations.json").is_file()


def test_export_subcommand_is_dispatched(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    assert "detectkit export" in capsys.readouterr().out
