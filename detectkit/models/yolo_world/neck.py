"""Text-guided PAN of YOLO-World v2: C2f blocks with a max-sigmoid text attention branch.

Every ``C2fAttn`` turns the prompt embeddings into a per-layer guide (``attn.gl``, a Linear on
the *raw* embedding) and scales an extra conv branch by ``sigmoid(max_k <x_h, guide_k,h> /
sqrt(hc) + bias_h)`` per head ``h``. The max runs over the prompts that are present: a
``text_mask [B,K]`` (True = real prompt) removes padding prompts from it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from detectkit.models.yolo_world.backbone import WorldScale
from detectkit.nn.c2f import Bottleneck, conv_silu


class MaxSigmoidAttn(nn.Module):
    """Per-head gate ``sigmoid(max over prompts of <embed(x), gl(text)> / sqrt(hc) + bias)``.

    After :meth:`bake` the guide for a fixed vocabulary lives in the ``guide`` buffer
    ``[K, embed]`` and no text is needed.
    """

    def __init__(self, cin: int, cout: int, heads: int, embed: int, text_dim: int = 512) -> None:
        super().__init__()
        if cout % heads or embed != cout:
            raise ValueError(
                f"attention needs embed == cout divisible by heads, got {embed=}, {cout=}, {heads=}"
            )
        self.heads = heads
        self.head_dim = cout // heads
        self.ec = conv_silu(cin, embed, 1, act=False) if cin != embed else None
        self.gl = nn.Linear(text_dim, embed)
        self.bias = nn.Parameter(torch.zeros(heads))
        self.proj_conv = conv_silu(cin, cout, 3, act=False)
        # baked vocabulary guide [K, embed]; not persistent: reparameterize() rebuilds it from txt
        self.register_buffer("guide", None, persistent=False)

    def bake(self, text: torch.Tensor) -> None:
        """Store ``gl(text)`` for a fixed vocabulary ``[K, 512]`` as a buffer."""
        with torch.no_grad():
            self.guide = self.gl(text).detach().clone()

    def forward(
        self, x: torch.Tensor, text: torch.Tensor | None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        if text is None:
            if self.guide is None:
                raise RuntimeError(
                    "no text embeddings given and no vocabulary baked in (call reparameterize)"
                )
            guide = self.guide.unsqueeze(0).expand(b, -1, -1)
        else:
            guide = self.gl(text)  # [B, K, embed]
        k = guide.shape[1]
        embed = (self.ec(x) if self.ec is not None else x).reshape(b, self.heads, self.head_dim, h * w)
        guide = guide.reshape(b, k, self.heads, self.head_dim).permute(0, 2, 3, 1)  # [B, nh, hc, K]
        sim = embed.transpose(2, 3).matmul(guide)  # [B, nh, HW, K]
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], float("-inf"))
        gate = sim.amax(dim=-1) / self.head_dim**0.5 + self.bias[None, :, None]
        gate = gate.sigmoid().reshape(b, self.heads, 1, h, w)
        y = self.proj_conv(x).reshape(b, self.heads, -1, h, w)
        return (y * gate).reshape(b, -1, h, w)


class C2fAttn(nn.Module):
    """C2f whose last bottleneck output also feeds a text-gated branch (``attn``)."""

    def __init__(self, cin: int, cout: int, n: int, embed: int, heads: int, text_dim: int = 512) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = conv_silu(cin, 2 * self.c, 1)
        self.cv2 = conv_silu((3 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut=False, expansion=1.0) for _ in range(n))
        self.attn = MaxSigmoidAttn(self.c, self.c, heads, embed, text_dim)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor | None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        ys = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            ys.append(block(ys[-1]))
        ys.append(self.attn(ys[-1], text, mask))
        return self.cv2(torch.cat(ys, 1))


def _attn_args(scale: WorldScale, cout: int, embed: int, heads: int) -> tuple[int, int, int]:
    # ultralytics parse_model: embed channels and heads are width-scaled and capped too
    ec = scale.channels(min(embed, scale.max_channels // 2))
    nh = int(max(round(min(heads, scale.max_channels // 2 // 32)) * scale.width, 1)) if heads > 1 else heads
    return scale.channels(cout), ec, nh


class WorldPAN(nn.Module):
    """Top-down then bottom-up path (ultralytics layers 10-21); returns P3, P4, P5 outputs."""

    def __init__(self, scale: WorldScale, in_channels: tuple[int, int, int], text_dim: int = 512) -> None:
        super().__init__()
        c3, c4, c5 = in_channels
        n = scale.repeats(3)
        o4, e4, h4 = _attn_args(scale, 512, 256, 8)
        o3, e3, h3 = _attn_args(scale, 256, 128, 4)
        o5, e5, h5 = _attn_args(scale, 1024, 512, 16)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down_p4 = C2fAttn(c5 + c4, o4, n, e4, h4, text_dim)  # layer 12
        self.top_down_p3 = C2fAttn(o4 + c3, o3, n, e3, h3, text_dim)  # layer 15 (P3 out)
        self.down_p3 = conv_silu(o3, scale.channels(256), 3, 2)  # layer 16
        self.bottom_up_p4 = C2fAttn(scale.channels(256) + o4, o4, n, e4, h4, text_dim)  # layer 18
        self.down_p4 = conv_silu(o4, scale.channels(512), 3, 2)  # layer 19
        self.bottom_up_p5 = C2fAttn(scale.channels(512) + c5, o5, n, e5, h5, text_dim)  # layer 21
        self.out_channels = (o3, o4, o5)

    def attn_layers(self) -> list[C2fAttn]:
        return [self.top_down_p4, self.top_down_p3, self.bottom_up_p4, self.bottom_up_p5]

    def forward(
        self,
        feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        text: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3, p4, p5 = feats
        t4 = self.top_down_p4(torch.cat((self.up(p5), p4), 1), text, mask)
        n3 = self.top_down_p3(torch.cat((self.up(t4), p3), 1), text, mask)
        n4 = self.bottom_up_p4(torch.cat((self.down_p3(n3), t4), 1), text, mask)
        n5 = self.bottom_up_p5(torch.cat((self.down_p4(n4), p5), 1), text, mask)
        return n3, n4, n5
