"""Conv -> BN -> activation, the unit both families are built from."""

from __future__ import annotations

import torch
import torch.nn as nn

# Both super-gradients (YOLO-NAS) and ultralytics set these on every BatchNorm2d.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def autopad(kernel_size: int, dilation: int = 1) -> int:
    return dilation * (kernel_size - 1) // 2


class ConvBNAct(nn.Module):
    """``conv`` (no bias) + ``bn`` + ``act``; key names match both reference checkpoints."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        act: nn.Module | type[nn.Module] | None = nn.ReLU,
    ) -> None:
        super().__init__()
        pad = autopad(kernel_size, dilation) if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, dilation, groups, bias=False)
        self.bn = batch_norm(out_channels)
        if act is None:
            self.act = nn.Identity()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = act(inplace=True) if act in (nn.ReLU, nn.SiLU) else act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias equal to ``bn(conv(x))`` in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    kernel, bias = conv_bn_kernel(conv.weight, conv.bias, bn)
    with torch.no_grad():
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
    return fused


def conv_bn_kernel(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``bn(conv(x))`` folded into one conv (eval-mode statistics)."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std if bn.affine else 1.0 / std
    shift = bn.bias if bn.affine else torch.zeros_like(std)
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    kernel = weight * scale.reshape(-1, 1, 1, 1)
    return kernel, shift + (b - bn.running_mean) * scale


def compose_1x1(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """One conv equal to ``second(first(x))`` when ``second`` is a plain 1x1 conv (no groups,
    stride, padding or dilation): two linear maps with nothing between them are one. Computed in
    float64 so the composed weights round once."""
    if second.kernel_size != (1, 1) or second.groups != 1 or second.stride != (1, 1) or second.padding != (0, 0):
        raise ValueError(f"compose_1x1 needs a plain 1x1 second conv, got {second}")
    if first.groups != 1:  # the composition mixes every group's channels: no longer a grouped conv
        raise ValueError(f"compose_1x1 needs an ungrouped first conv, got groups={first.groups}")
    if second.in_channels != first.out_channels:
        raise ValueError(f"channel mismatch: {first.out_channels} out, {second.in_channels} in")
    w2 = second.weight.detach().double().flatten(1)  # [C2, C1]
    w1 = first.weight.detach().double()  # [C1, Cin, k, k]
    b1 = first.bias.detach().double() if first.bias is not None else w1.new_zeros(w1.shape[0])
    b2 = second.bias.detach().double() if second.bias is not None else w2.new_zeros(w2.shape[0])
    out = nn.Conv2d(
        first.in_channels, second.out_channels, first.kernel_size, first.stride, first.padding,
        first.dilation, first.groups, bias=True, padding_mode=first.padding_mode,
    ).to(first.weight.device, first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.einsum("oc,cikl->oikl", w2, w1))
        out.bias.copy_(w2 @ b1 + b2)
    return out


def fuse_conv_bn_act(module: nn.Module) -> nn.Module:
    """Fold every ConvBNAct's BN into its conv, in place; returns the module."""
    for m in module.modules():
        if isinstance(m, ConvBNAct) and isinstance(m.bn, nn.BatchNorm2d):
            m.conv = fuse_conv_bn(m.conv, m.bn)
            m.bn = nn.Identity()
    return module
