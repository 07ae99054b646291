"""The length index: the token count of every sample, measured without decoding pictures or videos.

Packing fills rows of `data.max_length` tokens from the shuffled dataset before any sample is processed, so it needs
each sample's length up front. A length is exact: the conversation is tokenised by the training template, and each
picture or video contributes the merged-token count that its processing would give, computed from the image header
(size) or the video's container metadata (frame count, rate, frame size) through the same sizing rules
(`smart_resize`, `smart_nframes`, `frame_budget`). Nothing is decoded, so measuring is fast; a sample whose length
cannot be measured (a missing file, a bad record) gets -1 and is reported, skipped and counted when it is read.

The index is computed once per dataset file and cached under `data.cache_dir` (default `~/.cache/vlft`, or
`$VLFT_CACHE_DIR`), keyed by a fingerprint of the dataset files (path, size, modification time), the settings that
change lengths (pixel and frame limits, fps, over-length policy, system prompt, last-turn-only, grounding) and the
tokenizer's vocabulary. Changing a media file in place without touching the dataset file is not detected: the lengths
of such a sample are then estimates, which only affects how full the rows are (the collator packs by the real lengths).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlft.data.config import DataConfig, DatasetConfig
from vlft.data.errors import BadInput, SampleError
from vlft.data.formats import RecordSource, dataset_files
from vlft.data.image import FACTOR, MAX_DECODE_PIXELS, TEMPORAL_PATCH_SIZE, check_decode_size, image_size, smart_resize
from vlft.data.template import media_of
from vlft.data.video import FPS, _open, frame_budget, frame_files, smart_nframes

INDEX_VERSION = 1
UNMEASURABLE = -1  # a sample whose length could not be measured (it will be skipped when read)


# ---------------------------------------------------------------------------------------------- one sample
def image_tokens(source: Any, min_pixels: int, max_pixels: int, max_decode_pixels: int = MAX_DECODE_PIXELS) -> int:
    """Merged tokens of a picture, as `process_image` would give them, from its header."""
    h, w = smart_resize(*image_size(source, max_decode_pixels), min_pixels, max_pixels)
    return (h // FACTOR) * (w // FACTOR)


def _file_frames(path: Path, fps, nframes, min_frames, max_frames, start, end) -> tuple[int, int, int]:
    """(frames kept, frame height, frame width) of a video file from its container metadata."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise BadInput(f"video {path} has no frame rate")
        video_fps = float(rate)
        total_all = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        first = 0 if start is None else max(0, math.ceil(start * video_fps))
        last = total_all - 1 if end is None else min(total_all - 1, math.floor(end * video_fps))
        if last - first + 1 < 2:
            raise BadInput(f"video {path} has fewer than 2 frames in the requested range")
        n = smart_nframes(last - first + 1, video_fps, fps, nframes, min_frames, max_frames)
        return n, stream.codec_context.height, stream.codec_context.width
    finally:
        container.close()


