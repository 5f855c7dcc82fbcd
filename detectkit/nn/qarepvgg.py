"""QARepVGG block (Chu et al., "Make RepVGG Greater Again", S4 variant) as used by YOLO-NAS.

Parameter and buffer names follow super-gradients' ``QARepVGGBlock`` so its checkpoints load by
name: ``branch_3x3.conv``, ``branch_3x3.bn``, ``branch_1x1`` (with bias), ``post_bn``, ``alpha``
(only with ``use_alpha``), and ``rbr_reparam`` which exists **only after fusing**. super-gradients
registers ``rbr_reparam`` up front as a placeholder whose values are never used by the unfused
forward (and are stale in its checkpoints); we do not, so a stale kernel can never leak in.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from detectkit.nn.conv import batch_norm, conv_bn_kernel

__all__ = ["QARepVGGBlock"]


class QARepVGGBlock(nn.Module):
    """``act(post_bn(bn(conv3x3(x)) + alpha * conv1x1(x) + x))``, fusable into one 3x3 conv.

    ``partial_fusion`` merges the three branches into ``rbr_reparam`` (3x3 conv with bias) and keeps
    ``post_bn``: the block stays trainable with a quantization-friendly single kernel (QAT).
    ``full_fusion`` also folds ``post_bn``: the deployment form (conv + ReLU).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        use_residual_connection: bool = True,
        use_alpha: bool = False,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if use_residual_connection and (in_channels != out_channels or stride != 1):
            raise ValueError(
                f"QARepVGGBlock identity branch needs in == out channels and stride 1, "
                f"got {in_channels} -> {out_channels}, stride {stride}"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.use_residual_connection = use_residual_connection
        self.use_alpha = use_alpha

        self.branch_3x3 = nn.Sequential()
        self.branch_3x3.add_module("conv", nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False))
        self.branch_3x3.add_module("bn", batch_norm(out_channels))
        self.branch_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=True)
        if use_alpha:
            self.alpha = nn.Parameter(torch.ones(1))
        if use_residual_connection:
            id_tensor = torch.zeros(in_channels, in_channels, 3, 3)
            id_tensor[torch.arange(in_channels), torch.arange(in_channels), 1, 1] = 1.0
            self.register_buffer("id_tensor", id_tensor, persistent=False)
        self.post_bn: nn.Module = batch_norm(out_channels)
        self.act = act(inplace=True) if act in (nn.ReLU, nn.SiLU) else act()
        self.rbr_reparam: nn.Conv2d | None = None
        self.fusion: str | None = None  # None, "partial" or "full"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.post_bn(self.rbr_reparam(x)))
        y = self.branch_3x3(x)
        y = y + (self.alpha * self.branch_1x1(x) if self.use_alpha else self.branch_1x1(x))
        if self.use_residual_connection:
            y = y + x
        return self.act(self.post_bn(y))

    @torch.no_grad()
    def branch_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3x3 kernel and bias equal to the sum of the three branches (eval statistics)."""
        k3, b3 = conv_bn_kernel(self.branch_3x3.conv.weight, None, self.branch_3x3.bn)
        k1 = F.pad(self.branch_1x1.weight, [1, 1, 1, 1])
        b1 = self.branch_1x1.bias
        if self.use_alpha:
            k1, b1 = self.alpha * k1, self.alpha * b1
        kernel, bias = k3 + k1, b3 + b1
        if self.use_residual_connection:
            # Built from the current shape rather than read from ``id_tensor`` (kept for name parity
            # with super-gradients): stays right after channel pruning or meta-device construction.
            c = kernel.shape[0]
            idx = torch.arange(c, device=kernel.device)
            kernel = kernel.clone()
            kernel[idx, idx, 1, 1] += 1.0
        return kernel, bias

    def partial_fusion(self) -> None:
        """Branches -> ``rbr_reparam`` (trainable), ``post_bn`` kept."""
        if self.fusion is not None:
            return
        kernel, bias = self.branch_kernel()
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, 1, bias=True)
        conv = conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.data.copy_(kernel)
        conv.bias.data.copy_(bias)
        del self.branch_3x3, self.branch_1x1
        if self.use_alpha:
            del self.alpha
        if self.use_residual_connection:
            del self.id_tensor
        self.rbr_reparam = conv
        self.fusion = "partial"

    def full_fusion(self) -> None:
        """Also fold ``post_bn`` into ``rbr_reparam``: one conv + activation."""
        if self.fusion == "full":
            return
        self.partial_fusion()
        with torch.no_grad():
            kernel, bias = conv_bn_kernel(self.rbr_reparam.weight, self.rbr_reparam.bias, self.post_bn)
            self.rbr_reparam.weight.copy_(kernel)
            self.rbr_reparam.bias.copy_(bias)
        self.post_bn = nn.Identity()
        self.fusion = "full"

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
            f"residual={self.use_residual_connection}, fusion={self.fusion}"
        )
