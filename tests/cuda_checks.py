"""GPU checks shared by tests/test_cuda.py (pytest, skipped without CUDA) and recipes/gpu_check.py (one JSON).

Each check returns the numbers it measured and raises AssertionError when a bound fails. No pytest import here:
the GPU machines that run recipes/gpu_check.py may not have it. Run alone: `python tests/cuda_checks.py [--json
FILE]` (exit status 1 if a check failed).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures import hf_twin, make_pair, media_inputs  # noqa: E402

import vlft.model.attention as attention  # noqa: E402
from vlft.model import get_rope_index  # noqa: E402
from vlft.model.attention import Segments, make_segments, segment_attention  # noqa: E402

DEVICE = "cuda"  # tests/test_cuda_checks_dry.py runs the checks on the CPU, with torch's varlen kernel emulated
SAMPLES = [[3, ("image", (1, 12, 20)), 4, ("video", (2, 8, 12)), 2], [5, ("image", (1, 8, 8)), 9]]
SEC = [1.0]  # seconds per video grid


def _cuda(inp: dict) -> dict:
    return {k: (v if k.endswith("grid_thw") else v.to(DEVICE)) for k, v in inp.items()}


def _ours(inp: dict) -> dict:
    kw = {k: v for k, v in inp.items() if k != "mm_token_type_ids"}
    kw["second_per_grid_ts"] = torch.tensor(SEC, device=DEVICE)
    return kw


def _theirs(hf, inp: dict) -> dict:
    """transformers' inputs; mm_token_type_ids only where the installed release takes it."""
    kw = dict(inp, second_per_grid_ts=torch.tensor(SEC, device=DEVICE))
    if "mm_token_type_ids" not in inspect.signature(hf.forward).parameters:
        kw.pop("mm_token_type_ids")
    return kw


def _diff(a, b, valid) -> float:
    return (a.float() - b.float())[valid].abs().max().item()


def _bf16_ulp(ref: torch.Tensor) -> float:
    """bf16's unit in the last place at the magnitude of the largest entry (8 significant bits)."""
    return 2.0 ** (torch.floor(torch.log2(ref.float().abs().max())).item() - 7)


def bf16_parity_with_transformers() -> dict:
    """bf16 logits on the device against transformers with the same weights: eager against eager (within 2 bf16 units
    in the last place at the largest logit: the two round a few intermediate results differently), and vlft's
    default (sdpa; varlen FlashAttention in the vision tower) against transformers' sdpa (within 4)."""
    model, hf_eager = make_pair(dtype=torch.bfloat16)
    hf_sdpa = hf_twin(model, attn="sdpa", dtype=torch.bfloat16).to(DEVICE)
    model, hf_eager = model.to(DEVICE), hf_eager.to(DEVICE)
    inp = _cuda(media_inputs(model.config, SAMPLES))
    valid = inp["attention_mask"].bool()
    out = {}
    with torch.no_grad():
        for ours_impl, hf, ulps in (("eager", hf_eager, 2), ("sdpa", hf_sdpa, 4)):
            theirs_impl = "eager" if hf is hf_eager else "sdpa"
            model.set_attn_implementation(ours_impl)
            ref = hf(**_theirs(hf, inp)).logits
            d = _diff(model(**_ours(inp)).logits, ref, valid)
            bound = ulps * _bf16_ulp(ref[valid])
            out[f"max_logit_diff_{ours_impl}_vs_transformers_{theirs_impl}"] = d
            out[f"bound_{ours_impl}"] = bound
            assert d <= bound, f"{ours_impl} vs transformers {theirs_impl}: {d} > {bound}"
    return out


def _packed_batch(model) -> dict:
    """Two samples with media packed into one row (cu_seqlens on the host), labels on the host."""
    cfg = model.config
    a = media_inputs(cfg, [[3, ("image", (1, 12, 20)), 5]], seed=1)
    b = media_inputs(cfg, [[2, ("video", (2, 8, 12)), 7]], seed=2)
    sec = torch.tensor(SEC)
    pa, _ = get_rope_index(cfg, a["input_ids"], image_grid_thw=a["image_grid_thw"])
    pb, _ = get_rope_index(cfg, b["input_ids"], video_grid_thw=b["video_grid_thw"], second_per_grid_ts=sec)
    na, nb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    ids = torch.cat([a["input_ids"], b["input_ids"]], 1)
    return dict(input_ids=ids.to(DEVICE), position_ids=torch.cat([pa, pb], 2).to(DEVICE), labels=ids.clone(),
                pixel_values=a["pixel_values"].to(DEVICE), image_grid_thw=a["image_grid_thw"],
                pixel_values_videos=b["pixel_values_videos"].to(DEVICE), video_grid_thw=b["video_grid_thw"],
                second_per_grid_ts=sec.to(DEVICE), cu_seqlens=torch.tensor([0, na, na + nb], dtype=torch.int32))


