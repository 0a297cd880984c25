"""Convolutional pixel decoder: quantized pixel tokens -> image (VQGAN-style, as in the official configuration)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in VQGAN where the width allows it; tiny configs use narrower widths.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the base grid, so distant positions agree on global structure."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    """(B, h, w, code_dim) quantized tokens -> (B, 3, H, W) image in [-1, 1] (not clamped while training)."""

    def __init__(self, code_dim: int, config: DecoderConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        self.conv_in = nn.Conv2d(code_dim, ch[0], 3, padding=1)
        levels = []
        for i, c in enumerate(ch):
            c_prev = ch[i - 1] if i else ch[0]
            blocks: list[nn.Module] = [Upsample(c_prev, c)] if i else []
            blocks += [ResBlock(c, c) for _ in range(config.res_blocks)]
            if i == 0 and config.attention:
                blocks.insert(1, AttnBlock(c))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(tokens.permute(0, 3, 1, 2))  # (B, C0, h, w)
        base = self.config.base_grid
        if x.shape[-1] != base or x.shape[-2] != base:
            # The patch grid need not be a power-of-two divisor of the image (27 -> 24 for 384 px, patch 14).
            x = F.interpolate(x, size=(base, base), mode="bilinear", align_corners=False)
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))
