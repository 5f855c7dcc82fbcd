"""Latency-aware layer budgets: onnxruntime per-unit time and MACs, and how they shift the cut."""

from __future__ import annotations

import pytest
import torch
from compress_helpers import TinyDetector

from detectkit.compress.latency import latency_weights, module_path, unit_latency
from detectkit.compress.sensitivity import budget_weights, layerwise_prune
from detectkit.modules import OptimConfig

pytest.importorskip("onnxruntime")

UNITS = ["stem", "rep", "down1", "down2"]
SUBUNITS = ["stem.0", "stem.2", "rep.rbr_reparam", "down1.conv"]  # indexed and nested names


def test_unit_latency_credits_time_and_macs_to_each_unit():
    torch.manual_seed(0)
    model = TinyDetector(width=16).eval()
    profile = unit_latency(model, UNITS, image_size=64, threads=1, runs=2)
    assert set(profile) == set(UNITS)
    assert all(ms > 0 for ms, _ in profile.values())  # every unit's nodes were found in the ONNX profile
    # stem at 64 px: 3->16 (32x32 out), 16->16 (16x16), 16->32 (8x8), all 3x3
    assert profile["stem"][1] == 32 * 32 * 16 * 27 + 16 * 16 * 16 * 144 + 8 * 8 * 32 * 144
    weights = latency_weights(profile)
    macs = {u: m for u, (_, m) in profile.items()}
    # the multipliers are time-per-MAC relative to the model's: their MACs-weighted mean is 1
    assert sum(macs[u] * weights[u] for u in UNITS) / sum(macs.values()) == pytest.approx(1.0)
    assert latency_weights(profile, strength=0.0) == dict.fromkeys(UNITS, 1.0)
    assert model.rep.rbr_reparam is None  # profiled on a copy: the model itself is not fused
    model.rep.partial_fusion()  # the form the pruning callback profiles (rbr_reparam exists)
    assert all(ms > 0 for ms, _ in unit_latency(model, SUBUNITS, image_size=64, runs=1).values())


def test_onnx_node_names_map_to_module_paths():
    assert module_path("/backbone/stage1/blocks/conv1/act/Relu") == "backbone.stage1.blocks.conv1.act.Relu"
    assert module_path("/stem/stem.0/conv/Conv") == "stem.0.conv.Conv"
    assert module_path("/heads/head1/cv2.0/cv2.0.1/conv/Conv") == "heads.head1.cv2.0.1.conv.Conv"


def test_slow_units_get_a_larger_share_of_the_cut_at_equal_sensitivity():
    ranking = [("a", 0.1), ("b", 0.1), ("c", 0.1)]
    assert budget_weights(ranking) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    w = budget_weights(ranking, latency={"a": 3.0, "b": 1.0})
    assert w["a"] > w["b"] == pytest.approx(w["c"])
    assert sum(w.values()) / 3 == pytest.approx(1.0)


def test_layerwise_prune_with_a_latency_profile_reaches_the_macs_target():
    torch.manual_seed(0)
    model = TinyDetector(width=16).eval()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.rand(2, 3, 64, 64, generator=g) for _ in range(2)]
    result = layerwise_prune(model, inputs, macs_ratio=0.6, num_batches=2, image_size=64, round_to=None,
                             latency_size=64)
    assert result["macs"] <= 0.6 * result["base_macs"]
    assert set(result["latency"]) == set(result["weights"])
    boxes, scores = model.eval()(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(boxes).all() and scores.shape[-1] == 3


def test_structured_pruning_latency_aware_in_a_fit(tmp_path):
    """The callback profiles the model in onnxruntime once, folds time-per-MAC into the unit
    weights it keeps in its state, and still reaches the MACs target."""
    from compress_helpers import tiny_datamodule, tiny_trainer
    from detectkit.callbacks import StructuredPruning

    from detectkit.compress.prune import count_macs_params
    from detectkit.modules.detector import DetectionModule

    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(num_classes=3, width=16), num_classes=3,
                             optim=OptimConfig(lr=1e-3, warmup_steps=1))
    base = count_macs_params(module.model, 64)[0]
    kwargs = dict(target_macs_ratio=0.6, steps=1, image_size=64, round_to=None, layerwise=True, calib_batches=1)
    prune = StructuredPruning(**kwargs, latency_size=64)
    tiny_trainer(tmp_path, [prune], max_epochs=1, train_batches=1).fit(module, datamodule=tiny_datamodule(tmp_path / "d"))
    assert count_macs_params(module.model, 64)[0] <= 0.6 * base
    ranked = budget_weights(prune.sensitivity, prune.layerwise_strength)
    assert set(prune.unit_weights) == set(ranked)
    assert prune.unit_weights != pytest.approx(ranked)  # the latency profile changed the budgets
