"""Image preprocessing: smart_resize branches and exact parity with transformers' PIL-backend image processor."""

import numpy as np
import pytest
import torch
from data_fixtures import rand_image

from vlft.data import BadInput, process_image, smart_resize
from vlft.data.image import normalize, resize_rgb

HUB = (3136, 12845056)


@pytest.mark.parametrize("hw, limits, expected", [
    ((375, 500), HUB, (364, 504)),
    ((70, 98), HUB, (56, 112)),  # 2.5 -> 2 and 3.5 -> 4: round half to even
    ((1080, 1920), (3136, 1003520), (728, 1316)),  # above max
    ((4000, 3000), (3136, 1003520), (1148, 840)),
    ((20, 30), HUB, (56, 84)),  # below min
    ((10, 1000), HUB, (28, 560)),  # thin: a side rounds to 0, fixed by the min branch
    ((14, 2000), HUB, (28, 672)),
    ((700, 20), HUB, (700, 28)),
])
def test_smart_resize_matches_transformers_table(hw, limits, expected):
    assert smart_resize(*hw, *limits) == expected


def _hf(img, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=[img], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize("h, w, mode, limits", [
    (375, 500, "RGB", (3136, 28 * 28 * 768)),   # plain rounding
    (70, 98, "RGB", (3136, 28 * 28 * 768)),     # half to even
    (300, 420, "RGB", (3136, 28 * 28 * 30)),    # above max
    (20, 30, "RGB", (3136, 28 * 28 * 768)),     # below min
    (10, 1000, "RGB", (3136, 28 * 28 * 768)),   # thin
    (700, 20, "L", (3136, 28 * 28 * 768)),      # grey, thin the other way
    (64, 80, "RGBA", (3136, 28 * 28 * 768)),    # transparency composited on white
])
def test_parity_with_transformers_pil_processor(h, w, mode, limits):
    img = rand_image(h, w, mode, seed=h + w)
    ours, grid = process_image(img, *limits)
    theirs, their_grid = _hf(img, *limits)
    assert torch.equal(grid, their_grid)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_patch_layout_matches_row_formula():
    img = rand_image(56, 84, seed=3)  # multiple of 28: no resize
    pixels, grid = process_image(img, 3136, 10**6)
    X = normalize(resize_rgb(img, 56, 84))  # [3, 56, 84]
    gw = 84 // 14
    for ph, pw, c, t, py, px in [(0, 0, 0, 0, 0, 0), (3, 5, 2, 1, 13, 7), (2, 1, 1, 0, 4, 9)]:
        bh, mh, bw, mw = ph // 2, ph % 2, pw // 2, pw % 2
        r = ((bh * (gw // 2) + bw) * 2 + mh) * 2 + mw
        assert pixels[r, c * 392 + t * 196 + py * 14 + px].item() == X[c, ph * 14 + py, pw * 14 + px]
    assert torch.equal(pixels.view(-1, 3, 2, 196)[:, :, 0], pixels.view(-1, 3, 2, 196)[:, :, 1])
    assert grid.tolist() == [[1, 4, 6]]


def test_bad_images(tmp_path):
    with pytest.raises(BadInput, match="aspect ratio"):
        process_image(rand_image(2, 500), 3136, 10**6)
    with pytest.raises(BadInput, match="not found"):
        process_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadInput, match="cannot read image"):
        process_image(tmp_path / "empty.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage" * 10)
    with pytest.raises(BadInput, match="cannot read image"):
        process_image(tmp_path / "corrupt.jpg")


def test_path_and_pil_give_the_same(tmp_path):
    img = rand_image(50, 60, seed=1)
    img.save(tmp_path / "a.png")
    a, ga = process_image(tmp_path / "a.png", 3136, 10**6)
    b, gb = process_image(img, 3136, 10**6)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert np.isfinite(a.numpy()).all()
