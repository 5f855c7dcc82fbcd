"""Speed options (channels_last, torch.compile) give the same results as the default eager path.

channels_last runs the real YOLO-NAS-S and YOLO-World-S at 64 px. torch.compile (inductor) of a
full detector takes minutes on the 2-core test machine, so the compile path is exercised on a
small real ``Detector`` (conv + BN + SiLU stem, DFL head) through the same ``DetectionModule``
code path (``run_model`` -> ``CompiledForward``); the benchmarks compile the full models.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from detectkit.models.base import Detector
from detectkit.models.outputs import HeadOutput
from detectkit.models.speed import CompiledForward, SpeedConfig, compile_options
from detectkit.modules import DetectionModule, OptimConfig
from detectkit.ops.boxes import make_anchors


def _targets(size: int) -> torch.Tensor:
    s = float(size)
    return torch.tensor([[0, 0, 0.1 * s, 0.2 * s, 0.6 * s, 0.7 * s], [1, 1, 0.3 * s, 0.3 * s, 0.9 * s, 0.8 * s],
                         [1, 0, 0.0, 0.5 * s, 0.4 * s, 0.95 * s]])


def _step(module: DetectionModule, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One real training step (forward, loss, backward, optimizer step) outside a Trainer. SGD, not
    AdamW: Adam's first step is ``lr * sign(grad)``, which turns float noise in a ~0 gradient into a
    full ``lr`` difference; SGD's update difference is ``lr`` times the gradient difference."""
    module.train()
    opt = torch.optim.SGD(module.model.parameters(), lr=0.01, momentum=0.9)
    head = module.run_model(images)
    loss, _ = module.compute_loss(head, targets, images.shape[0])
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}
    opt.step()
    return loss.detach(), grads, {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _assert_same_step(a: tuple, b: tuple) -> None:
    """Same loss, gradients within float tolerance of each tensor's scale (summation order differs
    between memory layouts and kernels), hence the same weights after the step."""
    (loss_a, grads_a, params_a), (loss_b, grads_b, params_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k, g in grads_a.items():
        scale = float(g.abs().max()) + 1e-6
        assert float((grads_b[k] - g).abs().max()) <= 2e-3 * scale, k
    for k, v in params_a.items():
        tol = 0.01 * 2e-3 * (float(grads_a[k].abs().max()) + 1e-6) + 1e-6 if k in grads_a else 1e-5
        torch.testing.assert_close(params_b[k], v, rtol=0, atol=tol)


def _pair(name: str, **options) -> tuple[DetectionModule, DetectionModule]:
    """Two modules with the same weights, in float64: at 64 px and batch 2 the deepest BatchNorms
    normalise over 8 values and amplify fp32 summation-order noise past any useful tolerance; in
    float64 the two paths must agree to ~1e-9, which tests the same arithmetic tightly."""
    torch.manual_seed(0)
    base = DetectionModule(name, num_classes=2).double()
    fast = DetectionModule(name, num_classes=2, **options).double()
    fast.model.load_state_dict(base.model.state_dict())
    return base, fast


@pytest.mark.parametrize("name", ["yolo_nas_s", "yolo_world_v2_s"])
def test_channels_last_matches_contiguous(name):
    base, fast = _pair(name, speed=SpeedConfig(channels_last=True))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = _targets(64)

    step_a, step_b = _step(base, images, targets), _step(fast, images, targets)
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.model.parameters() if p.dim() == 4), "the model was not converted"
    # the RGB stem stays NCHW (torch 2.14.1 crashes in its channels_last backward; see models/speed.py)
    assert all(m.weight.is_contiguous() for m in fast.model.modules()
               if isinstance(m, nn.Conv2d) and m.in_channels <= 4)
    _assert_same_step(step_a, step_b)

    base.eval(), fast.eval()
    dets_a = base.detect(images)
    dets_b = fast.detect(images)
    for a, b in zip(dets_a, dets_b):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)
    # fp32 eval forward (running statistics, oneDNN kernels on CPU): same boxes and scores
    base.float(), fast.float()
    with torch.no_grad():
        boxes_a, scores_a = base.run_model(images.float())
        boxes_b, scores_b = fast.run_model(images.float())
    torch.testing.assert_close(scores_b, scores_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(boxes_b, boxes_a, rtol=1e-4, atol=1e-3)
    # the checkpointed weights are the same tensors whatever their memory layout
    assert set(fast.state_dict()) == set(base.state_dict())


def test_channels_last_follows_weights_replaced_between_epochs():
    """A pruning step swaps a conv's weight for a new (NCHW) tensor in the same module; a replay swaps
    the whole model. Both are back in channels_last when the next epoch starts, and the layout
    bookkeeping never enters the checkpoint."""
    module = DetectionModule("yolo_nas_s", num_classes=2, speed=SpeedConfig(channels_last=True))
    module.run_model(torch.rand(1, 3, 64, 64))
    def a_3x3_conv() -> nn.Conv2d:
        return next(m for m in module.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 4
                    and m.kernel_size == (3, 3))

    conv = a_3x3_conv()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    conv.weight.data = conv.weight.data.contiguous()  # a new NCHW tensor, as a pruning step leaves
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    module.on_train_epoch_start()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    module.model = copy.deepcopy(module.model).to(memory_format=torch.contiguous_format)  # a replay
    assert not a_3x3_conv().weight.is_contiguous(memory_format=torch.channels_last)
    module.run_model(torch.rand(1, 3, 64, 64))
    assert a_3x3_conv().weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(k.startswith("_layout_of") for k in module.state_dict())


class _TinyDetector(Detector):
    """A small real detector (stride-8 conv stem, BN, SiLU, DFL + class head) for the compile test."""

    strides = (8,)
    default_loss = "ppyoloe"

    def __init__(self, num_classes: int = 2, bins: int = 8) -> None:
        super().__init__(num_classes, bins)
        self.bins = bins
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 8, 8, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
                                  nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.cls = nn.Conv2d(16, num_classes, 1)
        self.reg = nn.Conv2d(16, 4 * bins, 1)

    def head_forward(self, x: torch.Tensor) -> HeadOutput:
        f = self.stem(x)
        anchors, strides = make_anchors([f.shape[2:]], self.strides, device=x.device, dtype=f.dtype)
        return HeadOutput(self.cls(f).flatten(2).transpose(1, 2), self.reg(f).flatten(2).transpose(1, 2),
                          anchors, strides, self.bins, (f,))


@pytest.mark.slow
def test_compile_matches_eager_and_keeps_the_module_plain():
    torch.manual_seed(0)
    base = DetectionModule(_TinyDetector(), optim=OptimConfig(warmup_steps=0))
    fast = DetectionModule(copy.deepcopy(base.model), optim=OptimConfig(warmup_steps=0),
                           speed=SpeedConfig(compile={"dynamic": False}, channels_last=True))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = _targets(64)

    _assert_same_step(_step(base, images, targets), _step(fast, images, targets))
    base.eval(), fast.eval()
    for a, b in zip(base.detect(images), fast.detect(images)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

    # the compiled wrapper is not a submodule: the checkpoint keys are the plain model's
    assert set(fast.state_dict()) == set(base.state_dict())


def test_a_copy_of_a_compiled_module_runs_its_own_parameters():
    """An EMA-style deep copy compiles its own weights, never calls the original's (dynamo only:
    the wrapper logic does not depend on the inductor backend)."""
    torch.manual_seed(0)
    fast = DetectionModule(_TinyDetector(), speed=SpeedConfig(compile={"backend": "eager"})).eval()
    images = torch.rand(1, 3, 32, 32)
    _, scores = fast.run_model(images)
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        for p in twin.model.parameters():
            p.zero_()
    _, scores_twin = twin.run_model(images)
    torch.testing.assert_close(scores_twin, torch.full_like(scores_twin, 0.5))  # zero weights: logit 0
    torch.testing.assert_close(fast.run_model(images)[1], scores)
    assert twin._compiled is not fast._compiled and twin._compiled._target is twin.model


def test_compile_option_is_checked():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"mode": "reduce-overhead"}) == {"mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="unknown torch.compile arguments \\['modes'\\]"):
        DetectionModule(_TinyDetector(), speed=SpeedConfig(compile={"modes": "max-autotune"}))
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        compile_options("yes")
    assert repr(copy.deepcopy(CompiledForward({"dynamic": True}))) == "CompiledForward({'dynamic': True})"


def test_recipe_keys_reach_the_module(capsys):
    """``model.speed.channels_last`` / ``model.speed.compile`` are LightningCLI keys (documented in the
    recipes); the old flat ``--model.channels_last`` names its new place."""
    from pathlib import Path

    import yaml

    from detectkit.cli import main

    recipe = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(recipe), "--model.speed.channels_last", "true", "--model.speed.compile",
              "{dynamic: true, mode: max-autotune}", "--print_config"])
    assert e.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["speed"]["channels_last"] is True
    assert model["speed"]["compile"] == {"dynamic": True, "mode": "max-autotune"}
    assert main(["fit", "--config", str(recipe), "--model.channels_last", "true", "--print_config"]) == 1
    assert "--model.channels_last moved to --model.speed.channels_last" in capsys.readouterr().err
