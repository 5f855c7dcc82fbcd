"""Latency-aware layer budgets: onnxruntime per-unit time and MACs, and how they shift the cut."""

from __future__ import annotations

import pytest
import torch
from compress_helpers import TinyDetector

from detectkit.compress.latency import latency_weights, unit_latency
from detectkit.compress.prune import layerwise_prune
from detectkit.compress.sensitivity import budget_weights

pytest.importorskip("onnxruntime")

UNITS = ["stem", "rep", "down1", "down2"]


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
