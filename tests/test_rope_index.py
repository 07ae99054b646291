"""get_rope_index: hand-computed values (docs/positions.md) and agreement with transformers where the rules agree."""

from __future__ import annotations

import pytest
import torch

from model_fixtures import make_pair, media_inputs, tiny_config
from vlft.model import get_rope_index

VS, VE = "vs", "ve"


def _ids(cfg, parts):
    """parts: ints (text token ids), "vs"/"ve", or ("image"|"video", n_tokens)."""
    out = []
    for p in parts:
        if p == VS:
            out.append(cfg.vision_start_token_id)
        elif p == VE:
            out.append(cfg.vision_end_token_id)
        elif isinstance(p, tuple):
            out += [cfg.image_token_id if p[0] == "image" else cfg.video_token_id] * p[1]
        else:
            out.append(p)
    return out


def test_example_A_image():
    cfg = tiny_config()
    ids = torch.tensor([_ids(cfg, [10, 11, 12, VS, ("image", 6), VE, 20, 21])])
    pos, delta = get_rope_index(cfg, ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9]
    assert delta.tolist() == [[-3]]


def test_example_B_video_longer_than_its_grid_uses_reference_rule():
    # docs/positions.md example B: video grid (4, 4, 4), second_per_grid_t 1.0, tokens_per_second 2: time ids step
    # by 2 and run past the grid; text after the video restarts at max + 1 = 9 (transformers 5.24 would restart at 4).
    cfg = tiny_config()
    ids = torch.tensor([_ids(cfg, [7, VS, ("video", 16), VE, 8, 9])])
    pos, delta = get_rope_index(cfg, ids, video_grid_thw=torch.tensor([[4, 4, 4]]),
                                second_per_grid_ts=torch.tensor([1.0]))
    assert pos[0, 0].tolist() == [0, 1] + [2] * 4 + [4] * 4 + [6] * 4 + [8] * 4 + [9, 10, 11]
    assert pos[1, 0].tolist() == [0, 1] + [2, 2, 3, 3] * 4 + [9, 10, 11]
    assert pos[2, 0].tolist() == [0, 1] + [2, 3, 2, 3] * 4 + [9, 10, 11]
    assert delta.tolist() == [[-9]]


def test_example_B2_fractional_interval_is_not_truncated_first():
    cfg = tiny_config()
    ids = torch.tensor([_ids(cfg, [7, VS, ("video", 16), VE])])
    pos, _ = get_rope_index(cfg, ids, video_grid_thw=torch.tensor([[4, 4, 4]]), second_per_grid_ts=[0.5])
    assert pos[0, 0, 2:18].tolist() == [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4


def test_example_C_left_padded_batch_reference_values():
    # docs/positions.md example C (reference rule): rope_deltas [[-8], [-5]], padding filled with 1.
    cfg = tiny_config()
    s0 = _ids(cfg, [5, VS, ("image", 4), VE, VS, ("image", 6), VE, 6])
    s1 = _ids(cfg, [5, VS, ("video", 8), VE, VS, ("image", 4), VE, 6, 7])
    ids = torch.tensor([[0, 0, 0] + s0, s1])
    mask = torch.tensor([[0, 0, 0] + [1] * len(s0), [1] * len(s1)])
    pos, delta = get_rope_index(cfg, ids, image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 6], [1, 4, 4]]),
                                video_grid_thw=torch.tensor([[2, 4, 4]]), second_per_grid_ts=[2.0],
                                attention_mask=mask)
    assert pos[0, 0].tolist() == [1, 1, 1, 0, 1, 2, 2, 2, 2, 4, 5, 6, 6, 6, 6, 6, 6, 9, 10]
    assert pos[2, 0].tolist() == [1, 1, 1, 0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10]
    # sample 1: video time ids step by 4 (2.0 s x 2 tokens/s); text after the video restarts at max + 1 = 7
    assert pos[0, 1].tolist() == [0, 1, 2, 2, 2, 2, 6, 6, 6, 6, 7, 8, 9, 9, 9, 9, 11, 12, 13]
    assert pos[1, 1].tolist() == [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 7, 8, 9, 9, 10, 10, 11, 12, 13]
    assert delta.tolist() == [[-8], [-5]]


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_equal_to_transformers_where_rules_agree(pad_side):
    model, hf = make_pair()
    cfg = model.config
    samples = [[4, ("image", (1, 8, 12)), 3, ("video", (2, 8, 12)), 2], [2, ("video", (3, 4, 8)), 5], [9]]
    inp = media_inputs(cfg, samples, pad_side=pad_side)
    sec = torch.tensor([1.0, 0.25])
    ours, ours_delta = get_rope_index(cfg, inp["input_ids"], inp.get("image_grid_thw"), inp["video_grid_thw"], sec,
                                      inp["attention_mask"])
    ref, ref_delta = hf.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp.get("image_grid_thw"),
                                             inp["video_grid_thw"], sec, inp["attention_mask"])
    valid = inp["attention_mask"].bool()
    assert torch.equal(ours[:, valid], ref[:, valid])
    # deltas: the reference counts the padded length, 5.24 the kept tokens
    pads = (~valid).sum(1, keepdim=True)
    assert torch.equal(ours_delta, ref_delta - pads)


def test_block_length_not_matching_grid_is_an_error():
    cfg = tiny_config()
    ids = torch.tensor([_ids(cfg, [7, VS, ("image", 5), VE])])
    with pytest.raises(ValueError, match=r"should hold 6 pad tokens for grid \(1, 4, 6\) but holds 5"):
        get_rope_index(cfg, ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
