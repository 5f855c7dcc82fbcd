"""``detectkit.load``: a trained checkpoint comes back as a ready model with what it was trained with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compress_helpers import TinyDetector, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import detectkit
from detectkit.checkpoint import RECORD_KEY, CheckpointError, content_digest, read_checkpoint, save_weights
from detectkit.data import AugmentConfig, LoaderConfig
from detectkit.modules import OptimConfig
from detectkit.ops import PostprocessConfig
from detectkit.ops.nms import postprocess
from detectkit.registry import list_models, register_model

SIZE = 96


def tiny_ckpt_detector(num_classes: int = 3, checkpoint: str | None = None, width: int = 8) -> TinyDetector:
    """A registered tiny detector: checkpoints name their model, so ``detectkit.load`` can rebuild it."""
    return TinyDetector(num_classes=num_classes, width=width)


if "tiny_ckpt_detector" not in list_models():
    register_model(tiny_ckpt_detector)


def tiny_data(cache_dir, size: int = SIZE):
    from detectkit.data import DetectionDataModule
    from detectkit.data.synthetic import SyntheticConfig

    syn = SyntheticConfig(train_images=8, val_images=4, size=size, num_classes=3)
    return DetectionDataModule(image_size=size, loader=LoaderConfig(batch_size=4, num_workers=0),
                               synthetic=syn, cache_dir=str(cache_dir), augment=AugmentConfig(mixup_prob=0.0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step fit at 96 px with EMA; the epoch-end checkpoint is written mid-fit (EMA != live weights)."""
    from detectkit import DetectionModule, ModelEMA

    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    dm = tiny_data(root / "data")
    # a dataset whose category ids are not label + 1 (COCO's are sparse); a subclass, whatever the base defines
    dm.__class__ = type("SparseIds", (type(dm),), {"category_ids": property(lambda self: [5, 7, 9])})
    module = DetectionModule("tiny_ckpt_detector", num_classes=3, class_names=dm.class_names,
                             optim=OptimConfig(warmup_steps=1, lr=1e-2),
                             predict_postprocess=PostprocessConfig(conf=0.05, iou=0.6, max_det=50))
    trainer = tiny_trainer(root, [ModelEMA(decay=0.5), ModelCheckpoint(dirpath=root / "ckpt", save_last=True)], 1)
    trainer.fit(module, dm)
    return module, root / "ckpt" / "last.ckpt"


def test_load_uses_the_record(trained):
    module, path = trained
    model = detectkit.load(path)
    assert not model.training and type(model).__name__ == "TinyDetector"
    assert model.inference.image_size == (SIZE, SIZE) and model.inference.longest is None  # the validation letterbox
    post = model.inference.postprocess
    assert (post.conf, post.iou, post.max_det) == (0.05, 0.6, 50)
    assert model.class_names == module.class_names and model.category_ids == [5, 7, 9]
    assert model.record["model"] == "tiny_ckpt_detector" and model.record["content_sha256"]

    # the EMA weights (the ckpt's state_dict), not the live ones Lightning keeps beside them
    raw = read_checkpoint(path)
    ema = {k[len("model."):]: v for k, v in raw["state_dict"].items() if k.startswith("model.")}
    live = {k[len("model."):]: v for k, v in raw["current_model_state"].items() if k.startswith("model.")}
    assert any(not torch.equal(ema[k], live[k]) for k in ema if ema[k].is_floating_point())
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())

    # the same detections as the module that trained it (it holds the EMA weights after fit)
    x = torch.rand(2, 3, SIZE, SIZE)
    module.eval()
    ref = module.detect(x, module.predict_postprocess)
    with torch.no_grad():
        got = postprocess(*model(x), **model.inference.postprocess.to_dict())
    assert sum(len(d) for d in ref) > 0
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)


