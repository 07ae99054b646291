"""Attention kernels behind one setting: "sdpa" (default), "eager" (the reference arithmetic) or "flash_attention_2".

Two shapes of problem:
- `segment_attention`: tokens of several independent segments laid end to end ([N, H, D]); every token attends only
  inside its segment (non-causal in the vision tower, causal for packed text rows). Never a dense N x N mask.
  On CUDA in bf16/fp16, "sdpa" runs torch's own FlashAttention varlen kernel (`torch.nn.attention.varlen`, torch
  >= 2.10) over all segments in one call, and "flash_attention_2" the flash-attn package's; elsewhere (CPU, float32,
  older torch) sdpa/eager batch the segments of equal length together, one kernel call per distinct length.
- `batch_attention`: ordinary [B, H, L, D] causal attention with an optional key-padding mask and a KV cache offset.

Segment boundaries are a `Segments` value built once per forward on the host (`make_segments`): the list of
boundaries for the sdpa/eager loop and, for the varlen kernels, the same boundaries as an int32 device tensor with
the longest segment as a Python int. Building them on the host is what keeps the forward free of device reads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional GPU kernel
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore

    HAS_FLASH = True
except Exception:  # pragma: no cover - flash-attn is not installed on CPU machines
    HAS_FLASH = False

try:  # torch >= 2.10: FlashAttention varlen kernels shipped with torch itself (CUDA only)
    from torch.nn.attention.varlen import varlen_attn

    # 2.10 takes `is_causal`; 2.11 replaced it with `window_size` ((-1, 0) = causal); 2.12 added `enable_gqa`, without
    # which it refuses fewer key/value heads than query heads (earlier releases should take them without the flag; not
    # yet seen on a GPU, so _torch_varlen repeats the key/value heads if one refuses)
    _VARLEN_ARGS = frozenset(inspect.signature(varlen_attn).parameters)
    HAS_VARLEN = True
except Exception:  # pragma: no cover - torch < 2.10
    _VARLEN_ARGS = frozenset()
    HAS_VARLEN = False

IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
_VARLEN_DTYPES = (torch.bfloat16, torch.float16)


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is not one of {IMPLEMENTATIONS}")
    if name == "flash_attention_2" and not HAS_FLASH:
        raise ValueError("attn_implementation 'flash_attention_2' needs the flash-attn package (pip install vlft[flash])")
    return name


# ============================================================================= segments
def varlen_arguments(cu_seqlens: list[int]) -> tuple[torch.Tensor, int]:
    """(cu_seqlens as an int32 host tensor without empty segments, length of the longest segment).

    The arguments of a FlashAttention varlen call for the segments [cu[i], cu[i+1]); empty segments (a repeated
    boundary) are dropped, as the sdpa path skips them.
    """
    cu = [cu_seqlens[0]] + [b for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]) if b > a]
    longest = max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)
    return torch.tensor(cu, dtype=torch.int32), longest


def uses_varlen(impl: str, device: torch.device, dtype: torch.dtype) -> bool:
    """True when `segment_attention` runs a varlen kernel for this setting, device and activation dtype."""
    if impl == "flash_attention_2":
        return True
    return impl == "sdpa" and HAS_VARLEN and device.type == "cuda" and dtype in _VARLEN_DTYPES


@dataclass(frozen=True)
class Segments:
    """Segment boundaries of one forward: `cu` on the host (0, ..., N) and, when a varlen kernel runs, `cu_device`
    (int32, empty segments dropped) and `max_len` (a Python int, as the kernels want it)."""

    cu: list[int]
    cu_device: torch.Tensor | None = None
    max_len: int = 0


def make_segments(cu_seqlens: list[int], impl: str, device: torch.device, dtype: torch.dtype) -> Segments:
    """Segments for all layers of one forward; the device copy is made here, once, and never read back."""
    if not uses_varlen(impl, device, dtype):
        return Segments(list(cu_seqlens))
    cu, longest = varlen_arguments(cu_seqlens)
    return Segments(list(cu_seqlens), cu.to(device, non_blocking=True), longest)


# ============================================================================= kernels
def _repeat_kv(x_BHLD: torch.Tensor, groups: int) -> torch.Tensor:
    return x_BHLD if groups == 1 else x_BHLD.repeat_interleave(groups, dim=1)


def eager_attention(q_BHLD, k_BHLD, v_BHLD, mask_BHLL=None, causal=False, scale=None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with the softmax in float32, then cast back (the reference arithmetic)."""
    scale = q_BHLD.shape[-1] ** -0.5 if scale is None else scale
    k_BHLD = _repeat_kv(k_BHLD, q_BHLD.shape[1] // k_BHLD.shape[1])
    v_BHLD = _repeat_kv(v_BHLD, q_BHLD.shape[1] // v_BHLD.shape[1])
    scores = torch.matmul(q_BHLD, k_BHLD.transpose(-1, -2)) * scale
    Lq, Lk = scores.shape[-2:]
    if causal:
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=scores.device).tril(Lk - Lq)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if mask_BHLL is not None:
        scores = scores.masked_fill(~mask_BHLL, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q_BHLD.dtype)
    return torch.matmul(probs, v_BHLD)


def _sdpa(q, k, v, mask=None, causal=False):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=groups > 1)


_native_gqa = [True]  # cleared if this torch's varlen_attn refuses fewer key/value heads than query heads


