"""The YOLO-NAS search space: any point builds through the registry, round-trips through YAML,
contains S/M/L exactly, and a custom architecture's checkpoint stands on its own."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from module_helpers import tiny_data, trainer

import detectkit
from detectkit.checkpoint import RECORD_KEY, read_checkpoint, strip_prefix
from detectkit.models.yolo_nas.configs import CONFIGS, StageCfg, YoloNASConfig
from detectkit.modules import OptimConfig
from detectkit.nas.space import SearchSpace
from detectkit.registry import create_model

PARAMS = {"yolo_nas_s": 12_878_304, "yolo_nas_m": 33_861_346, "yolo_nas_l": 44_529_448}  # README, 80 classes

S = StageCfg
TINY = YoloNASConfig(
    stem_channels=8,
    stages=(S(16, 1, 8, block="conv"), S(24, 2, 8, True), S(32, 1, 16), S(48, 1, 16, block="conv")),
    spp_channels=32,
    neck=(S(24, 1, 8), S(16, 1, 8, block="conv"), S(24, 2, 8, True), S(32, 1, 16, block="qarepvgg")),
    head_channels=(16, 24, 32),
)


def test_yaml_model_yaml_round_trip(tmp_path):
    path = tmp_path / "arch.yaml"
    TINY.to_yaml(path)
    model = create_model("yolo_nas_custom", num_classes=3, arch=str(path))
    assert model.cfg == TINY
    assert model.cfg.to_yaml() == path.read_text()
    assert YoloNASConfig.from_dict(model.registry_kwargs["arch"]) == TINY  # the dict, not the path
    # the block types are real: plain conv stages have no QARepVGG branches
    assert not hasattr(model.backbone.stage1.blocks.bottlenecks[0].cv1, "branch_3x3")
    assert hasattr(model.backbone.stage2.blocks.bottlenecks[0].cv1, "branch_3x3")
    assert hasattr(model.neck.neck4.blocks.bottlenecks[0].cv1, "branch_3x3")
    model.eval()
    with torch.no_grad():
        boxes, scores = model(torch.rand(1, 3, 64, 64))
    assert boxes.shape == (1, 84, 4) and scores.shape == (1, 84, 3)


@pytest.mark.parametrize("variant", sorted(PARAMS))
def test_sml_are_exact_points_of_the_space(variant):
    space = SearchSpace.from_dict({"stem_channels": [16, 32], "stages": {"num_blocks": [1, 2]}})
    cfg = space.config_of(space.params_of(CONFIGS[variant]))
    assert cfg == CONFIGS[variant] and space.contains(cfg)
    custom = create_model("yolo_nas_custom", arch=YoloNASConfig.from_yaml_text(cfg.to_yaml()).to_dict())
    named = create_model(variant)
    assert sum(p.numel() for p in custom.parameters()) == PARAMS[variant]
    assert list(custom.state_dict()) == list(named.state_dict())
    assert {k: v.shape for k, v in custom.state_dict().items()} == {k: v.shape for k, v in named.state_dict().items()}


def test_bad_space_and_arch_are_named_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        SearchSpace.from_dict({"stem": [8]})
    with pytest.raises(ValueError, match="neck3.out_channels must be even"):
        SearchSpace.from_dict({"neck": {"out_channels": [[96], [48], [95], [192]]}})
    with pytest.raises(ValueError, match="block must be in"):
        SearchSpace.from_dict({"stages": {"block": ["mbconv"]}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("stem_channels: 8\nstages: []\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        create_model("yolo_nas_custom", arch=str(bad))
    with pytest.raises(ValueError, match="not found"):
        create_model("yolo_nas_custom", arch=str(tmp_path / "missing.yaml"))


def test_seeds_are_enqueued_once(tmp_path):
    from detectkit.nas.search import SearchConfig, open_study

    cfg = SearchConfig.from_dict({"study_name": "seeds", "storage": f"sqlite:///{tmp_path}/s.db", "n_trials": 3,
                                  "space": {"seeds": ["yolo_nas_s", "yolo_nas_m"]},
                                  "proxy": {"recipe": "experiments/quickstart.yaml"}})
    open_study(cfg)
    study = open_study(cfg)  # a second worker or a restart does not enqueue them again
    waiting = [t.system_attrs["fixed_params"] for t in study.trials]  # enqueued, not yet run
    space = cfg.space
    assert waiting == [space.params_of(CONFIGS["yolo_nas_s"]), space.params_of(CONFIGS["yolo_nas_m"])]


def test_custom_checkpoint_loads_after_the_yaml_is_gone(tmp_path):
    from detectkit import DetectionModule

    path = tmp_path / "arch.yaml"
    TINY.to_yaml(path)
    dm = tiny_data(tmp_path)
    module = DetectionModule("yolo_nas_custom", num_classes=2, model_kwargs={"arch": str(path)},
                             optim=OptimConfig(warmup_steps=1))
    t = trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], enable_checkpointing=True,
                max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    t.fit(module, dm)
    path.unlink()
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    record = read_checkpoint(ckpt)[RECORD_KEY]
    assert record["model"] == "yolo_nas_custom" and YoloNASConfig.from_dict(record["model_kwargs"]["arch"]) == TINY
    loaded = detectkit.load(ckpt)
    assert loaded.cfg == TINY and loaded.num_classes == 2
    # by values: the recorded architecture rebuilt and the saved weights in it, not just the right shapes
    saved = strip_prefix(read_checkpoint(ckpt)["state_dict"], "model.")
    state = loaded.state_dict()
    assert list(state) == list(saved)
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    reference = create_model("yolo_nas_custom", num_classes=2, arch=TINY.to_dict())
    reference.load_state_dict(saved)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(loaded.eval()(x), reference.eval()(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
