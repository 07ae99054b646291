"""GPU checks (skipped without CUDA): bf16 parity on the device, no host syncs in the vision tower, flash varlen."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import make_pair, media_inputs
from vlft.model.attention import HAS_FLASH

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SAMPLES = [[3, ("image", (1, 12, 20)), 4, ("video", (2, 8, 12)), 2], [5, ("image", (1, 8, 8)), 9]]


def _cuda(inp):
    return {k: (v if k.endswith("grid_thw") else v.cuda()) for k, v in inp.items()}


def _pair_on_gpu(dtype, attn="eager"):
    model, hf = make_pair(dtype=dtype)
    model.set_attn_implementation(attn)
    return model.cuda(), hf.cuda()


def test_bf16_logits_match_transformers_on_gpu():
    model, hf = _pair_on_gpu(torch.bfloat16)
    inp = _cuda(media_inputs(model.config, SAMPLES))
    sec = torch.tensor([1.0], device="cuda")
    with torch.no_grad():
        ours = model(**{k: v for k, v in inp.items() if k != "mm_token_type_ids"}, second_per_grid_ts=sec).logits
        ref = hf(**inp, second_per_grid_ts=sec).logits
    valid = inp["attention_mask"].bool()
    diff = (ours.float() - ref.float())[valid].abs().max().item()
    print(f"bf16 GPU eager max |logit diff| vs transformers: {diff}")
    assert diff < 2e-2


@pytest.mark.parametrize("attn", ["sdpa"] + (["flash_attention_2"] if HAS_FLASH else []))
def test_fast_attention_close_to_eager_on_gpu(attn):
    model, _ = _pair_on_gpu(torch.bfloat16)
    inp = _cuda(media_inputs(model.config, SAMPLES))
    kw = {k: v for k, v in inp.items() if k != "mm_token_type_ids"}
    kw["second_per_grid_ts"] = torch.tensor([1.0])
    with torch.no_grad():
        ref = model(**kw).logits.float()
        model.set_attn_implementation(attn)
        ours = model(**kw).logits.float()
    valid = inp["attention_mask"].bool()
    diff = (ours - ref)[valid].abs().max().item()
    print(f"{attn} vs eager, bf16 GPU: {diff}")
    assert diff < 5e-2


@pytest.mark.parametrize("attn", ["sdpa"] + (["flash_attention_2"] if HAS_FLASH else []))
def test_vision_tower_makes_no_host_sync(attn):
    model, _ = _pair_on_gpu(torch.bfloat16, attn)
    pixels = torch.randn(240 + 192, 1176, device="cuda", dtype=torch.bfloat16)
    grids = torch.tensor([[1, 12, 20], [2, 8, 12]])  # on the host, as the collator leaves them
    with torch.no_grad():
        model.visual(pixels, grids, attn)  # warm-up (allocations, kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.visual(pixels, grids, attn)
        finally:
            torch.cuda.set_sync_debug_mode("default")
