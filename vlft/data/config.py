"""Data settings: the `data:` section of an experiment YAML (strictly typed, see vlft.config.build).

Pixel defaults are chosen for fine-tuning, not the Hub's 12.8 MP per image (a common cause of out-of-memory):
images default to at most 768 merged tokens (768*28*28 = 602112 px, e.g. 644x924) and at least 4 tokens; videos use
the qwen-vl-utils per-frame limits (128..768 tokens per frame pair) and a total budget of 16384 tokens per video,
both at 2 frames/s and 4..64 frames. Every limit can be set per dataset and per media item (`min_pixels`,
`max_pixels`, `fps`, `nframes`, ... inside a messages content item).

`validate_data` checks every value when a config loads, naming the key; `check_range` is the shared range check that
vlft/config.py uses for the other sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from vlft.data.image import FACTOR, MAX_DECODE_PIXELS
from vlft.errors import ConfigError

TOKEN_PIXELS = FACTOR * FACTOR  # pixels covered by one merged visual token


@dataclass
class DatasetConfig:
    path: str  # .json (a list of records), .jsonl, or .parquet; a directory or glob of them also works
    name: Optional[str] = None  # shown in errors and reports; default: the file name
    format: Literal["auto", "llava", "messages"] = "auto"
    weight: float = 1.0  # sampling multiplier: an epoch holds round(weight * len) samples of this dataset
    media_root: Optional[str] = None  # relative media paths resolve here; default: the dataset file's folder
    # Read as a stream, never indexed or held whole (datasets larger than memory). If any training dataset streams,
    # the whole training mix does: it is read in windows, shuffled within each window, and needs train.max_steps
    # (see vlft/data/streaming.py); a weight then sets the share of draws from this dataset.
    streaming: bool = False
    min_pixels: Optional[int] = None  # override DataConfig's image limits for this dataset
    max_pixels: Optional[int] = None
    video_min_pixels: Optional[int] = None
    video_max_pixels: Optional[int] = None
    video_total_pixels: Optional[int] = None
    video_fps: Optional[float] = None
    video_max_frames: Optional[int] = None
    grounding: Optional[Literal["rescale", "keep"]] = None  # override DataConfig.grounding for this dataset


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    eval_datasets: list[DatasetConfig] = field(default_factory=list)
    eval_split: float = 0.0  # fraction of the training mix held out for evaluation when eval_datasets is empty
    tokenizer: Optional[str] = None  # tokenizer folder; default: the model's folder
    min_pixels: int = 4 * TOKEN_PIXELS
    max_pixels: int = 768 * TOKEN_PIXELS
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 64
    video_min_pixels: int = 128 * TOKEN_PIXELS
    video_max_pixels: int = 768 * TOKEN_PIXELS
    video_total_pixels: int = 16384 * TOKEN_PIXELS * 2  # per video, over all frames (2 frames share a token)
    max_length: int = 4096
    # Packing: each micro-batch is micro_batch_size rows of up to max_length tokens, filled from the shuffled
    # dataset (first-fit decreasing within windows of packing_window samples) using the length index.
    packing: bool = False
    packing_window: int = 1000
    # Without packing: batch samples of similar length (sorted within windows of 64 micro-batches), less padding.
    group_by_length: bool = False
    # Where the length index is cached (default: $VLFT_CACHE_DIR or ~/.cache/vlft).
    cache_dir: Optional[str] = None
    overlength: Literal["drop", "truncate_text"] = "drop"
    last_turn_only: bool = False  # supervise only the last assistant reply
    system_prompt: Optional[str] = None  # default: the template's "You are a helpful assistant."
    max_skip_fraction: float = 0.01  # stop training when more than this fraction of samples was skipped
    skip_check_min_samples: int = 100  # the fraction is taken over at least this many samples
    num_workers: int = 2
    seed: int = 0
    # Largest image or video frame decoded (width x height as stored in the file, read from its header before any
    # pixel is decoded); larger files are bad samples, skipped and counted (decompression bombs). PIL's own limit,
    # about 179 Mpx, applies above this.
    max_decode_pixels: int = MAX_DECODE_PIXELS
    # Boxes and points written as Qwen2.5-VL's JSON ({"bbox_2d": [x1, y1, x2, y2]}, {"point_2d": [x, y]}) in user and
    # assistant text are in the original image's pixels and are rewritten to the resized image's pixels, which is
    # what the model reads and answers in; a box outside its image is a bad sample (docs/grounding.md). "keep" leaves
    # the text as written (coordinates already in resized pixels, or another convention such as 0-1000).
    grounding: Literal["rescale", "keep"] = "rescale"


def check_range(key: str, value: float | int | None, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """ConfigError naming `key` unless lo <= value <= hi (strict where open) and finite; None (unset) passes."""
    if value is None:
        return
    low = lo is not None and (value <= lo if lo_open else value < lo)
    high = hi is not None and (value >= hi if hi_open else value > hi)
    if math.isfinite(value) and not low and not high:
        return
    if lo is not None and hi is not None:
        rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rule = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        rule = f"{'<' if hi_open else '<='} {hi:g}"
    raise ConfigError(f"{key}: must be {rule}, got {value!r}")


def _check_dataset(d: DatasetConfig, key: str, cfg: "DataConfig") -> None:
    if not d.path:
        raise ConfigError(f"{key}.path: required (a .json, .jsonl or .parquet file, a folder or a glob)")
    check_range(f"{key}.weight", d.weight, 0)
    for name in ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "video_total_pixels",
                 "video_fps"):
        check_range(f"{key}.{name}", getattr(d, name), 0, lo_open=True)
    check_range(f"{key}.video_max_frames", d.video_max_frames, 2)
    for low, high in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
        lo, hi = getattr(d, low) or getattr(cfg, low), getattr(d, high) or getattr(cfg, high)
        if lo > hi:
            raise ConfigError(f"{key}: {low} {lo} is above {high} {hi} (per dataset or in the data section)")


def validate_data(cfg: DataConfig, where: str = "data") -> DataConfig:
    """Every data setting in range, each error naming its dotted key. Returns cfg."""
    if not cfg.datasets:
        raise ConfigError(f"{where}.datasets: at least one dataset is required")
    if cfg.tokenizer == "":
        raise ConfigError(f"{where}.tokenizer: empty; give a tokenizer folder or leave it unset (the model's folder)")
    check_range(f"{where}.eval_split", cfg.eval_split, 0, 1, hi_open=True)
    for name in ("min_pixels", "video_min_pixels", "video_total_pixels", "video_fps", "max_decode_pixels"):
        check_range(f"{where}.{name}", getattr(cfg, name), 0, lo_open=True)
    check_range(f"{where}.max_pixels", cfg.max_pixels, cfg.min_pixels)
    check_range(f"{where}.video_max_pixels", cfg.video_max_pixels, cfg.video_min_pixels)
    check_range(f"{where}.video_min_frames", cfg.video_min_frames, 1)
    check_range(f"{where}.video_max_frames", cfg.video_max_frames, max(2, cfg.video_min_frames))
    check_range(f"{where}.max_length", cfg.max_length, 1)
    check_range(f"{where}.max_skip_fraction", cfg.max_skip_fraction, 0, 1)
    for name in ("skip_check_min_samples", "num_workers", "seed"):
        check_range(f"{where}.{name}", getattr(cfg, name), 0)
    for name in ("datasets", "eval_datasets"):  # after the section's own values, which per-dataset limits default to
        for i, d in enumerate(getattr(cfg, name)):
            _check_dataset(d, f"{where}.{name}[{i}]", cfg)
    if sum(d.weight for d in cfg.datasets) == 0:
        raise ConfigError(f"{where}.datasets: every weight is 0, so an epoch holds no sample")
    return cfg
