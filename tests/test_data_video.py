"""Video: PyAV decoding (with seeking), frame sampling rules (qwen-vl-utils'), second_per_grid_ts from the frames kept,
the collapse warning, frame lists and folders, and the patch layout per temporal group."""

import logging

import numpy as np
import pytest
import torch
from data_fixtures import frame_value, make_video, rand_image

from vlft.data import BadInput, process_image, process_video, smart_nframes
from vlft.data.image import CLIP_MEAN, CLIP_STD

SMALL = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 4, total_pixels=10**9)


@pytest.mark.parametrize("total, fps, expected", [(300, 30, 20), (301, 29.97, 20), (90, 30, 6), (10, 30, 4),
                                                  (36000, 30, 768)])
def test_smart_nframes_matches_qwen_vl_utils_table(total, fps, expected):
    assert smart_nframes(total, fps, 2.0) == expected


def _grey_levels(pixels, grid):
    """Mean pixel value (0..255) of each frame, undoing CLIP normalisation on channel 0."""
    t = grid[0, 0].item()
    x = pixels.view(t, -1, 3, 2, 196)[:, :, 0]  # [t, patches, 2 frames, 196]
    x = x * CLIP_STD[0] + CLIP_MEAN[0]
    return (x.mean(dim=(1, 3)) * 255).reshape(-1)  # frame order: group-major, then the 2 frames of the group


@pytest.mark.parametrize("n, rate, kwargs, frames, spgt", [
    (90, 30, dict(fps=2.0), [0, 18, 36, 53, 71, 89], 1.0),        # 3 s at 2 fps
    (10, 30, dict(fps=2.0), [0, 3, 6, 9], 2 / 12),                 # min_frames 4 beats fps: 12 fps actually sampled
    (60, 30, dict(fps=1.0), [0, 20, 39, 59], 1.0),                 # 2 s at 1 fps -> 2 frames -> min 4 frames
    (40, 10, dict(fps=2.0), [0, 6, 11, 17, 22, 28, 33, 39], 2 / 2.0),  # 4 s at 10 fps: rounded linspace(0, 39, 8)
    (40, 10, dict(nframes=6), [0, 8, 16, 23, 31, 39], 2 / 1.5),    # nframes: 6 over 40 frames at 10 fps
])
def test_file_sampling_and_seconds(tmp_path, n, rate, kwargs, frames, spgt):
    path = make_video(tmp_path / "v.mp4", n, rate)
    pixels, grid, secs, info = process_video(path, **kwargs, **SMALL, return_info=True)
    assert info.frame_indices == frames
    assert secs.dtype == torch.float32 and secs.tolist() == pytest.approx([spgt], rel=1e-6)
    assert grid[0, 0].item() == len(frames) // 2 and pixels.shape == (grid.prod().item(), 1176)
    levels = _grey_levels(pixels, grid)
    assert torch.allclose(levels, torch.tensor([float(frame_value(i)) for i in frames]), atol=3.0), levels


def test_seek_with_range_and_sparse_frames(tmp_path):
    path = make_video(tmp_path / "long.mp4", 400, 25, gop=10)
    pixels, grid, secs, info = process_video(path, nframes=4, start=2.0, end=14.0, **SMALL, return_info=True)
    assert info.frame_indices == [50, 150, 250, 350] and info.total_frames == 301
    expected = torch.tensor([float(frame_value(i)) for i in info.frame_indices])
    assert torch.allclose(_grey_levels(pixels, grid), expected, atol=3.0)
    assert secs.item() == pytest.approx(2 / (4 / 301 * 25))


@pytest.mark.parametrize("codec, ext", [("libvpx", "webm"), ("mpeg4", "mkv")])
def test_other_containers(tmp_path, codec, ext):
    path = make_video(tmp_path / f"v.{ext}", 20, 10, codec=codec)
    pixels, grid, secs, info = process_video(path, fps=2.0, **SMALL, return_info=True)
    assert info.total_frames == 20 and len(info.frame_indices) == 4 and secs.item() == pytest.approx(1.0)


def test_collapse_warning(tmp_path, caplog):
    path = make_video(tmp_path / "short.mp4", 10, 30)
    with caplog.at_level(logging.WARNING, logger="vlft.data.video"):
        process_video(path, fps=2.0, **SMALL)
    assert "share a time position id" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlft.data.video"):
        process_video(make_video(tmp_path / "ok.mp4", 90, 30), fps=2.0, **SMALL)
    assert "share a time position id" not in caplog.text


def test_under_two_frames(tmp_path):
    with pytest.raises(BadInput, match="at least 2"):
        process_video(make_video(tmp_path / "one.mp4", 1, 10), **SMALL)
    with pytest.raises(BadInput, match="at least 2"):
        process_video([rand_image(28, 28)], **SMALL)
    with pytest.raises(BadInput, match="not found"):
        process_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 20)
    with pytest.raises(BadInput, match="cannot open video"):
        process_video(tmp_path / "junk.mp4")


def test_frames_list_and_folder(tmp_path):
    frames = [rand_image(40, 56, seed=i) for i in range(5)]
    pixels, grid, secs, info = process_video(frames, fps=1.0, **SMALL, return_info=True)
    assert info.frame_indices == [0, 1, 2, 3, 4, 4]  # odd count: the last frame repeated
    assert grid[0, 0].item() == 3 and secs.item() == pytest.approx(2.0)  # frames 1 s apart -> 2 s per patch
    for i, f in enumerate(frames):
        f.save(tmp_path / f"{i:03d}.png")
    p2, g2, s2 = process_video(tmp_path, fps=1.0, **SMALL)
    assert torch.equal(pixels, p2) and torch.equal(grid, g2) and torch.equal(secs, s2)
    # sampled from a list recorded at 10 fps
    _, _, s3, info3 = process_video(frames, fps=5.0, frames_fps=10.0, **SMALL, return_info=True)
    assert info3.frame_indices == [0, 4] and s3.item() == pytest.approx(2 / (2 / 5 * 10))


def test_temporal_groups_have_the_image_layout():
    frames = [rand_image(56, 84, seed=i) for i in range(4)]
    budget = dict(min_pixels=3136, max_pixels=56 * 84, total_pixels=10**9)
    pixels, grid, _ = process_video(frames, **budget)
    assert grid.tolist() == [[2, 4, 6]]
    per_group = pixels.view(2, 24, 3, 2, 196)
    for g in range(2):
        for t in range(2):
            img_pixels, img_grid = process_image(frames[2 * g + t], 3136, 56 * 84)
            assert img_grid.tolist() == [[1, 4, 6]]
            assert torch.equal(per_group[g, :, :, t], img_pixels.view(24, 3, 2, 196)[:, :, 0])
    # two identical frames are exactly the still image
    same, _, _ = process_video([frames[0], frames[0]], **budget)
    assert torch.equal(same, process_image(frames[0], 3136, 56 * 84)[0])


def test_total_pixel_budget_shrinks_frames():
    frames = [rand_image(280, 280, seed=i) for i in range(8)]
    _, big, _ = process_video(frames, min_pixels=3136, max_pixels=280 * 280, total_pixels=10**9)
    _, small, _ = process_video(frames, min_pixels=3136, max_pixels=280 * 280, total_pixels=8 * 28 * 28 * 4 // 2)
    assert big.tolist() == [[4, 20, 20]]
    # per-frame cap = max(min(602112, total/8*2), 3136*1.05) = 3292 -> 56x56
    assert small.tolist() == [[4, 4, 4]] and np.prod(small.tolist()) < np.prod(big.tolist())
