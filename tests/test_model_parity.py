"""vlft's Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration holding the same random weights."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import make_pair, media_inputs

# (vision depth, full-attention blocks, mrope sections, tied head, heads, kv heads)
CONFIGS = {
    "untied-gqa2": dict(depth=4, fullatt=[1, 3], mrope=[4, 6, 6], tie=False, heads=4, kv_heads=2),
    "tied-mqa": dict(depth=5, fullatt=[0, 3], mrope=[2, 8, 6], tie=True, heads=4, kv_heads=1),
}

# Samples as lists of parts: n text tokens, or ("image"|"video", (t, h, w)) in patch units.
# (1, 12, 20) and (2, 8, 12) have merged grids that are not multiples of the 4x4 window. Videos keep
# (t - 1) * interval below max(h, w) / 2, where transformers 5.24 and the reference position rule agree
# (docs/positions.md#where-transformers-5x-differs).
INPUTS = {
    "one-image": ([[5, ("image", (1, 12, 20)), 6]], None),
    "several-images": ([[3, ("image", (1, 4, 4)), 2, ("image", (1, 8, 12)), 1, ("image", (1, 16, 16)), 4]], None),
    "video-1s": ([[4, ("video", (2, 8, 12)), 5]], [1.0]),
    "image-and-video": ([[2, ("image", (1, 12, 20)), 3, ("video", (2, 8, 8)), 2]], [1.0]),
    "padded-batch": ([[6, ("image", (1, 8, 8)), 9], [3, ("video", (2, 8, 12)), 2, ("image", (1, 4, 4)), 1]], [0.5]),
}


def _ours(inp, sec):
    kw = {k: v for k, v in inp.items() if k != "mm_token_type_ids"}
    if sec is not None:
        kw["second_per_grid_ts"] = torch.tensor(sec)
    return kw


def _theirs(inp, sec):
    kw = dict(inp)
    if sec is not None:
        kw["second_per_grid_ts"] = torch.tensor(sec)
    return kw


def _labels(inp):
    labels = inp["input_ids"].clone()
    labels[inp["attention_mask"] == 0] = -100
    labels[inp["mm_token_type_ids"] != 0] = -100
    return labels


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("inp_name", list(INPUTS))
def test_fp32_logits_loss_and_grads_match_transformers(cfg_name, inp_name):
    model, hf = make_pair(**CONFIGS[cfg_name])
    samples, sec = INPUTS[inp_name]
    inp = media_inputs(model.config, samples)
    labels = _labels(inp)
    ours = model(**_ours(inp, sec), labels=labels)
    ref = hf(**_theirs(inp, sec), labels=labels)
    valid = inp["attention_mask"].bool()
    diff = (ours.logits - ref.logits)[valid].abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff}"
    assert abs(ours.loss.item() - ref.loss.item()) <= 1e-4 * abs(ref.loss.item())
    ours.loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    from vlft.model.weights import to_hub_key

    hf_by_hub = {to_hub_key(k): p for k, p in hf_params.items()}
    checked = 0
    for name, p in model.named_parameters():
        g_ref = hf_by_hub[name].grad
        if g_ref is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        scale = g_ref.abs().max().item()
        err = (p.grad - g_ref).abs().max().item()
        assert err <= 1e-4 * max(scale, 1e-6), f"{name}: grad diff {err} vs scale {scale}"
        checked += 1
    assert checked > 20


def test_left_padding_matches_transformers():
    model, hf = make_pair(**CONFIGS["untied-gqa2"])
    samples, sec = INPUTS["padded-batch"]
    inp = media_inputs(model.config, samples, pad_side="left")
    with torch.no_grad():
        ours = model(**_ours(inp, sec)).logits
        ref = hf(**_theirs(inp, sec)).logits
    valid = inp["attention_mask"].bool()
    assert (ours - ref)[valid].abs().max() < 1e-4


def test_sdpa_equals_eager():
    model, _ = make_pair(**CONFIGS["untied-gqa2"])
    inp = media_inputs(model.config, INPUTS["image-and-video"][0])
    kw = _ours(inp, [1.0])
    with torch.no_grad():
        model.set_attn_implementation("eager")
        a = model(**kw).logits
        model.set_attn_implementation("sdpa")
        b = model(**kw).logits
    assert (a - b).abs().max() < 1e-5


def _bf16_logit_diff(cfg_name: str, inp_name: str) -> float:
    model, hf = make_pair(dtype=torch.bfloat16, **CONFIGS[cfg_name])
    model.set_attn_implementation("eager")
    samples, sec = INPUTS[inp_name]
    inp = media_inputs(model.config, samples)
    with torch.no_grad():
        ours = model(**_ours(inp, sec)).logits.float()
        ref = hf(**_theirs(inp, sec)).logits.float()
    assert ref.abs().max() > 0.1
    return (ours - ref)[inp["attention_mask"].bool()].abs().max().item()


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("inp_name", ["several-images", "video-1s"])
def test_bf16_logits_bit_identical_to_transformers_bf16_eager(cfg_name, inp_name):
    """Images only or videos only: bit-identical on CPU (the dtype flow of docs/numerics.md)."""
    assert _bf16_logit_diff(cfg_name, inp_name) == 0.0


def test_bf16_logits_of_a_batch_mixing_images_and_videos():
    """vlft runs a batch's images and videos through one vision-tower call (every rank then makes the same calls
    under ZeRO-3), transformers through two; CPU bf16 convolution rounds differently for different row counts, so
    such batches can differ in the last bits (measured 0.027 here, torch 2.13; see docs/numerics.md#bf16-parity)."""
    assert _bf16_logit_diff("untied-gqa2", "padded-batch") < 5e-2


def test_chunked_loss_equals_full_logits_loss_and_grads():
    model, _ = make_pair(**CONFIGS["tied-mqa"])
    inp = media_inputs(model.config, INPUTS["padded-batch"][0])
    kw, labels = _ours(inp, [0.5]), _labels(inp)
    full = model(**kw, labels=labels)
    full.loss.backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    import vlft.loss

    old = vlft.loss.CHUNK_ELEMENTS
    vlft.loss.CHUNK_ELEMENTS = 320 * 7  # 7 tokens per chunk: several chunks
    try:
        chunked = model(**kw, labels=labels, return_logits=False)
    finally:
        vlft.loss.CHUNK_ELEMENTS = old
    assert chunked.logits is None
    assert torch.allclose(chunked.loss, full.loss, rtol=1e-6, atol=1e-6)
    chunked.loss.backward()
    for n, p in model.named_parameters():
        if n in g_full:
            err, scale = (p.grad - g_full[n]).abs().max().item(), g_full[n].abs().max().item()
            assert err <= 1e-5 * max(scale, 1e-6), f"{n}: {err} vs {scale}"


def test_feature_token_mismatch_names_both_counts():
    model, _ = make_pair(**CONFIGS["untied-gqa2"])
    inp = media_inputs(model.config, INPUTS["one-image"][0])
    inp["input_ids"][0, 7] = 5  # one image pad token lost, e.g. to a bad truncation
    with pytest.raises(ValueError, match=r"tokens 59, features 60"):
        model(**_ours(inp, None))
