"""Loading super-gradients YOLO-NAS checkpoints (and our own state dicts) by name, strictly."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from detectkit import create_model
from detectkit.models.yolo_nas import CONFIGS, YoloNAS, load_super_gradients_checkpoint

PRIOR_BIAS = -math.log(0.99 / 0.01)  # -4.59512


@pytest.fixture(scope="module")
def ckpt_path(shared_dir):
    path = shared_dir / "fixtures" / "yolo_nas_s_parity" / "yolo_nas_s_random.pth"
    if not path.is_file():
        pytest.skip(f"shared test data absent: {path}")
    return path


@pytest.fixture(scope="module")
def sg_state(ckpt_path):
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["net"]


@pytest.fixture(scope="module")
def model_s() -> YoloNAS:
    torch.manual_seed(123)
    return create_model("yolo_nas_s")


def empty_model(variant: str) -> YoloNAS:
    """Uninitialised weights (no random-init cost) for tests that overwrite every value by loading."""
    with torch.device("meta"):
        model = create_model(variant)
    return model.to_empty(device="cpu")


def _without_placeholders(state):
    return {k: v for k, v in state.items() if ".rbr_reparam." not in k}


def _assert_state_equal(model, expected, skip=()):
    own = model.state_dict()
    for k, v in expected.items():
        if k not in skip:
            assert torch.equal(own[k], v), k


@pytest.mark.parametrize(
    "variant, params", [("yolo_nas_s", 12_878_304), ("yolo_nas_m", 33_861_346), ("yolo_nas_l", 44_529_448)]
)
def test_parameter_counts_match_super_gradients(variant, params):
    with torch.device("meta"):  # shapes only: no init cost
        model = create_model(variant)
    assert sum(p.numel() for p in model.parameters()) == params


def test_loads_sg_checkpoint_strictly_and_ignores_rbr_placeholders(model_s, ckpt_path, sg_state):
    assert len(sg_state) == 921
    placeholders = [k for k in sg_state if ".rbr_reparam." in k]
    assert len(placeholders) == 2 * 37
    report = load_super_gradients_checkpoint(model_s, ckpt_path)
    assert report == ([], [], [], [])
    assert len(model_s.state_dict()) == 921 - 74
    _assert_state_equal(model_s, _without_placeholders(sg_state))


def test_missing_key_is_named(model_s, sg_state):
    state = dict(sg_state)
    del state["neck.neck2.blocks.bottlenecks.1.alpha"]
    with pytest.raises(RuntimeError, match=r"missing keys \(1\): neck\.neck2\.blocks\.bottlenecks\.1\.alpha"):
        load_super_gradients_checkpoint(model_s, {"net": state})


def test_unexpected_key_is_named(model_s, sg_state):
    state = {**sg_state, "heads.head4.cls_pred.weight": torch.zeros(80, 64, 1, 1)}
    with pytest.raises(RuntimeError, match=r"unexpected keys \(1\): heads\.head4\.cls_pred\.weight"):
        load_super_gradients_checkpoint(model_s, state)


def test_shape_mismatch_names_key_and_shapes(model_s, sg_state):
    state = {**sg_state, "backbone.stem.conv.branch_1x1.weight": torch.zeros(48, 3, 3, 3)}
    with pytest.raises(RuntimeError) as err:
        load_super_gradients_checkpoint(model_s, state)
    assert "backbone.stem.conv.branch_1x1.weight: checkpoint (48, 3, 3, 3) vs model (48, 3, 1, 1)" in str(err.value)


def test_non_strict_reports_and_loads_the_rest(sg_state):
    model = empty_model("yolo_nas_s")
    state = dict(sg_state)
    del state["backbone.stage1.blocks.conv3.conv.weight"]
    state["backbone.stem.conv.branch_1x1.weight"] = torch.zeros(48, 3, 3, 3)
    report = load_super_gradients_checkpoint(model, state, strict=False)
    assert report.missing == ["backbone.stage1.blocks.conv3.conv.weight"]
    assert len(report.mismatched) == 1 and report.unexpected == []
    _assert_state_equal(
        model, _without_placeholders(sg_state),
        skip={"backbone.stage1.blocks.conv3.conv.weight", "backbone.stem.conv.branch_1x1.weight"},
    )


def test_prefers_ema_net_and_strips_module_prefix(model_s, sg_state):
    ema = {f"module.{k}": v for k, v in sg_state.items()}
    net = {k: torch.zeros_like(v) for k, v in ema.items()}
    load_super_gradients_checkpoint(model_s, {"net": net, "ema_net": ema, "epoch": 3})
    _assert_state_equal(model_s, _without_placeholders(sg_state))
    # a partial "module." prefix is not stripped: the keys are then unexpected/missing
    mixed = dict(sg_state)
    mixed["module.heads.head1.reg_pred.bias"] = mixed.pop("heads.head1.reg_pred.bias")
    with pytest.raises(RuntimeError, match="module.heads.head1.reg_pred.bias"):
        load_super_gradients_checkpoint(model_s, mixed)


def test_bad_files_are_named(model_s, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_super_gradients_checkpoint(model_s, tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_super_gradients_checkpoint(model_s, junk)
    torch.save({"epoch": 1, "acc": 0.5}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="nostate.pth.*no state dict"):
        load_super_gradients_checkpoint(model_s, tmp_path / "nostate.pth")


def test_new_class_count_keeps_everything_but_cls_pred(ckpt_path, sg_state, caplog):
    with caplog.at_level(logging.INFO):
        model = create_model("yolo_nas_s", num_classes=3, checkpoint=ckpt_path, class_names=["a", "b", "c"])
    records = [r for r in caplog.records if r.name.startswith("detectkit")]
    assert len(records) == 1
    assert "80 classes" in records[0].getMessage() and "has 3" in records[0].getMessage()
    assert model.num_classes == 3 and model.class_names == ["a", "b", "c"]
    cls_keys = {f"heads.head{i}.cls_pred.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    _assert_state_equal(model, _without_placeholders(sg_state), skip=cls_keys)
    for i, c in zip((1, 2, 3), (64, 128, 256)):
        head = getattr(model.heads, f"head{i}")
        assert head.cls_pred.weight.shape == (3, c, 1, 1)
        assert torch.allclose(head.cls_pred.bias, torch.full((3,), PRIOR_BIAS))
    with torch.no_grad():
        boxes, scores = model.eval()(torch.rand(1, 3, 64, 64))
    assert scores.shape == (1, 84, 3) and boxes.shape == (1, 84, 4)


def test_own_state_dict_round_trip_unfused_and_fused(model_s, sg_state, tmp_path):
    load_super_gradients_checkpoint(model_s, sg_state)
    torch.save(model_s.state_dict(), tmp_path / "ours.pt")
    again = create_model("yolo_nas_s", checkpoint=tmp_path / "ours.pt")
    _assert_state_equal(again, model_s.state_dict())

    fused_sd = again.eval().fuse(full=True).state_dict()
    assert any(".rbr_reparam." in k for k in fused_sd)
    target = empty_model("yolo_nas_s").eval().fuse(full=True)
    load_super_gradients_checkpoint(target, fused_sd)  # rbr_reparam is real here: no branches beside it
    _assert_state_equal(target, fused_sd)
    with pytest.raises(RuntimeError, match="fused the same way"):
        load_super_gradients_checkpoint(empty_model("yolo_nas_s"), fused_sd)


# ------------------------------------------------ M and L in super-gradients' checkpoint layout

# Block counts from super-gradients' recipes/arch_params/yolo_nas_{m,l}_arch_params.yaml (S for the check
# against the real fixture file): backbone stages, then neck1..neck4.
RECIPES = {
    "yolo_nas_s": ([2, 3, 5, 2], [2, 2, 2, 2]),
    "yolo_nas_m": ([2, 3, 5, 2], [2, 3, 2, 3]),
    "yolo_nas_l": ([2, 3, 5, 2], [4, 4, 4, 4]),
}


def sg_key_count(stages: list[int], neck: list[int]) -> tuple[int, int]:
    """(state-dict keys, rbr_reparam placeholder keys) of SG's YoloNAS, counted from its module tree.

    QARepVGGBlock: branch_3x3.conv.weight + branch_3x3.bn (5) + branch_1x1 w/b + post_bn (5)
    + rbr_reparam w/b = 15; Conv (conv + bn) = 6; YoloNASBottleneck alpha = 1; CSP layer = 3 Conv;
    up stage = reduce_skip1/2, conv, downsample, reduce_after_concat (5 Conv) + ConvTranspose (2);
    down stage = 1 Conv; DFL head = stem, cls_convs.0, reg_convs.0 (3 Conv) + cls_pred/reg_pred (4).
    """
    qa, conv, alpha = 15, 6, 1
    n_qa = 1 + sum(1 + 2 * n for n in stages) + sum(2 * n for n in neck[:2])
    backbone = qa + sum(qa + 3 * conv + n * (alpha + 2 * qa) for n in stages) + 2 * conv
    up = sum(5 * conv + 2 + 3 * conv + n * (alpha + 2 * qa) for n in neck[:2])
    down = sum(conv + 3 * conv + n * (alpha + 2 * conv) for n in neck[2:])
    heads = 3 * (3 * conv + 4)
    return backbone + up + down + heads, 2 * n_qa


def to_sg_layout(state: dict[str, torch.Tensor]) -> dict:
    """Our state dict -> a super-gradients training checkpoint: rbr_reparam placeholders (junk
    values, as in SG files) next to every QARepVGG block's branches, DDP ``module.`` prefix."""
    out = {}
    for k, v in state.items():
        out[f"module.{k}"] = v
        if k.endswith(".branch_3x3.conv.weight"):
            block = k[: -len(".branch_3x3.conv.weight")]
            out[f"module.{block}.rbr_reparam.weight"] = torch.full_like(v, float("nan"))
            out[f"module.{block}.rbr_reparam.bias"] = torch.full((v.shape[0],), float("nan"))
    return {"net": out, "epoch": 299, "acc": torch.tensor(0.5)}


