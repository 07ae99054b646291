"""Vision tower of Qwen2.5-VL (`visual.*` in the checkpoint), docs/vision.md.

Patch embedding -> rows regrouped window by window -> blocks (window attention, full attention at
`fullatt_block_indexes`) with 2D rotary -> merger (RMSNorm, 2x2 concat, MLP) -> original order restored.
All index arithmetic comes from `vision_index` on the host; the forward reads no device value back.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlft.model.attention import Segments, make_segments, segment_attention
from vlft.model.text import RMSNorm, rope_inv_freq, rotate_half
from vlft.model.vision_index import full_cu_seqlens, rotary_pos_ids, window_index


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (T, P, P) and no bias: a linear map of each flattened (c, t, py, px) row.

    Kept as a convolution (not a matmul) because the two round differently in bf16, and the released model's numerics
    come from the convolution.
    """

    def __init__(self, in_channels: int, temporal: int, patch: int, dim: int):
        super().__init__()
        self.shape = (in_channels, temporal, patch, patch)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.shape[1:], stride=self.shape[1:], bias=False)

    def forward(self, pixels_NP: torch.Tensor) -> torch.Tensor:
        x = pixels_NP.to(self.proj.weight.dtype).view(-1, *self.shape)
        return self.proj(x).view(x.shape[0], -1)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x_ND, cos_N1D, sin_N1D, segments: Segments, impl: str):
        N = x_ND.shape[0]
        q, k, v = self.qkv(x_ND).view(N, 3, self.heads, self.head_dim).unbind(1)
        # rotary in float32, then back to the activation dtype (docs/numerics.md#dtype-flow)
        q = (q.float() * cos_N1D + rotate_half(q.float()) * sin_N1D).to(x_ND.dtype)
        k = (k.float() * cos_N1D + rotate_half(k.float()) * sin_N1D).to(x_ND.dtype)
        o = segment_attention(q, k, v, segments, causal=False, impl=impl)
        return self.proj(o.reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=True)
        self.up_proj = nn.Linear(dim, inter, bias=True)
        self.down_proj = nn.Linear(inter, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, inter: int):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6)  # vision eps is fixed at 1e-6, not read from the config
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, heads)
        self.mlp = VisionMLP(dim, inter)

    def forward(self, x, cos, sin, segments, impl):
        x = x + self.attn(self.norm1(x), cos, sin, segments, impl)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm per patch, the 2x2 patches of a merged cell concatenated, MLP with exact GELU."""

    def __init__(self, dim: int, out_dim: int, merge: int):
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = RMSNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x_ND).view(-1, self.hidden))


class VisionTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int, inter: int, out_dim: int, patch: int, temporal: int,
                 merge: int, window_size: int, fullatt_block_indexes: list[int], in_channels: int = 3,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.merge, self.patch, self.head_dim = merge, patch, dim // heads
        self.window_cells = window_size // merge // patch
        self.fullatt = set(fullatt_block_indexes)
        self.rope_theta = rope_theta
        self.patch_embed = PatchEmbed(in_channels, temporal, patch, dim)
        self.blocks = nn.ModuleList(VisionBlock(dim, heads, inter) for _ in range(depth))
        self.merger = PatchMerger(dim, out_dim, merge)
        self.gradient_checkpointing = False

    def forward(self, pixels_NP: torch.Tensor, grid_thw: torch.Tensor | list[list[int]], impl: str) -> torch.Tensor:
        """pixels [N, C*T*P*P] and grids [n, 3] (patch units) -> features [N / merge^2, out_dim] in input order.

        Pass `grid_thw` on the host (a CPU tensor or a list): a grid on the GPU costs one read-back here.
        """
        grids = grid_thw.tolist() if torch.is_tensor(grid_thw) else [list(g) for g in grid_thw]
        device = pixels_NP.device
        unit = self.merge * self.merge
        x = self.patch_embed(pixels_NP)
        N, D = x.shape
        if N != sum(t * h * w for t, h, w in grids):
            raise ValueError(f"pixel rows ({N}) do not match the grids {grids} (sum of t*h*w)")

        # 2D rotary: (row, col) of each patch; angles in float32
        inv = rope_inv_freq(self.head_dim // 2, self.rope_theta, device)
        pos = rotary_pos_ids(grids, self.merge).to(device, non_blocking=True)
        angles = (pos[..., None].float() * inv).flatten(1)  # [N, head_dim/2]

        # regroup rows window by window; groups of merge^2 rows (one merged cell) move together
        win_idx, cu_window = window_index(grids, self.merge, self.window_cells)
        win_idx = win_idx.to(device, non_blocking=True)
        x = x.view(N // unit, unit, D)[win_idx].view(N, D)
        angles = angles.view(N // unit, unit, -1)[win_idx].view(N, -1)
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        # boundaries of the windows and of the full-attention segments, shared by all blocks of this forward
        full = make_segments(full_cu_seqlens(grids), impl, device, x.dtype)
        windows = make_segments(cu_window, impl, device, x.dtype)

        for i, block in enumerate(self.blocks):
            segments = full if i in self.fullatt else windows
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, segments, impl, use_reentrant=False)
            else:
                x = block(x, cos, sin, segments, impl)
        y = self.merger(x)
        # undo the window order: row i of y is merged cell win_idx[i]
        out = torch.empty_like(y)
        out[win_idx] = y
        return out