def test_create_model_and_weights_file(trained, tmp_path):
    _, path = trained
    model = detectkit.load(path)
    built = detectkit.create_model("tiny_ckpt_detector", num_classes=3, checkpoint=str(path))
    assert built.training and built.inference == model.inference
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match="holds 3 classes"):
        detectkit.create_model("tiny_ckpt_detector", num_classes=5, checkpoint=str(path))

    small = save_weights(path, tmp_path / "w.pt", half=True)
    assert small.stat().st_size < path.stat().st_size / 2  # no optimizer, no live copy, fp16
    back = detectkit.load(small)
    assert back.inference == model.inference and back.class_names == model.class_names
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v.half().to(v.dtype) if v.is_floating_point() else v)
    again = save_weights(back, tmp_path / "w2.pt")  # from a loaded model: the record travels along
    assert detectkit.load(again).record["inference"] == model.record["inference"]


def test_weights_file_loads_without_lightning(trained, tmp_path):
    """A deployment that only predicts never imports Lightning (seconds of import time)."""
    _, path = trained
    weights = save_weights(path, tmp_path / "w.pt")
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); import detectkit; from compress_helpers import TinyDetector; "
        "detectkit.register_model(lambda num_classes=3, checkpoint=None, width=8: TinyDetector(num_classes, width=width), "
        "name='tiny_ckpt_detector'); "
        "m = detectkit.load(sys.argv[1]); print(m.inference.image_size, 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(weights), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False" and f"({SIZE}, {SIZE})" in out.stdout


def test_old_checkpoint_without_record(trained, tmp_path):
    _, path = trained
    raw = read_checkpoint(path)
    del raw[RECORD_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    model = detectkit.load(old)  # from hyper_parameters, default inference settings
    assert model.class_names == raw["hyper_parameters"]["class_names"] and model.inference.image_size == (640, 640)
    assert all(torch.equal(v, raw["state_dict"]["model." + k]) for k, v in model.state_dict().items())


def test_pruned_and_quantized_checkpoints_load(tmp_path):
    pytest.importorskip("torch_pruning")
    pytest.importorskip("modelopt")
    from detectkit.callbacks import QuantizationAwareTraining, StructuredPruning

    from detectkit.compress.quantize import is_quantized
    from detectkit.modules.detector import DetectionModule

    torch.manual_seed(0)
    module = DetectionModule("tiny_ckpt_detector", num_classes=3, model_kwargs={"width": 16},
                             optim=OptimConfig(warmup_steps=1))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True, filename="e{epoch}")
    cbs = [StructuredPruning(target_macs_ratio=None, channel_sparsity=0.25, image_size=64, round_to=4),
           QuantizationAwareTraining(start_epoch=1, calib_batches=1), ckpt]
    tiny_trainer(tmp_path, cbs, max_epochs=2, train_batches=1).fit(module, tiny_data(tmp_path / "data", 64))

    pruned = detectkit.load(tmp_path / "ckpt" / "eepoch=0.ckpt")
    assert [op["op"] for op in pruned.record["architecture"]] == ["prune"] and not is_quantized(pruned)
    assert pruned.down2.conv.out_channels < 64
    final = detectkit.load(tmp_path / "ckpt" / "last.ckpt")
    assert [op["op"] for op in final.record["architecture"]] == ["prune", "quantize"] and is_quantized(final)
    x = torch.rand(1, 3, 64, 64)
    module.eval()
    with torch.no_grad():
        for a, b in zip(module.model(x), final(x)):
            torch.testing.assert_close(a, b)

    # written before records existed: the callbacks' saved states rebuild the same architecture
    raw = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    del raw[RECORD_KEY]
    torch.save(raw, tmp_path / "old.ckpt")
    old = detectkit.load(tmp_path / "old.ckpt")
    assert is_quantized(old) and old.down2.conv.out_channels == final.down2.conv.out_channels


def test_super_gradients_pth(shared_dir):
    path = shared_dir / "fixtures" / "yolo_nas_s_parity" / "yolo_nas_s_random.pth"
    model = detectkit.load(path)  # the variant is found from the weights' shapes
    assert type(model).__name__ == "YoloNAS" and model.registry_name == "yolo_nas_s" and not model.training
    net = read_checkpoint(path)["net"]
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in net.items() if k in own)