def test_key_count_formula_matches_real_sg_file(sg_state):
    assert sg_key_count(*RECIPES["yolo_nas_s"]) == (921, 74) == (
        len(sg_state), sum(".rbr_reparam." in k for k in sg_state)
    )


@pytest.mark.parametrize("variant", ["yolo_nas_m", "yolo_nas_l"])
def test_loads_sg_layout_m_and_l(variant):
    src = empty_model(variant)
    state = src.state_dict()
    for i, t in enumerate(state.values()):
        t.fill_(i % 97)  # distinct per key so a mix-up would show
    ckpt = to_sg_layout(state)
    keys, placeholders = sg_key_count(*RECIPES[variant])
    assert len(ckpt["net"]) == keys
    assert sum(".rbr_reparam." in k for k in ckpt["net"]) == placeholders

    dst = empty_model(variant)
    for t in dst.state_dict().values():
        t.fill_(-1)
    assert load_super_gradients_checkpoint(dst, ckpt) == ([], [], [], [])
    _assert_state_equal(dst, state)
    assert isinstance(dst, YoloNAS) and dst.cfg == CONFIGS[variant]


def test_pretrained_argument(ckpt_path, sg_state, tmp_path, monkeypatch):
    model = create_model("yolo_nas_s", pretrained=ckpt_path)  # a local file path
    _assert_state_equal(model, _without_placeholders(sg_state))
    monkeypatch.setenv("DETECTKIT_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="yolo_nas_s_coco.pth"):  # tag not cached, no download
        create_model("yolo_nas_s", pretrained="coco", download=False)
    with pytest.raises(ValueError, match="not both"):
        create_model("yolo_nas_s", checkpoint=ckpt_path, pretrained="coco")
    with pytest.raises(ValueError, match="2 class_names for num_classes=80"):
        create_model("yolo_nas_s", class_names=["a", "b"])