def _torch_varlen(q_NHD, k_NHD, v_NHD, seg: Segments, causal: bool) -> torch.Tensor:
    kw = {}
    if "is_causal" in _VARLEN_ARGS:
        kw["is_causal"] = causal
    else:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    groups = q_NHD.shape[1] // k_NHD.shape[1]
    if groups > 1 and "enable_gqa" in _VARLEN_ARGS:
        kw["enable_gqa"] = True
    elif groups > 1 and not _native_gqa[0]:
        k_NHD, v_NHD = (x.repeat_interleave(groups, dim=1) for x in (k_NHD, v_NHD))
    try:
        return varlen_attn(q_NHD, k_NHD, v_NHD, seg.cu_device, seg.cu_device, seg.max_len, seg.max_len, **kw)
    except (ValueError, RuntimeError) as e:
        if (groups == 1 or "enable_gqa" in _VARLEN_ARGS or not _native_gqa[0]
                or isinstance(e, torch.OutOfMemoryError)):  # out of memory is not a refusal: never retry larger
            raise
        _native_gqa[0] = False  # the kernel takes grouped heads; only an API check can refuse them: repeat them
        return _torch_varlen(q_NHD, k_NHD, v_NHD, seg, causal)


def segment_attention(q_NHD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor, seg: Segments, causal: bool,
                      impl: str) -> torch.Tensor:
    """Attention restricted to segments [cu[i], cu[i+1]) of the token axis. Returns [N, H, D]."""
    if seg.cu_device is not None and (impl == "flash_attention_2" or q_NHD.dtype in _VARLEN_DTYPES):
        if impl == "flash_attention_2":
            return flash_attn_varlen_func(q_NHD, k_NHD, v_NHD, seg.cu_device, seg.cu_device, seg.max_len,
                                          seg.max_len, causal=causal)
        return _torch_varlen(q_NHD, k_NHD, v_NHD, seg, causal)
    out = torch.empty_like(q_NHD)
    # batch segments of equal length: one kernel call per distinct length instead of one per segment
    by_len: dict[int, list[int]] = {}
    for a, b in zip(seg.cu[:-1], seg.cu[1:]):
        if b > a:
            by_len.setdefault(b - a, []).append(a)
    for length, starts in by_len.items():
        n = len(starts)
        contiguous = all(starts[i + 1] - starts[i] == length for i in range(n - 1))
        if contiguous:
            sl = slice(starts[0], starts[0] + n * length)
            q, k, v = (x[sl].view(n, length, *x.shape[1:]).transpose(1, 2) for x in (q_NHD, k_NHD, v_NHD))
        else:
            idx = (torch.tensor(starts).view(-1, 1) + torch.arange(length)).view(-1).to(q_NHD.device,
                                                                                         non_blocking=True)
            q, k, v = (x.index_select(0, idx).view(n, length, *x.shape[1:]).transpose(1, 2)
                       for x in (q_NHD, k_NHD, v_NHD))
        if impl == "eager":
            o = eager_attention(q, k, v, causal=causal)
        else:
            o = _sdpa(q, k, v, causal=causal)
        o = o.transpose(1, 2).reshape(n * length, *q_NHD.shape[1:])
        if contiguous:
            out[sl] = o
        else:
            out.index_copy_(0, idx, o)
    return out


def allowed_keys(key_mask_BL: torch.Tensor, Lq: int) -> torch.Tensor:
    """[B, 1, Lq, Lk] bool: which of the Lk keys each of the last Lq queries may see (causal, and real keys only).

    key_mask_BL: [B, Lk] with 1 for real keys (0 for padding). Built once per forward and shared by the layers.
    """
    Lk = key_mask_BL.shape[1]
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=key_mask_BL.device).tril(Lk - Lq)[None, None]
    allowed = allowed & key_mask_BL.bool()[:, None, None, :]
    # a query with no visible key (left padding) would give NaN; let it see everything (its output is unused)
    return allowed | ~allowed.any(-1, keepdim=True)


def batch_attention(
    q_BHLD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    mask_B1LL: torch.Tensor | None,
    impl: str,
) -> torch.Tensor:
    """Causal attention of the last Lq positions over Lk >= Lq keys (a KV cache holds the first Lk - Lq).

    mask_B1LL: None when no key may be hidden beyond causality (no padding, or right padding only, where padded
    positions are never attended by real queries); else `allowed_keys(...)`.
    """
    Lq, Lk = q_BHLD.shape[2], k_BHLD.shape[2]
    if mask_B1LL is None and (Lq == Lk or Lq == 1):
        if impl == "flash_attention_2":
            o = flash_attn_func(q_BHLD.transpose(1, 2), k_BHLD.transpose(1, 2), v_BHLD.transpose(1, 2), causal=Lq > 1)
            return o.transpose(1, 2)
        if impl == "eager":
            return eager_attention(q_BHLD, k_BHLD, v_BHLD, causal=Lq > 1)
        return _sdpa(q_BHLD, k_BHLD, v_BHLD, causal=Lq > 1)
    if mask_B1LL is None:  # a chunk of several queries after a cache, without padding
        mask_B1LL = torch.ones(Lq, Lk, dtype=torch.bool, device=q_BHLD.device).tril(Lk - Lq)[None, None]
    if impl == "eager":
        return eager_attention(q_BHLD, k_BHLD, v_BHLD, mask_BHLL=mask_B1LL)
    return _sdpa(q_BHLD, k_BHLD, v_BHLD, mask=mask_B1LL)