def varlen_sdpa_eager_agree() -> dict:
    """A packed row with an image and a video, bf16 on the device: logits and LoRA-relevant gradients (of the query
    projections) from varlen FlashAttention, the per-length sdpa path and eager agree."""
    assert attention.HAS_VARLEN, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    model, _ = make_pair(dtype=torch.bfloat16)
    model = model.to(DEVICE).train()
    batch = _packed_batch(model)
    results, grads = {}, {}
    plain = attention.uses_varlen
    for name, impl, varlen in (("varlen", "sdpa", True), ("sdpa", "sdpa", False), ("eager", "eager", False)):
        attention.uses_varlen = plain if varlen else (lambda impl, device, dtype: False)
        try:
            model.set_attn_implementation(impl)
            out = model(**batch, return_logits=True)
            out.loss.backward()
        finally:
            attention.uses_varlen = plain
        results[name] = out.logits.detach().float()
        grads[name] = torch.cat([model.model.layers[i].self_attn.q_proj.weight.grad.flatten().float()
                                 for i in range(len(model.model.layers))]
                                + [model.visual.blocks[0].attn.qkv.weight.grad.flatten().float()])
        model.zero_grad(set_to_none=True)
    out = {}
    for a, b in (("varlen", "sdpa"), ("varlen", "eager"), ("sdpa", "eager")):
        d = (results[a] - results[b]).abs().max().item()
        g = ((grads[a] - grads[b]).norm() / grads[b].norm()).item()
        out[f"max_logit_diff_{a}_vs_{b}"], out[f"grad_rel_err_{a}_vs_{b}"] = d, g
        assert d < 5e-2 and g < 5e-2, f"{a} vs {b}: logits {d}, gradients {g}"
    return out


def varlen_kernel_matches_sdpa() -> dict:
    """segment_attention through varlen against the per-length sdpa loop on random bf16 tensors: windows (no
    causality, equal heads) and packed text (causal, 16 query heads over 2 key/value heads), forward and backward."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    out = {}
    for name, causal, heads, kv in (("vision", False, 16, 16), ("text_gqa", True, 16, 2)):
        cu = [0, 64, 128, 160, 200, 456, 457, 1000]
        x = [torch.randn(1000, h, 128 if name == "text_gqa" else 80, device=DEVICE, generator=g,
                         dtype=torch.bfloat16, requires_grad=True) for h in (heads, kv, kv)]
        seg = make_segments(cu, "sdpa", x[0].device, x[0].dtype)
        assert seg.cu_device is not None
        fast = segment_attention(*x, seg, causal=causal, impl="sdpa")
        fast_grads = torch.autograd.grad(fast.float().square().sum(), x)
        ref = segment_attention(*x, Segments(cu), causal=causal, impl="sdpa")
        ref_grads = torch.autograd.grad(ref.float().square().sum(), x)
        d = (fast.float() - ref.float()).abs().max().item()
        gerr = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(fast_grads, ref_grads))
        out[f"{name}_max_diff"], out[f"{name}_grad_rel_err"] = d, gerr
        assert d < 2e-2 and gerr < 2e-2, f"{name}: output {d}, gradients {gerr}"
    return out


def forward_makes_no_host_sync() -> dict:
    """Forward with the loss (and, separately recorded, the backward) of a packed row under
    torch.cuda.set_sync_debug_mode("error"): cu_seqlens, labels and grids stay on the host."""
    model, _ = make_pair(dtype=torch.bfloat16)
    model = model.to(DEVICE).train()
    for p in model.parameters():  # as under LoRA: nothing before the first layer needs a gradient
        p.requires_grad_(False)
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.requires_grad_(True)
    batch = _packed_batch(model)
    model(**batch, return_logits=False).loss.backward()  # warm-up: allocations, cached rotary tables
    torch.cuda.synchronize()
    out = {}
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host wait now raises
    try:
        loss = model(**batch, return_logits=False).loss
        out["forward"] = "no sync"
        try:
            loss.backward()
            out["backward"] = "no sync"
        except RuntimeError as e:  # recorded, not a failure: the requirement is on the forward
            out["backward"] = f"synced: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out


CHECKS = [bf16_parity_with_transformers, varlen_kernel_matches_sdpa, varlen_sdpa_eager_agree,
          forward_makes_no_host_sync]


def main(path: str | None = None) -> dict:
    """Run every check, each on its own (a failure is recorded and the rest still run)."""
    import traceback

    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
               "varlen_args": sorted(attention._VARLEN_ARGS)}
    for check in CHECKS:
        try:
            results[check.__name__] = {"ok": True, **check()}
        except Exception as e:  # noqa: BLE001 - recorded in the JSON
            results[check.__name__] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                       "trace": traceback.format_exc()[-2000:]}
        print(check.__name__, json.dumps(results[check.__name__])[:400], flush=True)
    if path:
        Path(path).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="vlft's CUDA checks; exit 1 if one fails")
    ap.add_argument("--json", help="write the results here")
    results = main(ap.parse_args().json)
    sys.exit(1 if any(isinstance(v, dict) and not v.get("ok") for v in results.values()) else 0)
