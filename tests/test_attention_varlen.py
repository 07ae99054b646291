"""The varlen path's index arithmetic, checked on CPU: the arguments a FlashAttention varlen call gets (cu_seqlens,
longest segment) for vision windows, full-attention blocks and packed rows describe exactly the segments of the sdpa
path, and a CPU emulation of torch's `varlen_attn`, called through the model's own code path with those arguments,
gives the sdpa path's results (the kernel itself runs only on CUDA: tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

import vlft.model.attention as attention
from model_fixtures import make_pair, media_inputs
from varlen_emulation import emulated_varlen as _emulated_varlen
from vlft.data.packing import cu_seqlens_for_rows
from vlft.model import get_rope_index
from vlft.model.attention import Segments, make_segments, segment_attention, varlen_arguments
from vlft.model.vision_index import full_cu_seqlens, window_index


def _segments_of(cu: list[int]) -> list[tuple[int, int]]:
    """The (start, end) pairs the sdpa path attends over: every non-empty [cu[i], cu[i+1])."""
    return [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]


@pytest.mark.parametrize("cu, expected_cu, longest", [
    # windows of a 1x12x20 image (4x4 merged cells, partial windows at the right and bottom edges)
    (window_index([[1, 12, 20]], 2, 4)[1], [0, 64, 128, 160, 192, 224, 240], 64),
    # full attention over an image and a 2-frame video: one segment per frame
    (full_cu_seqlens([[1, 12, 20], [2, 8, 12]]), [0, 240, 336, 432], 240),
    # two packed rows of 10 tokens: samples 4+5 then padding, and 7+3
    (cu_seqlens_for_rows([[4, 5], [7, 3]], 10).tolist(), [0, 4, 9, 10, 17, 20], 7),
    # a repeated boundary (an empty segment) is dropped, as the sdpa path skips it
    ([0, 3, 3, 8], [0, 3, 8], 5),
])
def test_varlen_arguments_describe_the_sdpa_segments(cu, expected_cu, longest):
    cu_t, max_len = varlen_arguments(cu)
    assert cu_t.dtype == torch.int32  # the kernels take int32 boundaries
    assert cu_t.tolist() == expected_cu and max_len == longest
    assert _segments_of(cu_t.tolist()) == _segments_of(cu)
    assert max_len == max(b - a for a, b in _segments_of(cu))


VARLEN_APIS = {  # the keyword arguments of varlen_attn in the torch releases that have it
    "torch-2.10": frozenset({"is_causal", "return_aux"}),
    "torch-2.11": frozenset({"return_aux", "scale", "window_size"}),
    "installed": attention._VARLEN_ARGS,
}


@pytest.fixture(params=list(VARLEN_APIS))
def emulated_varlen(request, monkeypatch):
    """Route the model's varlen calls to the emulation, as if on CUDA with the given torch release's API."""
    if not VARLEN_APIS[request.param]:
        pytest.skip("the installed torch has no torch.nn.attention.varlen")
    calls = []

    def counted(*args, **kw):
        calls.append(kw)
        return _emulated_varlen(*args, **kw)

    monkeypatch.setattr(attention, "_VARLEN_ARGS", VARLEN_APIS[request.param])
    monkeypatch.setattr(attention, "varlen_attn", counted, raising=False)
    monkeypatch.setattr(attention, "uses_varlen", lambda impl, device, dtype: impl == "sdpa")
    monkeypatch.setattr(attention, "_VARLEN_DTYPES", (torch.float32,))  # the tests run in float32
    return monkeypatch, calls


@pytest.mark.parametrize("causal, heads, kv_heads", [(False, 4, 4), (True, 4, 2)], ids=["vision", "text-gqa"])
def test_emulated_varlen_equals_sdpa_segments(emulated_varlen, causal, heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    cu = window_index([[1, 12, 20], [2, 8, 12]], 2, 4)[1]  # windows of several sizes, not all contiguous by length
    N = cu[-1]
    q = torch.randn(N, heads, 16, generator=g)
    k, v = (torch.randn(N, kv_heads, 16, generator=g) for _ in range(2))
    ref = segment_attention(q, k, v, Segments(cu), causal=causal, impl="sdpa")
    seg = make_segments(cu, "sdpa", q.device, q.dtype)
    assert seg.cu_device is not None and seg.max_len == 64
    ours = segment_attention(q, k, v, seg, causal=causal, impl="sdpa")
    assert len(emulated_varlen[1]) == 1  # one varlen call for all segments
    assert (ours - ref).abs().max() < 1e-5


def test_model_through_emulated_varlen_equals_sdpa(emulated_varlen):
    """Vision windows, full-attention blocks and two packed text samples, through the model's varlen wiring."""
    model, _ = make_pair()
    cfg = model.config
    a = media_inputs(cfg, [[3, ("image", (1, 12, 20)), 5]], seed=1)
    b = media_inputs(cfg, [[2, ("video", (2, 8, 12)), 7]], seed=2)
    sec = torch.tensor([1.0])
    pa, _ = get_rope_index(cfg, a["input_ids"], image_grid_thw=a["image_grid_thw"])
    pb, _ = get_rope_index(cfg, b["input_ids"], video_grid_thw=b["video_grid_thw"], second_per_grid_ts=sec)
    na, nb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    batch = dict(input_ids=torch.cat([a["input_ids"], b["input_ids"]], 1), position_ids=torch.cat([pa, pb], 2),
                 pixel_values=a["pixel_values"], image_grid_thw=a["image_grid_thw"],
                 pixel_values_videos=b["pixel_values_videos"], video_grid_thw=b["video_grid_thw"],
                 second_per_grid_ts=sec, cu_seqlens=torch.tensor([0, na, na + nb], dtype=torch.int32))
    monkeypatch, calls = emulated_varlen
    with torch.no_grad():
        ours = model(**batch).logits
        # one varlen call per vision block and per text layer
        assert len(calls) == cfg.vision.depth + cfg.text.num_hidden_layers
        monkeypatch.setattr(attention, "uses_varlen", lambda impl, device, dtype: False)
        ref = model(**batch).logits
    assert len(calls) == cfg.vision.depth + cfg.text.num_hidden_layers  # the reference ran the sdpa path
    assert (ours - ref).abs().max() < 1e-5


