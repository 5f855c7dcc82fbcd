"""ultralytics checkpoints: strict state-dict mapping (s/m/l/x) and the restricted `.pt` reader."""

from __future__ import annotations

import math
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from detectkit import create_model
from detectkit.models.yolo_world import YoloWorld
from detectkit.models.yolo_world.weights import (
    CheckpointMismatchError,
    load_ultralytics_state_dict,
    load_weights,
    read_ultralytics_pt,
    to_ultralytics,
)

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "yolo_world_s_parity"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"shared test data absent: {FIXTURE}")

# --------------------------------------------------------------------------- ultralytics key layout
# yolov8-worldv2.yaml read as data: (from, repeats, module, args); scales (depth, width, max_channels)
SCALES = {"s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768), "l": (1.0, 1.0, 512), "x": (1.0, 1.25, 512)}
LAYERS = [
    (-1, 1, "Conv", [64, 3, 2]),
    (-1, 1, "Conv", [128, 3, 2]),
    (-1, 3, "C2f", [128, True]),
    (-1, 1, "Conv", [256, 3, 2]),
    (-1, 6, "C2f", [256, True]),
    (-1, 1, "Conv", [512, 3, 2]),
    (-1, 6, "C2f", [512, True]),
    (-1, 1, "Conv", [1024, 3, 2]),
    (-1, 3, "C2f", [1024, True]),
    (-1, 1, "SPPF", [1024, 5]),
    (-1, 1, "Upsample", []),
    ([-1, 6], 1, "Concat", []),
    (-1, 3, "C2fAttn", [512, 256, 8]),
    (-1, 1, "Upsample", []),
    ([-1, 4], 1, "Concat", []),
    (-1, 3, "C2fAttn", [256, 128, 4]),
    (15, 1, "Conv", [256, 3, 2]),
    ([-1, 12], 1, "Concat", []),
    (-1, 3, "C2fAttn", [512, 256, 8]),
    (-1, 1, "Conv", [512, 3, 2]),
    ([-1, 9], 1, "Concat", []),
    (-1, 3, "C2fAttn", [1024, 512, 16]),
    ([15, 18, 21], 1, "WorldDetect", []),
]
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def ultralytics_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    depth, width, max_ch = SCALES[variant]
    shapes: dict[str, tuple[int, ...]] = {}

    def div8(c: float) -> int:
        return math.ceil(c / 8) * 8

    def conv(p: str, cin: int, cout: int, k: int) -> None:
        shapes[f"{p}.conv.weight"] = (cout, cin, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{p}.bn.{name}"] = (cout,)
        shapes[f"{p}.bn.num_batches_tracked"] = ()

    chans: list[int] = []
    for i, (src, n, module, args) in enumerate(LAYERS):
        p = f"model.{i}"
        n = max(round(n * depth), 1) if n > 1 else n
        cin = (chans[src] if chans else 3) if isinstance(src, int) else None
        if module in ("Conv", "C2f", "SPPF", "C2fAttn"):
            cout = div8(min(args[0], max_ch) * width)
        if module == "Conv":
            conv(p, cin, cout, args[1])
        elif module in ("C2f", "C2fAttn"):
            c = cout // 2
            extra = 1 if module == "C2fAttn" else 0
            conv(f"{p}.cv1", cin, 2 * c, 1)
            conv(f"{p}.cv2", (2 + n + extra) * c, cout, 1)
            for j in range(n):
                conv(f"{p}.m.{j}.cv1", c, c, 3)
                conv(f"{p}.m.{j}.cv2", c, c, 3)
            if module == "C2fAttn":
                ec = div8(min(args[1], max_ch // 2) * width)
                nh = int(max(round(min(args[2], max_ch // 2 // 32)) * width, 1))
                shapes[f"{p}.attn.gl.weight"], shapes[f"{p}.attn.gl.bias"] = (ec, 512), (ec,)
                shapes[f"{p}.attn.bias"] = (nh,)
                conv(f"{p}.attn.proj_conv", c, c, 3)
                if c != ec:
                    conv(f"{p}.attn.ec", c, ec, 1)
        elif module == "SPPF":
            conv(f"{p}.cv1", cin, cin // 2, 1)
            conv(f"{p}.cv2", cin // 2 * 4, cout, 1)
        elif module == "Upsample":
            cout = cin
        elif module == "Concat":
            cout = sum(chans[s] for s in src)
        elif module == "WorldDetect":
            ch = [chans[s] for s in src]
            c2, c3 = max(16, ch[0] // 4, 64), max(ch[0], min(80, 100))
            for lvl, cl in enumerate(ch):
                for branch, width_b, out in (("cv2", c2, 64), ("cv3", c3, 512)):
                    conv(f"{p}.{branch}.{lvl}.0", cl, width_b, 3)
                    conv(f"{p}.{branch}.{lvl}.1", width_b, width_b, 3)
                    shapes[f"{p}.{branch}.{lvl}.2.weight"], shapes[f"{p}.{branch}.{lvl}.2.bias"] = (
                        (out, width_b, 1, 1),
                        (out,),
                    )
                for name in ("weight", "bias", "running_mean", "running_var"):
                    shapes[f"{p}.cv4.{lvl}.norm.{name}"] = (512,)
                shapes[f"{p}.cv4.{lvl}.norm.num_batches_tracked"] = ()
                shapes[f"{p}.cv4.{lvl}.bias"], shapes[f"{p}.cv4.{lvl}.logit_scale"] = (1,), ()
            shapes[f"{p}.dfl.conv.weight"] = (1, 16, 1, 1)
            cout = 0
        chans.append(cout)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("dfl.conv.weight"):
            state[key] = torch.arange(16.0).reshape(shape)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


@needs_fixture
def test_key_reading_matches_the_fixture() -> None:
    fixture = torch.load(FIXTURE / "state_dict.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in fixture.items()} == ultralytics_shapes("s")


@pytest.mark.parametrize("variant", ["s", "m", "l", "x"])
def test_strict_load_ultralytics_layout(variant: str) -> None:
    shapes = ultralytics_shapes(variant)
    expected_params = {"s": 12_759_880, "m": 28_376_158, "l": 46_832_050, "x": 72_886_377}[variant]
    assert sum(math.prod(s) for k, s in shapes.items() if not k.endswith(BN_BUFFERS)) == expected_params
    state = random_state(shapes, seed=ord(variant))
    model = YoloWorld(variant)
    load_ultralytics_state_dict(model, state)
    back = to_ultralytics(model.state_dict())
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key].to(value.dtype), value), key


def test_mismatch_lists_every_problem() -> None:
    state = random_state(ultralytics_shapes("s"), seed=0)
    del state["model.21.attn.gl.bias"]
    state["model.30.conv.weight"] = torch.zeros(1)
    state["model.22.cv4.1.norm.weight"] = torch.zeros(256)
    with pytest.raises(CheckpointMismatchError) as err:
        load_ultralytics_state_dict(YoloWorld("s"), state)
    msg = str(err.value)
    assert "neck.bottom_up_p5.attn.gl.bias" in msg and "model.30.conv.weight" in msg
    assert "head.cv4.1.norm.weight: checkpoint (256,) vs model (512,)" in msg
    with pytest.raises(CheckpointMismatchError):  # an m checkpoint does not load into s
        load_ultralytics_state_dict(YoloWorld("s"), random_state(ultralytics_shapes("m"), seed=1))


# --------------------------------------------------------------------------- ultralytics .pt files
def _fake_ultralytics() -> dict[str, types.ModuleType]:
    """Modules named like ultralytics' (created for saving only; never importable at load time)."""
    mods = {
        name: types.ModuleType(name)
        for name in (
            "ultralytics",
            "ultralytics.nn",
            "ultralytics.nn.tasks",
            "ultralytics.nn.modules",
            "ultralytics.nn.modules.block",
        )
    }
    world = type("WorldModel", (nn.Module,), {"__module__": "ultralytics.nn.tasks"})
    block = type("C2fAttn", (nn.Module,), {"__module__": "ultralytics.nn.modules.block"})
    mods["ultralytics.nn.tasks"].WorldModel = world
    mods["ultralytics.nn.modules.block"].C2fAttn = block
    return mods


def _module_tree(state: dict[str, torch.Tensor], mods: dict[str, types.ModuleType]) -> nn.Module:
    root = mods["ultralytics.nn.tasks"].WorldModel()
    block = mods["ultralytics.nn.modules.block"].C2fAttn
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for name in path:
            if name not in node._modules:
                node.add_module(name, nn.Sequential() if name == "model" else block())
            node = node._modules[name]
        if leaf in BN_BUFFERS:
            node.register_buffer(leaf, value)
        else:
            node.register_parameter(
                leaf, nn.Parameter(value, requires_grad=leaf != "weight" or "dfl" not in key)
            )
    node.register_buffer("scratch", torch.zeros(3), persistent=False)  # must not be read
    root.add_module("act", nn.SiLU())
    return root


def _save_pt(path: Path, payload_fn) -> None:
    mods = _fake_ultralytics()
    sys.modules.update(mods)
    try:
        torch.save(payload_fn(mods), path)
    finally:
        for name in mods:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def fixture_state() -> dict[str, torch.Tensor]:
    if not FIXTURE.is_dir():
        pytest.skip(f"shared test data absent: {FIXTURE}")
    return torch.load(FIXTURE / "state_dict.pt", weights_only=True)


def test_read_ultralytics_pt_without_ultralytics(tmp_path, fixture_state, monkeypatch) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in fixture_state.items()}
    txt = torch.nn.functional.normalize(torch.randn(1, 3, 512), dim=-1)

    def payload(mods):
        ema = _module_tree(half, mods)
        ema.txt_feats = txt.half()
        ema.names = {0: "dog", 1: "person", 2: "bus"}
        ema.args = types.SimpleNamespace(data=Path("coco.yaml"), imgsz=640)
        decoy = _module_tree({"model.0.conv.weight": torch.zeros(2, 3, 3, 3).half()}, mods)
        return {
            "date": "2025-01-01",
            "version": "8.4.190",
            "epoch": -1,
            "model": decoy,
            "ema": ema,
            "optimizer": None,
            "train_args": {"model": "yolov8s-worldv2.yaml", "imgsz": 640},
            "train_metrics": {"metrics/mAP50(B)": np.float64(0.5)},
        }

    path = tmp_path / "yolov8s-worldv2.pt"
    _save_pt(path, payload)
    assert "ultralytics" not in sys.modules
    ckpt = read_ultralytics_pt(path)
    assert "ultralytics" not in sys.modules
    assert ckpt.state_dict.keys() == fixture_state.keys()  # ema chosen, non-persistent buffer skipped
    assert all(
        ckpt.state_dict[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype)
        for k, v in fixture_state.items()
    )
    assert ckpt.names == ["dog", "person", "bus"] and ckpt.txt_feats.shape == (3, 512)
    assert ckpt.meta["version"] == "8.4.190"

    model = create_model("yolo_world_v2_s", checkpoint=str(path))
    assert model.class_names == ["dog", "person", "bus"]
    back = to_ultralytics(model.state_dict())
    for key, value in half.items():
        assert torch.equal(back[key].to(value.dtype), value), key

    monkeypatch.setenv("DETECTKIT_WEIGHTS", str(tmp_path))  # the published file name, found in the cache
    cached = create_model("yolo_world_v2_s", pretrained="coco")
    assert cached.class_names == ["dog", "person", "bus"]
    assert torch.equal(cached.head.cv3[2][2].weight, model.head.cv3[2][2].weight)

    path_no_ema = tmp_path / "no_ema.pt"
    _save_pt(
        path_no_ema,
        lambda mods: {
            "model": _module_tree({"model.0.conv.weight": torch.ones(2, 3, 3, 3)}, mods),
            "ema": None,
        },
    )
    assert list(read_ultralytics_pt(path_no_ema).state_dict) == ["model.0.conv.weight"]


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit(target), "ema": None}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|os|nt)\.system"):
        read_ultralytics_pt(path)
    with pytest.raises(pickle.UnpicklingError):
        load_weights(YoloWorld("s"), path)
    assert not target.exists()


def test_own_state_dict_round_trip(tmp_path) -> None:
    src = YoloWorld("s")
    src.set_text_embeddings(torch.nn.functional.normalize(torch.randn(4, 512), dim=-1))
    path = tmp_path / "own.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = load_weights(YoloWorld("s"), path)
    assert dst.num_classes == 4
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        load_weights(dst, tmp_path / "missing.pt")