def _listed_frames(frames: list, fps, nframes, frames_fps, max_frames, max_decode_pixels) -> tuple[int, int, int]:
    """(frames kept, height, width) of a video given as frame images (the rule of `process_video` for frames)."""
    total = len(frames)
    if total < 2:
        raise BadInput(f"video has {total} frame(s); at least 2 are needed")
    if nframes is not None or frames_fps is not None:
        n = smart_nframes(total, frames_fps or fps or FPS, fps, nframes, min_frames=2, max_frames=max_frames)
    elif total > max_frames:
        n = max(2, max_frames // 2 * 2)
    else:
        n = total + total % TEMPORAL_PATCH_SIZE  # an odd count repeats the last frame
    return (n, *image_size(frames[0], max_decode_pixels))


def video_tokens(source: Any, fps=None, nframes=None, min_frames=4, max_frames=64, min_pixels=0, max_pixels=0,
                 total_pixels=0, start=None, end=None, frames_fps=None, max_decode_pixels=MAX_DECODE_PIXELS) -> int:
    """Merged tokens of a video, as `process_video` would give them (same arguments)."""
    if isinstance(source, (list, tuple)):
        n, h, w = _listed_frames(list(source), fps, nframes, frames_fps, max_frames, max_decode_pixels)
    else:
        path = Path(source)
        if path.is_dir():
            n, h, w = _listed_frames(frame_files(path), fps, nframes, frames_fps, max_frames,
                                     max_decode_pixels)
        elif not path.is_file():
            raise BadInput(f"video file not found: {path}")
        else:
            n, h, w = _file_frames(path, fps, nframes, min_frames, max_frames, start, end)
    check_decode_size(w, h, max_decode_pixels, f"a frame of video {source}")
    lo, hi = frame_budget(n, min_pixels, max_pixels, total_pixels)
    rh, rw = smart_resize(h, w, lo, hi)
    return n // TEMPORAL_PATCH_SIZE * (rh // FACTOR) * (rw // FACTOR)


def sample_length(processor, record: Any, dc: DatasetConfig, index: int) -> int:
    """Tokens the sample will have after the over-length policy (0: it will be dropped as over-length;
    UNMEASURABLE: it cannot be read and will be skipped). `processor` is the dataset's SampleProcessor."""
    try:
        messages = processor.ground(processor.messages(record, dc), dc)  # rewritten boxes change the text
        ceiling = processor.cfg.max_decode_pixels
        tokens = [image_tokens(m.source, **processor.image_options(m, dc), max_decode_pixels=ceiling)
                  if m.kind == "image" else video_tokens(m.source, **processor.video_options(m, dc),
                                                         max_decode_pixels=ceiling)
                  for m in media_of(messages)]
        input_ids, labels = processor.encode(messages, tokens)
        input_ids, _ = processor.fit(input_ids, labels, "", index)
    except BadInput:
        return UNMEASURABLE
    except SampleError as e:
        return 0 if e.kind == "overlength" else UNMEASURABLE
    return len(input_ids)


# ---------------------------------------------------------------------------------------------- a whole file
def fingerprint(cfg: DataConfig, dc: DatasetConfig, tokenizer) -> str:
    """What the lengths of one dataset depend on, hashed."""
    files = [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in dataset_files(dc.path)]
    settings = {k: getattr(cfg, k) for k in ("min_pixels", "max_pixels", "video_fps", "video_min_frames",
                                             "video_max_frames", "video_min_pixels", "video_max_pixels",
                                             "video_total_pixels", "max_length", "overlength", "last_turn_only",
                                             "system_prompt", "max_decode_pixels", "grounding")}
    per_dataset = {k: getattr(dc, k) for k in ("format", "media_root", "min_pixels", "max_pixels",
                                               "video_min_pixels", "video_max_pixels", "video_total_pixels",
                                               "video_fps", "video_max_frames", "grounding")}
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    blob = json.dumps({"version": INDEX_VERSION, "files": files, "data": settings, "dataset": per_dataset,
                       "vocab": vocab, "template": getattr(tokenizer, "chat_template", None) is not None},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("VLFT_CACHE_DIR") or Path.home() / ".cache" / "vlft")


class _Measure(torch.utils.data.Dataset):
    """Rows of one source for a DataLoader, so that several workers measure in parallel."""

    def __init__(self, source: RecordSource, processor, dc: DatasetConfig):
        self.source, self.processor, self.dc = source, processor, dc

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, row: int) -> int:
        record, _ = self.source.get(row)  # a bad line comes back as its BadInput
        return sample_length(self.processor, record, self.dc, row)


def measure_source(source: RecordSource, processor, dc: DatasetConfig, num_workers: int = 0) -> np.ndarray:
    """[rows] int32 lengths of every record of one source."""
    loader = torch.utils.data.DataLoader(_Measure(source, processor, dc), batch_size=256, num_workers=num_workers,
                                         collate_fn=list)
    return np.asarray([n for chunk in loader for n in chunk], dtype=np.int32)


def load_or_measure(source: RecordSource, processor, cfg: DataConfig, dc: DatasetConfig, num_workers: int = 0,
                    write: bool = True) -> np.ndarray:
    """The cached lengths of `source` when the fingerprint matches, else measured (and cached when `write`)."""
    path = cache_dir(cfg) / "lengths" / f"{fingerprint(cfg, dc, processor.tokenizer)}.npy"
    if path.is_file():
        lengths = np.load(path, allow_pickle=False)
        if lengths.shape == (len(source),):
            return lengths
    lengths = measure_source(source, processor, dc, num_workers)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, lengths, allow_pickle=False)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    return lengths


def cached(cfg: DataConfig, dc: DatasetConfig, tokenizer) -> bool:
    """Whether the index of this dataset is already in the cache (no measuring needed)."""
    return (cache_dir(cfg) / "lengths" / f"{fingerprint(cfg, dc, tokenizer)}.npy").is_file()


def dataset_lengths(dataset, num_workers: int = 0, write: bool = True) -> list[list[int]]:
    """Lengths of every row of every source of a MixedDataset (cached, see `load_or_measure`)."""
    return [load_or_measure(src, dataset.processor, dataset.cfg, dc, num_workers, write).tolist()
            for src, dc in zip(dataset.sources, dataset.datasets)]


def epoch_zero_plan(dataset, lengths: list[list[int]] | None, settings, world: int,
                    gradient_accumulation: int) -> tuple[int, str]:
    """Optimizer steps of epoch 0's batch plan and the line that says what a micro-batch holds (sampler.describe):
    what a training run prints, and `vlft data check` reports."""
    from vlft.data.sampler import describe, plan_epoch

    dataset.set_epoch(0)
    in_order = epoch_lengths(dataset, lengths)
    return describe(plan_epoch(in_order, settings, 0), in_order, settings, world, gradient_accumulation)


def epoch_lengths(dataset, lengths: list[list[int]] | None) -> list[int]:
    """Token counts in the order of the dataset's current epoch (zeros when no index was needed)."""
    if lengths is None:
        return [0] * len(dataset)
    return [lengths[d][row] for d, row in dataset.order]
