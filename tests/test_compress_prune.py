"""detectkit.compress without Lightning: MACs-targeted pruning, sensitivity ranking, layer-wise budgets."""

from __future__ import annotations

import torch
from compress_helpers import TinyDetector

from detectkit.compress.prune import count_macs_params, prune_to_macs
from detectkit.compress.sensitivity import (
    budget_weights,
    layerwise_prune,
    pruning_sensitivity,
    recalibrate_batchnorm,
)
from detectkit.modules import OptimConfig

UNITS = ["stem.2", "rep", "down1", "down2"]


def _inputs(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(2, 3, 64, 64, generator=g) for _ in range(n)]


def test_prune_to_macs_target_without_lightning():
    torch.manual_seed(0)
    model = TinyDetector(width=16).eval()
    base, base_params = count_macs_params(model, 64)
    macs, params = prune_to_macs(model, 0.5 * base, increment=0.1, image_size=64, round_to=None)
    assert macs <= 0.5 * base and params < base_params
    assert count_macs_params(model, 64)[0] == macs  # the model itself shrank
    boxes, scores = model.eval()(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(boxes).all() and scores.shape[-1] == 3


def test_sensitivity_ranks_a_layer_with_dead_channels_last_and_gives_it_the_largest_budget():
    torch.manual_seed(0)
    model = TinyDetector(width=16).eval()
    recalibrate_batchnorm(model, _inputs())
    with torch.no_grad():  # half of down1's channels output act(0) = 0: pruning them costs nothing
        model.down1.bn.weight[:16] = 0
        model.down1.bn.bias[:16] = 0
    ranking = pruning_sensitivity(model, _inputs(), ratio=0.3, num_batches=2, units=UNITS, image_size=64,
                                  round_to=None)
    names = [n for n, _ in ranking]
    assert sorted(names) == sorted(UNITS)
    assert names[-1] == "down1" and ranking[-1][1] < 1e-4 < ranking[0][1]
    weights = budget_weights(ranking)
    assert max(weights, key=weights.get) == "down1"
    assert weights[names[0]] < 1.0 < weights["down1"]  # the most sensitive unit is cut below average


def test_layerwise_prune_spares_the_sensitive_unit():
    torch.manual_seed(0)
    model = TinyDetector(width=16).eval()
    with torch.no_grad():
        model.down1.bn.weight[:16] = 0
        model.down1.bn.bias[:16] = 0
    result = layerwise_prune(model, _inputs(), macs_ratio=0.6, num_batches=2, image_size=64, round_to=None)
    assert result["macs"] <= 0.6 * result["base_macs"]
    w = result["weights"]
    assert w["down1.conv"] == max(w.values())  # dead channels: the cheapest unit gives the most
    assert model.down1.conv.out_channels <= 20  # ... and loses most of its dead half


def test_structured_pruning_layerwise_in_a_fit(tmp_path):
    """The callback ranks units on training batches, prunes with their budgets, recalibrates BN,
    and keeps the ranking in its state (resume does not re-rank)."""
    from compress_helpers import tiny_datamodule, tiny_trainer
    from detectkit.callbacks import StructuredPruning

    from detectkit.modules.detector import DetectionModule

    torch.manual_seed(0)
    module = DetectionModule(TinyDetector(num_classes=3, width=16), num_classes=3,
                             optim=OptimConfig(lr=1e-3, warmup_steps=1))
    base = count_macs_params(module.model, 64)[0]
    prune = StructuredPruning(target_macs_ratio=0.6, steps=1, image_size=64, round_to=None, layerwise=True,
                              calib_batches=1)
    trainer = tiny_trainer(tmp_path, [prune], max_epochs=1, train_batches=1)
    trainer.fit(module, datamodule=tiny_datamodule(tmp_path / "data"))
    assert count_macs_params(module.model, 64)[0] <= 0.6 * base
    assert prune.unit_weights and set(prune.unit_weights) == {n for n, _ in prune.sensitivity}
    restored = StructuredPruning(target_macs_ratio=0.6, steps=1, layerwise=True)
    restored.load_state_dict(prune.state_dict())
    assert restored.unit_weights == prune.unit_weights and restored.steps_done == 1
