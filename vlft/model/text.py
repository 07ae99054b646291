"""Qwen2 decoder with multimodal rotary embeddings (M-RoPE, docs/rotary.md#text-m-rope).

Plain single-device PyTorch; module names are the Hub checkpoint keys under `model.` (`layers.N.self_attn.q_proj`...).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlft.model.attention import Segments, allowed_keys, batch_attention, make_segments, segment_attention
from vlft.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)): normalised in float32, cast back, then the weight applied (docs/numerics.md#dtype-flow)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_INV_FREQ_CACHE: dict[tuple, torch.Tensor] = {}


def rope_inv_freq(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """1 / theta^(2j/dim) in float32, computed on the host and cached per device.

    Kept out of the module's buffers on purpose: `model.to(bfloat16)` would round buffers to bf16
    (docs/numerics.md#rotary-frequencies-stay-float32).
    """
    key = (dim, float(theta), str(device))
    if key not in _INV_FREQ_CACHE:
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        _INV_FREQ_CACHE[key] = inv.to(device)
    return _INV_FREQ_CACHE[key]


def mrope_cos_sin(position_ids_3BL: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, L, head_dim] for 3-row positions.

    Frequency j takes its position from row t, h or w by section ([16, 24, 24] on the released models: the first 16
    frequencies follow time, the next 24 height, the last 24 width); the same split is repeated for the second half.
    Angles in float32, cos/sin cast to the activation dtype (what the released model computes,
    docs/numerics.md#dtype-flow).
    """
    inv = rope_inv_freq(head_dim, theta, position_ids_3BL.device)  # [D/2]
    angles = position_ids_3BL[..., None].float() * inv  # [3, B, L, D/2]
    parts, start = [], 0
    for row, width in enumerate(mrope_section):
        parts.append(angles[row, ..., start:start + width])
        start += width
    freqs = torch.cat(parts, dim=-1)  # [B, L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class TextAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x_BLD, cos, sin, impl, mask=None, segments: Segments | None = None,
                cache: KVCache | None = None, layer: int = 0):
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BLD).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BLD).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if segments is not None:
            # packed rows: segments over the flattened B*L token stream, causal inside each
            o = segment_attention(
                q.transpose(1, 2).reshape(B * L, self.heads, self.head_dim),
                k.transpose(1, 2).reshape(B * L, self.kv_heads, self.head_dim),
                v.transpose(1, 2).reshape(B * L, self.kv_heads, self.head_dim),
                segments, causal=True, impl=impl,
            ).view(B, L, -1)
        else:
            o = batch_attention(q, k, v, mask, impl).transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(o)


class TextMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.self_attn = TextAttention(hidden, heads, kv_heads, head_dim)
        self.mlp = TextMLP(hidden, inter)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, h, cos, sin, impl, mask=None, segments=None, cache=None, layer=0):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, impl, mask, segments, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    """`model.*` of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, eps: float,
                 rope_theta: float, mrope_section: list[int]):
        super().__init__()
        self.head_dim = hidden // heads
        if sum(mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        self.rope_theta, self.mrope_section = rope_theta, list(mrope_section)
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, inter, heads, kv_heads, self.head_dim, eps) for _ in range(layers))
        self.norm = RMSNorm(hidden, eps)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds_BLD: torch.Tensor, position_ids_3BL: torch.Tensor, impl: str,
                key_mask: torch.Tensor | None = None, cu_seqlens: list[int] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, L, D]. `key_mask` [B, cached + L] marks real keys (1) where some must be
        hidden (left padding); `cu_seqlens` (host list) isolates packed samples; `cache` receives this forward's keys
        and values after the ones it holds."""
        h = inputs_embeds_BLD
        cos, sin = mrope_cos_sin(position_ids_3BL, self.head_dim, self.rope_theta, self.mrope_section, h.dtype)
        segments = None if cu_seqlens is None else make_segments(cu_seqlens, impl, h.device, h.dtype)
        mask = None if key_mask is None else allowed_keys(key_mask, h.shape[1])
        if cache is not None:
            cache.reserve(h.shape[1])
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(layer, h, cos, sin, impl, mask, segments, None, i, use_reentrant=False)
            else:
                h = layer(h, cos, sin, impl, mask, segments, cache, i)
        if cache is not None:
            cache.advance(h.shape[1])
        return self.norm(h)
