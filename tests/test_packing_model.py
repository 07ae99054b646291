"""Packed rows: samples laid end to end in one row, isolated by cu_seqlens, give the logits of each run alone."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import make_pair, media_inputs
from vlft.model import get_rope_index


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_two_packed_samples_equal_separate_runs(impl):
    model, _ = make_pair()
    model.set_attn_implementation(impl)
    cfg = model.config
    a = media_inputs(cfg, [[3, ("image", (1, 8, 12)), 5]], seed=1)
    b = media_inputs(cfg, [[2, ("video", (2, 4, 8)), 7]], seed=2)
    sec = torch.tensor([1.0])
    with torch.no_grad():
        la = model(a["input_ids"], pixel_values=a["pixel_values"], image_grid_thw=a["image_grid_thw"]).logits
        lb = model(b["input_ids"], pixel_values_videos=b["pixel_values_videos"], video_grid_thw=b["video_grid_thw"],
                   second_per_grid_ts=sec).logits
        pa, _ = get_rope_index(cfg, a["input_ids"], image_grid_thw=a["image_grid_thw"])
        pb, _ = get_rope_index(cfg, b["input_ids"], video_grid_thw=b["video_grid_thw"], second_per_grid_ts=sec)
        na, nb, pad = a["input_ids"].shape[1], b["input_ids"].shape[1], 3
        ids = torch.cat([a["input_ids"], b["input_ids"], torch.zeros(1, pad, dtype=torch.long)], 1)
        pos = torch.cat([pa, pb, torch.zeros(3, 1, pad, dtype=torch.long)], 2)  # positions restart per sample
        packed = model(ids, position_ids=pos, pixel_values=a["pixel_values"], image_grid_thw=a["image_grid_thw"],
                       pixel_values_videos=b["pixel_values_videos"], video_grid_thw=b["video_grid_thw"],
                       second_per_grid_ts=sec, cu_seqlens=torch.tensor([0, na, na + nb, na + nb + pad])).logits
    assert (packed[0, :na] - la[0]).abs().max() < 1e-5
    assert (packed[0, na:na + nb] - lb[0]).abs().max() < 1e-5
    # without the boundaries the second sample would see the first: the test can tell the difference
    with torch.no_grad():
        leaky = model(ids, position_ids=pos, pixel_values=a["pixel_values"], image_grid_thw=a["image_grid_thw"],
                      pixel_values_videos=b["pixel_values_videos"], video_grid_thw=b["video_grid_thw"],
                      second_per_grid_ts=sec).logits
    assert (leaky[0, na:na + nb] - lb[0]).abs().max() > 1e-3


def test_packed_loss_never_predicts_across_a_boundary():
    model, _ = make_pair()
    ids = torch.randint(0, 250, (1, 10))
    labels = ids.clone()
    out = model(ids, labels=labels, cu_seqlens=[0, 4, 10], position_ids=torch.cat(
        [torch.arange(4), torch.arange(6)]).view(1, 1, -1).expand(3, 1, -1))
    # 3 targets in the first segment, 5 in the second: the 4 -> 5 prediction is dropped
    assert out.num_label_tokens.item() == 8