def test_grouped_heads_are_repeated_where_varlen_refuses_them(emulated_varlen):
    """A torch without `enable_gqa` whose varlen_attn refused fewer key/value heads: the heads are repeated."""
    monkeypatch, _ = emulated_varlen
    monkeypatch.setattr(attention, "_VARLEN_ARGS", VARLEN_APIS["torch-2.11"])
    monkeypatch.setattr(attention, "_native_gqa", [True])

    def strict(query, key, *args, **kw):
        if query.shape[1] != key.shape[1]:
            raise ValueError("Expect query and key/value to have the same number of heads")
        return _emulated_varlen(query, key, *args, **kw)

    monkeypatch.setattr(attention, "varlen_attn", strict)
    g = torch.Generator().manual_seed(0)
    cu = [0, 5, 12, 20]
    q, k, v = torch.randn(20, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    ref = segment_attention(q, k, v, Segments(cu), causal=True, impl="sdpa")
    ours = segment_attention(q, k, v, make_segments(cu, "sdpa", q.device, q.dtype), causal=True, impl="sdpa")
    assert attention._native_gqa == [False] and (ours - ref).abs().max() < 1e-5


def test_out_of_memory_in_varlen_is_raised_not_retried_with_repeated_heads(emulated_varlen):
    monkeypatch, _ = emulated_varlen
    monkeypatch.setattr(attention, "_VARLEN_ARGS", VARLEN_APIS["torch-2.11"])
    monkeypatch.setattr(attention, "_native_gqa", [True])

    def out_of_memory(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(attention, "varlen_attn", out_of_memory)
    q, k, v = torch.randn(8, 4, 8), torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    with pytest.raises(torch.OutOfMemoryError):
        segment_attention(q, k, v, make_segments([0, 8], "sdpa", q.device, q.dtype), causal=True, impl="sdpa")
    assert attention._native_gqa == [True]  # the grouped path stays for the next call
