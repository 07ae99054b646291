"""Data settings: the `data:` section of an experiment YAML (strictly typed, see vlft.config.build).

Pixel defaults are chosen for fine-tuning, not the Hub's 12.8 MP per image (a common cause of out-of-memory):
images default to at most 768 merged tokens (768*28*28 = 602112 px, e.g. 644x924) and at least 4 tokens; videos use
the qwen-vl-utils per-frame limits (128..768 tokens per frame pair) and a total budget of 16384 tokens per video,
both at 2 frames/s and 4..64 frames. Every limit can be set per dataset and per media item (`min_pixels`,
`max_pixels`, `fps`, `nframes`, ... inside a messages content item).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from vlft.data.image import FACTOR

TOKEN_PIXELS = FACTOR * FACTOR  # pixels covered by one merged visual token


@dataclass
class DatasetConfig:
    path: str  # .json (a list of records), .jsonl, or .parquet; a directory or glob of them also works
    name: Optional[str] = None  # shown in errors and reports; default: the file name
    format: Literal["auto", "llava", "messages"] = "auto"
    weight: float = 1.0  # sampling multiplier: an epoch holds round(weight * len) samples of this dataset
    media_root: Optional[str] = None  # relative media paths resolve here; default: the dataset file's folder
    streaming: bool = False
    min_pixels: Optional[int] = None  # override DataConfig's image limits for this dataset
    max_pixels: Optional[int] = None
    video_min_pixels: Optional[int] = None
    video_max_pixels: Optional[int] = None
    video_total_pixels: Optional[int] = None
    video_fps: Optional[float] = None
    video_max_frames: Optional[int] = None


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
