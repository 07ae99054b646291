"""Video preprocessing (qwen-vl-utils' rules): PyAV reading with seeking, frame sampling, per-frame pixel budget,
the image patch layout per temporal group, and `second_per_grid_ts` from the frames actually sampled.

A video is a file PyAV can open (mp4, webm, mkv, ...), a folder of frame images (sorted by name) or a list of frame
images (paths or PIL images).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from vlft.data.errors import BadInput
from vlft.data.image import (FACTOR, MAX_DECODE_PIXELS, TEMPORAL_PATCH_SIZE, check_decode_size, load_image,
                             patchify_normalize, resize_rgb, smart_resize)

log = logging.getLogger(__name__)

FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * FACTOR * FACTOR  # 100352
VIDEO_MAX_PIXELS = 768 * FACTOR * FACTOR  # 602112
VIDEO_TOTAL_PIXELS = int(128000 * FACTOR * FACTOR * 0.9)  # 90316800
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Decoding forward is cheaper than a seek (which restarts at the previous keyframe) when the next wanted frame is near.
SEEK_MIN_GAP = 64

VideoLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike, Image.Image]]]


@dataclass
class VideoInfo:
    """What was sampled: indices into the source frames, the source rate and the rate actually kept."""

    frame_indices: list[int]
    total_frames: int  # frames in the [start, end] range
    video_fps: float
    sample_fps: float
    second_per_grid_t: float


def smart_nframes(total: int, video_fps: float, fps: float | None = FPS, nframes: int | None = None,
                  min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES) -> int:
    """How many frames to keep (qwen-vl-utils' smart_nframes rule): an even count in [2, total]."""
    if nframes is not None:
        n = round(nframes / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE
    else:
        fps = FPS if fps is None else fps
        lo = math.ceil(min_frames / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE
        hi = math.floor(min(max_frames, total) / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE
        n = total / video_fps * fps
        n = min(max(n, lo), hi, total)
        n = math.floor(n / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE
    if not 2 <= n <= total:
        raise BadInput(f"video has {total} frame(s) in range; cannot sample {n} (at least 2 frames are needed)")
    return int(n)


def frame_budget(n: int, min_pixels: int, max_pixels: int, total_pixels: int) -> tuple[int, int]:
    """Per-frame (min_pixels, max_pixels) so that n frames fit the total budget (qwen-vl-utils' rule)."""
    cap = max(min(VIDEO_MAX_PIXELS, total_pixels / n * TEMPORAL_PATCH_SIZE), int(min_pixels * 1.05))
    return min_pixels, int(min(max_pixels, cap))


def _sample_indices(first: int, last: int, n: int) -> list[int]:
    # numpy rounds half to even, like torch.round in qwen-vl-utils
    return np.linspace(first, last, n).round().astype(np.int64).tolist()


def frame_files(folder: Path) -> list[Path]:
    """The frames of a video given as a folder: its image files, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _open(path: Path):
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # av raises many error classes (InvalidDataError, OSError subclasses...)
        raise BadInput(f"cannot open video {path}: {e}") from None
    if not container.streams.video:
        container.close()
        raise BadInput(f"no video stream in {path}")
    return container


def _read_file(path: Path, fps, nframes, min_frames, max_frames, start, end, max_decode_pixels):
    """Decode only the sampled frames, seeking forward where the gap is large. Returns (PIL frames, VideoInfo)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        check_decode_size(stream.width, stream.height, max_decode_pixels, f"a frame of video {path}")
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise BadInput(f"video {path} has no frame rate")
        video_fps = float(rate)
        total_all = stream.frames
        if not total_all:  # webm/mkv often do not store a count: count packets (no decoding)
            total_all = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
        first = 0 if start is None else max(0, math.ceil(start * video_fps))
        last = total_all - 1 if end is None else min(total_all - 1, math.floor(end * video_fps))
        total = last - first + 1
        if total < 2:
            raise BadInput(f"video {path} has {max(total, 0)} frame(s) in the requested range; at least 2 are needed")
        n = smart_nframes(total, video_fps, fps, nframes, min_frames, max_frames)
        indices = _sample_indices(first, last, n)

        tb = float(stream.time_base)
        t0 = stream.start_time or 0

        def index_of(frame) -> int:
            return round((frame.pts - t0) * tb * video_fps) if frame.pts is not None else -1

        got: dict[int, Image.Image] = {}
        frames_iter, cur, cur_img = None, -1, None
        for target in sorted(set(indices)):
            if cur >= target and cur_img is not None:  # a frame is missing in the stream: keep the next one
                got[target] = cur_img
                continue
            if frames_iter is None or target - cur > SEEK_MIN_GAP:
                if target > 0:
                    container.seek(t0 + int(target / video_fps / tb), stream=stream, backward=True, any_frame=False)
                else:
                    container.seek(t0, stream=stream, backward=True, any_frame=False)
                frames_iter = container.decode(stream)
            for frame in frames_iter:
                cur = index_of(frame)
                if cur >= target:
                    cur_img = frame.to_image()
                    break
            if cur_img is None or cur < target:
                if cur_img is None:
                    raise BadInput(f"video {path}: no frame could be decoded")
                log.warning("video %s: frame %d not found (stream ends at %d); using the last frame", path, target, cur)
            got[target] = cur_img
        frames = [got[i] for i in indices]
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"cannot decode video {path}: {e}") from None
    finally:
        container.close()
    sample_fps = n / total * video_fps
    return frames, VideoInfo(indices, total, video_fps, sample_fps, TEMPORAL_PATCH_SIZE / sample_fps)


def _read_frames(frames: Sequence, fps, nframes, frames_fps, max_frames, max_decode_pixels):
    """Frames given as images. Without nframes/frames_fps every frame is kept (the frames are taken to be 1/fps s
    apart); with them, frames are sampled as from a file whose rate is frames_fps (default fps)."""
    total = len(frames)
    if total < 2:
        raise BadInput(f"video has {total} frame(s); at least 2 are needed")
    video_fps = frames_fps or fps or FPS
    if nframes is not None or frames_fps is not None:
        n = smart_nframes(total, video_fps, fps, nframes, min_frames=2, max_frames=max_frames)
        indices = _sample_indices(0, total - 1, n)
    elif total > max_frames:
        indices = _sample_indices(0, total - 1, max(2, max_frames // 2 * 2))
    else:
        indices = list(range(total))
    sample_fps = len(indices) / total * video_fps
    if len(indices) % TEMPORAL_PATCH_SIZE:  # an odd count: repeat the last frame (it covers no new time)
        indices.append(indices[-1])
    loaded = {i: load_image(frames[i], max_decode_pixels) for i in sorted(set(indices))}
    return [loaded[i] for i in indices], VideoInfo(indices, total, video_fps, sample_fps, TEMPORAL_PATCH_SIZE / sample_fps)


def process_video(
    video: VideoLike,
    fps: float | None = FPS,
    nframes: int | None = None,
    min_frames: int = MIN_FRAMES,
    max_frames: int = MAX_FRAMES,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
    start: float | None = None,
    end: float | None = None,
    frames_fps: float | None = None,
    tokens_per_second: float = 2.0,
    return_info: bool = False,
    max_decode_pixels: int = MAX_DECODE_PIXELS,
):
    """A video -> (pixel_values_videos [t*gh*gw, 1176] float32, video_grid_thw [1, 3] int64, second_per_grid_ts
    [1] float32), plus a VideoInfo when return_info.

    fps or nframes choose how many frames are kept (smart_nframes), start/end (seconds) restrict a file to a range.
    second_per_grid_ts = 2 / (frames kept / frames in range * source fps). A warning is logged when that interval
    times tokens_per_second is below 1, i.e. consecutive temporal groups would share a time position id.
    Frames larger than `max_decode_pixels` (from the header) make the video a bad input before anything is decoded.
    """
    if isinstance(video, (list, tuple)):
        frames, info = _read_frames(video, fps, nframes, frames_fps, max_frames, max_decode_pixels)
    else:
        path = Path(video)
        if path.is_dir():
            frames, info = _read_frames(frame_files(path), fps, nframes, frames_fps, max_frames, max_decode_pixels)
        elif not path.is_file():
            raise BadInput(f"video file not found: {path}")
        else:
            frames, info = _read_file(path, fps, nframes, min_frames, max_frames, start, end, max_decode_pixels)

    lo, hi = frame_budget(len(frames), min_pixels, max_pixels, total_pixels)
    h, w = smart_resize(frames[0].height, frames[0].width, lo, hi)
    stack = np.stack([resize_rgb(f, h, w) for f in frames])  # [T, h, w, 3] uint8
    pixels, grid = patchify_normalize(stack)
    if info.second_per_grid_t * tokens_per_second < 1:
        log.warning(
            "video %s: %.3g frames/s kept gives %.3g s per temporal patch; with tokens_per_second=%g consecutive "
            "frame pairs share a time position id (lower fps or raise max_frames' budget to avoid this)",
            video if not isinstance(video, (list, tuple)) else f"<{len(video)} frames>", info.sample_fps,
            info.second_per_grid_t, tokens_per_second)
    out = (torch.from_numpy(pixels), torch.tensor([grid], dtype=torch.int64),
           torch.tensor([info.second_per_grid_t], dtype=torch.float32))
    return (*out, info) if return_info else out
