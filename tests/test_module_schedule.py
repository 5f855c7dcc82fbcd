"""LR schedule (SG LinearBatchLRWarmup + CosineLRScheduler) and AdamW parameter groups."""

import math

import pytest
import torch
import torch.nn as nn

from detectkit.modules.detector import param_groups
from detectkit.modules.schedule import warmup_cosine_factor, warmup_cosine_scheduler


def _lrs(total, warmup, lr=2e-4, start=1e-6, final=0.1):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = warmup_cosine_scheduler(opt, total, warmup, start, final)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_from_initial_lr_to_lr():
    lrs = _lrs(total=100, warmup=11)
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] == pytest.approx(2e-4)  # np.linspace(..., endpoint=True) as in SG
    steps = [b - a for a, b in zip(lrs[:10], lrs[1:11])]
    assert max(steps) == pytest.approx(min(steps))
    assert lrs[5] == pytest.approx(1e-6 + (2e-4 - 1e-6) * 5 / 10)


def test_cosine_follows_sg_formula_and_ends_at_final_ratio():
    total, warmup, lr = 100, 10, 2e-4
    lrs = _lrs(total=total, warmup=warmup, lr=lr)
    t_max = total - warmup
    for step in (10, 40, 99):
        t = step - warmup
        sg = 0.5 * lr * (1 + math.cos(t / (t_max + 1) * math.pi)) * (1 - 0.1) + lr * 0.1
        assert lrs[step] == pytest.approx(sg)
    assert lrs[10] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1 * lr, rel=0.02)  # ends at final_lr_ratio * lr
    assert warmup_cosine_factor(10_000, total, warmup, 0.0, 0.1) == pytest.approx(0.1, rel=0.01)


def test_no_warmup_starts_at_lr():
    lrs = _lrs(total=20, warmup=0)
    assert lrs[0] == pytest.approx(2e-4)


def test_param_groups_no_decay_on_bias_and_norm():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1, bias=True), nn.GroupNorm(2, 4))
    groups = {g["name"]: g for g in param_groups(net, 1e-5)}
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 1e-5 and groups["no_decay"]["weight_decay"] == 0.0
    assert decay == {id(net[0].weight), id(net[3].weight)}
    assert no_decay == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias), id(net[4].weight), id(net[4].bias)}
    assert len(decay) + len(no_decay) == len(list(net.parameters()))


def test_warmup_fraction_fits_the_run_length(caplog):
    """``warmup_fraction`` sizes the warm-up to the run: 5 % of 200 steps is 10 steps, of 20 steps 1;
    a fixed warm-up of half the run or more is reported once."""
    from detectkit.modules import OptimConfig

    for total, warm in ((200, 10), (20, 1)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = OptimConfig(lr=1.0, warmup_fraction=0.05, warmup_initial_lr=0.0).scheduler(opt, total, total // 4)
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(range(total), key=lambda i: lrs[i]) == warm - 1  # the warm-up reaches lr at its last step
    with caplog.at_level("WARNING", logger="detectkit.modules"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        OptimConfig(warmup_steps=1000).scheduler(opt, 400, 40)
    assert "warm-up (1000 steps) is 250% of this run's 400 steps" in caplog.text
    with pytest.raises(ValueError, match="warmup_epochs or warmup_fraction"):
        OptimConfig(warmup_epochs=2, warmup_fraction=0.1)
