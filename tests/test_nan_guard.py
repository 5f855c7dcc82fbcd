"""NanGuard: a blown-up fit stops with its message and leaves only finite checkpoints."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from compress_helpers import TinyDetector
from detectkit.callbacks import NanGuard, NonFiniteLossError
from detectkit.callbacks.nan_guard import NonFiniteWeightsError, nonfinite_tensors
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from module_helpers import float_state, tiny_data, trainer

from detectkit.modules.detector import DetectionModule
from detectkit.modules.ema import ModelEMA


def _module(lr: float, cls: type = DetectionModule) -> DetectionModule:
    """A real detector small enough to save a checkpoint every step (BatchNorm, QARepVGG, DFL head)."""
    torch.manual_seed(0)
    # the first step at 1e-4, then the warmup jumps to 5e5 and 1e6: a blow-up after one good step
    return cls(TinyDetector(num_classes=2), class_names=["a", "b"], lr=lr, warmup_steps=3, warmup_initial_lr=1e-4)


def _all_finite(ckpt: dict) -> bool:
    for key in ("state_dict", "current_model_state"):
        for v in ckpt.get(key, {}).values():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                return False
    return True


def test_lr_1e6_stops_with_message_and_only_finite_checkpoints(tmp_path: Path) -> None:
    guard = NanGuard(max_consecutive=3)
    ckpt_dir = tmp_path / "checkpoints"
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True)
    t = trainer(tmp_path, [ModelEMA(decay=0.9), guard, saver], max_epochs=20, limit_val_batches=0,
                enable_checkpointing=True)
    module = _module(lr=1e6)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps \(the last at global step \d+, epoch \d+\)"):
        t.fit(module, datamodule=tiny_data(tmp_path, n_train=4, batch_size=1))
    assert guard.consecutive == 3 and guard.nonfinite_steps >= 3
    # the skipped steps changed nothing: live weights and BatchNorm statistics are all finite
    assert not nonfinite_tensors(module.state_dict())
    files = sorted(ckpt_dir.glob("*.ckpt"))
    assert len(files) >= 2 and (ckpt_dir / "last.ckpt").is_file(), files
    for f in files:  # no checkpoint with a non-finite weight anywhere in the run folder
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
        assert _all_finite(ckpt), f
        assert ckpt["callbacks"]  # the guard's counters travel with the checkpoint
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("NanGuard"))
    assert state["nonfinite_steps"] >= 1
    _module(lr=1e-3).load_state_dict(last["state_dict"])  # intact: loads back into the module


def test_without_guard_the_same_fit_goes_nan(tmp_path: Path) -> None:
    """The control: the fit above really produces NaN weights when nothing guards it."""
    t = trainer(tmp_path, [], max_steps=4, limit_val_batches=0)
    module = _module(lr=1e6)
    t.fit(module, datamodule=tiny_data(tmp_path, n_train=4, batch_size=1))
    assert nonfinite_tensors(module.state_dict())


def test_refuses_to_write_nonfinite_checkpoint(tmp_path: Path) -> None:
    guard, ema = NanGuard(), ModelEMA(decay=0.9)
    t = trainer(tmp_path, [guard, ema], max_steps=1, limit_val_batches=0)
    module = _module(lr=1e-3)
    t.fit(module, datamodule=tiny_data(tmp_path, n_train=2, batch_size=1))
    t.save_checkpoint(tmp_path / "ok.ckpt")  # finite: written
    assert (tmp_path / "ok.ckpt").is_file()
    with torch.no_grad():  # only the EMA copy is bad (the guard runs before the EMA swaps it in)
        next(ema.averaged_module.parameters()).fill_(math.inf)
    with pytest.raises(NonFiniteWeightsError, match=r"at global step 1 \(epoch \d\): 1 tensors of the ModelEMA average"):
        t.save_checkpoint(tmp_path / "bad.ckpt")
    with torch.no_grad():
        next(ema.averaged_module.parameters()).zero_()
        next(module.model.parameters()).fill_(math.nan)
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to write a checkpoint at global step 1 .*model\.stem"):
        t.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_skip_restores_buffers_and_keeps_weights(tmp_path: Path) -> None:
    """A single bad step (NaN inputs) is skipped: weights, AdamW state and BN statistics unchanged,
    and training goes on afterwards."""

    class NanOnce(DetectionModule):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            if self.global_step == 1 and batch_idx == 1:
                self._before = float_state(self)
                batch = {**batch, "images": torch.full_like(batch["images"], math.nan)}
            return super().training_step(batch, batch_idx)

    guard = NanGuard(max_consecutive=2)
    module = _module(lr=1e-3, cls=NanOnce)

    class Probe(ModelEMA):  # records the weights right after the skipped step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if batch_idx == 1:
                self.after = float_state(pl_module)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    probe = Probe(decay=0.9)
    t = trainer(tmp_path, [guard, probe], max_steps=3, limit_val_batches=0)
    t.fit(module, datamodule=tiny_data(tmp_path, n_train=3, batch_size=1))
    assert guard.nonfinite_steps == 1 and guard.consecutive == 0 and t.global_step == 3
    for k, v in module._before.items():
        torch.testing.assert_close(probe.after[k], v, msg=k)  # running stats included
    assert not nonfinite_tensors(module.state_dict())
    assert not nonfinite_tensors(probe.averaged_module.state_dict())


def test_state_dict_roundtrip() -> None:
    g = NanGuard()
    g.nonfinite_steps, g.consecutive = 7, 2
    h = NanGuard()
    h.load_state_dict(g.state_dict())
    assert (h.nonfinite_steps, h.consecutive) == (7, 2)
    with pytest.raises(ValueError, match="max_consecutive"):
        NanGuard(max_consecutive=0)


class _NanOnRank1(DetectionModule):
    """NaN images on rank 1 only, at its second step."""

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        if self.global_rank == 1 and self.global_step == 1:
            batch = {**batch, "images": torch.full_like(batch["images"], math.nan)}
        return super().training_step(batch, batch_idx)


class _Record(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, NanGuard))
        weights = sum(float(p.double().sum()) for p in pl_module.parameters())  # BN statistics are per rank
        Path(self.out, f"rank{trainer.global_rank}.txt").write_text(f"{guard.nonfinite_steps} {weights!r}")


@pytest.mark.slow  # two spawned gloo processes: ~15 s idle, most of it importing torch twice
def test_ddp_ranks_take_the_same_decision(tmp_path: Path) -> None:
    """Only rank 1 sees a NaN loss (gradient check off, so only the all-reduced flag can tell
    rank 0): both ranks skip that step and end with the same weights (a rank that stepped alone
    would diverge from the other)."""
    module = _module(lr=1e-3, cls=_NanOnRank1)
    guard = NanGuard(check_gradients=False)
    t = trainer(tmp_path, [guard, _Record(str(tmp_path))], max_steps=3, limit_val_batches=0,
                strategy="ddp_spawn", devices=2)
    t.fit(module, datamodule=tiny_data(tmp_path, n_train=8, batch_size=1))
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0[0] == r1[0] == "1"
    assert r0[1] == r1[1] and math.isfinite(float(r0[1]))


def test_detectkit_fit_stops_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``detectkit fit`` (which adds NanGuard by default; here configured to stop sooner) at lr 1e6:
    exit 1 with the guard's message as one line, no traceback. (The checkpoints are checked above.)"""
    from detectkit.cli import main

    root = Path(__file__).resolve().parents[1]
    code = main([
        "fit", "--config", str(root / "experiments" / "quickstart.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.cache_dir", str(tmp_path / "data"), "--data.image_size", "64", "--data.synthetic.size", "64",
        "--data.synthetic.train_images", "4", "--data.synthetic.val_images", "2", "--data.loader.batch_size", "1",
        "--data.loader.num_workers", "0", "--trainer.max_epochs", "3",
        "--model.optim.lr", "1e6", "--model.optim.warmup_steps", "3", "--model.optim.warmup_initial_lr", "1e-4",
        "--trainer.callbacks+=detectkit.callbacks.NanGuard", "--trainer.callbacks.max_consecutive", "3",
    ])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert re.fullmatch(r"detectkit fit: error: NanGuard: .* NaN/Inf for 3 consecutive steps \(the last at global "
                        r"step \d+, epoch \d\); the fit stops\..*", err[-1]), err[-3:]
    assert not any("Traceback" in line for line in err)