def test_a_fresh_process_finds_every_family_and_architecture_op(shared_dir):
    """``checkpoint`` imports no model family and no compress module: the registrations (foreign
    readers, architecture ops) are discovered on the first lookup, whatever was imported before."""
    path = shared_dir / "fixtures" / "yolo_nas_s_parity" / "yolo_nas_s_random.pth"
    code = (
        "import sys\n"
        "from detectkit.checkpoint import load\n"
        "assert 'detectkit.models' not in sys.modules and 'detectkit.compress' not in sys.modules\n"
        f"model = load({str(path)!r})\n"
        "from detectkit.checkpoint.hooks import _OPS\n"
        "print(model.registry_name, sorted(_OPS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "yolo_nas_s ['prune', 'quantize']"


def test_ultralytics_pt(shared_dir, tmp_path):
    from test_yolo_world_weights import _module_tree, _save_pt

    state = torch.load(shared_dir / "fixtures" / "yolo_world_s_parity" / "state_dict.pt", weights_only=True)
    txt = torch.nn.functional.normalize(torch.randn(1, 2, 512), dim=-1)

    def payload(mods):
        ema = _module_tree(state, mods)
        ema.txt_feats, ema.names = txt, {0: "cat", 1: "dog"}
        return {"model": None, "ema": ema, "version": "8.4.190"}

    path = tmp_path / "yolov8s-worldv2.pt"
    _save_pt(path, payload)
    model = detectkit.load(path)
    assert model.registry_name == "yolo_world_v2_s" and model.class_names == ["cat", "dog"] and model.num_classes == 2


def test_content_digest_is_deterministic_and_sensitive():
    a = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "meta": {"names": ["a", "b"], "s": {"x", "y"}}}
    b = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "meta": {"names": ["a", "b"], "s": {"y", "x"}}}
    assert content_digest(a) == content_digest(b)
    b["state_dict"]["w"][0, 0] = 1e-7
    assert content_digest(a) != content_digest(b)
    assert content_digest({"w": torch.zeros(6)}) != content_digest({"w": torch.zeros(2, 3)})  # shape counts
    assert content_digest({"w": torch.zeros(6)}) != content_digest({"w": torch.zeros(6, dtype=torch.float64)})


def test_checkpoint_with_flat_hyperparameters_still_loads(trained, tmp_path):
    """A checkpoint written before the grouped configs stores ``lr``, ``val_conf``, ``predict_conf``
    ... as flat hyper-parameters: ``detectkit.load`` and ``load_from_checkpoint`` still read it, the
    flat values land in the groups, and the new checkpoint stores plain data (safe loader)."""
    from detectkit import DetectionModule
    from detectkit.checkpoint import seal

    _, path = trained
    raw = read_checkpoint(path)
    hp = raw["hyper_parameters"]
    assert hp["optim"]["lr"] == 1e-2 and hp["predict_postprocess"]["conf"] == 0.05  # plain dicts, not classes
    flat = {k: v for k, v in hp.items() if k not in ("optim", "val_postprocess", "predict_postprocess")}
    flat.update(lr=1e-2, warmup_steps=1, weight_decay=1e-5, betas=[0.9, 0.999], val_conf=0.02, val_iou=0.6,
                predict_conf=0.05, predict_iou=0.6, predict_max_det=50)
    raw["hyper_parameters"] = flat
    old = tmp_path / "flat.ckpt"
    torch.save(seal(raw), old)
    assert detectkit.load(old).inference.postprocess.max_det == 50
    with pytest.warns(FutureWarning, match=r"DetectionModule: flat arguments are deprecated.*lr -> optim\.lr"):
        module = DetectionModule.load_from_checkpoint(old, weights_only=True)
    assert (module.optim.lr, module.optim.warmup_steps, module.optim.betas) == (1e-2, 1, (0.9, 0.999))
    assert (module.val_postprocess.conf, module.val_postprocess.iou, module.val_postprocess.top_k) == (0.02, 0.6, 1000)
    assert (module.predict_postprocess.conf, module.predict_postprocess.max_det) == (0.05, 50)
    assert module.hparams["optim"]["lr"] == 1e-2 and "lr" not in module.hparams
