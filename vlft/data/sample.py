"""One record -> one training sample: media decoded once, the conversation tokenised by the training template,
the over-length policy applied. A sample that cannot be used comes out as a `Skipped` record (logged with dataset,
index and reason) instead of being replaced by another; the collator passes those on to be counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlft.data.config import DataConfig, DatasetConfig
from vlft.data.errors import BadInput, SampleError, sample_label
from vlft.data.formats import MediaResolver, to_messages
from vlft.data.grounding import image_scale, rescale_messages
from vlft.data.image import MERGE_SIZE, process_image
from vlft.data.template import IGNORE_INDEX, SpecialIds, encode_conversation, media_of
from vlft.data.video import process_video
from vlft.model.vision_index import merged_tokens

log = logging.getLogger(__name__)


@dataclass
class Skipped:
    """A sample left out: kind "bad" or "overlength"."""

    dataset: str
    index: int
    reason: str
    kind: str = "bad"
    where: str = ""  # file and line, e.g. "data/train.jsonl line 7"

    def __str__(self) -> str:
        return f"{sample_label(self.dataset, self.index, self.where)}: {self.reason}"


def default_media_root(path: str) -> Path:
    """Without media_root, media paths are relative to the dataset file's folder (or the dataset folder itself)."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def dataset_name(dc: DatasetConfig) -> str:
    return dc.name or Path(dc.path).name


class SampleProcessor:
    """record -> {input_ids [L], labels [L], pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
    second_per_grid_ts} (media keys absent when the sample has none). Raises SampleError."""

    def __init__(self, cfg: DataConfig, tokenizer, tokens_per_second: float = 2.0):
        self.cfg, self.tokenizer, self.tokens_per_second = cfg, tokenizer, tokens_per_second
        self.ids = SpecialIds.from_tokenizer(tokenizer)

    def image_options(self, media, dc: DatasetConfig) -> dict:
        """Pixel limits of one image: the item's own, else its dataset's, else the data section's."""
        o = media.options
        return {"min_pixels": int(o.get("min_pixels") or dc.min_pixels or self.cfg.min_pixels),
                "max_pixels": int(o.get("max_pixels") or dc.max_pixels or self.cfg.max_pixels)}

    def video_options(self, media, dc: DatasetConfig) -> dict:
        """Frame sampling and pixel limits of one video, resolved like `image_options`."""
        o, c = media.options, self.cfg
        return {
            "fps": None if "nframes" in o else float(o.get("fps") or dc.video_fps or c.video_fps),
            "nframes": o.get("nframes"),
            "min_frames": int(o.get("min_frames") or c.video_min_frames),
            "max_frames": int(o.get("max_frames") or dc.video_max_frames or c.video_max_frames),
            "min_pixels": int(o.get("min_pixels") or dc.video_min_pixels or c.video_min_pixels),
            "max_pixels": int(o.get("max_pixels") or dc.video_max_pixels or c.video_max_pixels),
            "total_pixels": int(o.get("total_pixels") or dc.video_total_pixels or c.video_total_pixels),
            "start": o.get("video_start"), "end": o.get("video_end"), "frames_fps": o.get("frames_fps"),
        }

    def messages(self, record: Any, dc: DatasetConfig, root: str | None = None) -> list:
        """The record as messages with media paths resolved under the dataset's media root (raises BadInput)."""
        if isinstance(record, BadInput):
            raise record
        resolver = MediaResolver(dc.media_root or root or default_media_root(dc.path))
        return to_messages(record, dc.format, resolver)

    def ground(self, messages: list, dc: DatasetConfig) -> list:
        """Boxes and points moved to the resized images' pixels, when the dataset's grounding setting says so
        (raises BadInput naming a bad box). Training, eval, data check and the length index all go through here."""
        if (dc.grounding or self.cfg.grounding) == "keep":
            return messages
        return rescale_messages(messages, lambda m: image_scale(m.source, **self.image_options(m, dc),
                                                                max_decode_pixels=self.cfg.max_decode_pixels))

    def encode(self, messages: list, media_tokens: list[int]) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation whose k-th media item has media_tokens[k] merged tokens."""
        return encode_conversation(messages, self.tokenizer, media_tokens, self.cfg.last_turn_only,
                                   self.cfg.system_prompt, ids=self.ids)

    def __call__(self, record: Any, dc: DatasetConfig, index: int, root: str | None = None, where: str = "") -> dict:
        name = dataset_name(dc)
        try:
            messages = self.ground(self.messages(record, dc, root), dc)
            images, videos, tokens = [], [], []
            for m in media_of(messages):  # each item decoded exactly once
                if m.kind == "image":
                    px, grid = process_image(m.source, **self.image_options(m, dc),
                                             max_decode_pixels=self.cfg.max_decode_pixels)
                    images.append((px, grid))
                else:
                    px, grid, secs = process_video(m.source, **self.video_options(m, dc),
                                                   tokens_per_second=self.tokens_per_second,
                                                   max_decode_pixels=self.cfg.max_decode_pixels)
                    videos.append((px, grid, secs))
                tokens.append(merged_tokens(grid, MERGE_SIZE))
            input_ids, labels = self.encode(messages, tokens)
        except BadInput as e:
            raise SampleError(name, index, str(e), where=where) from None
        input_ids, labels = self.fit(input_ids, labels, name, index, where)
        out = {"input_ids": torch.tensor(input_ids, dtype=torch.long),
               "labels": torch.tensor(labels, dtype=torch.long)}
        if images:
            out["pixel_values"] = _cat([p for p, _ in images])
            out["image_grid_thw"] = _cat([g for _, g in images])
        if videos:
            out["pixel_values_videos"] = _cat([p for p, _, _ in videos])
            out["video_grid_thw"] = _cat([g for _, g, _ in videos])
            out["second_per_grid_ts"] = _cat([s for _, _, s in videos])
        return out

    def fit(self, input_ids: list[int], labels: list[int], name: str, index: int, where: str = ""):
        """Apply the over-length policy: never cut inside a vision block."""
        L, max_len = len(input_ids), self.cfg.max_length
        if L <= max_len:
            return input_ids, labels
        if self.cfg.overlength == "truncate_text":
            ends = [i for i, t in enumerate(input_ids) if t == self.ids.vision_end]
            keep_from = ends[-1] + 1 if ends else 0
            if keep_from > max_len:
                raise SampleError(name, index, f"{L} tokens > max_length {max_len} and its last vision block ends "
                                               f"at token {keep_from}; text-only truncation cannot fit it",
                                  "overlength", where)
            input_ids, labels = input_ids[:max_len], labels[:max_len]
            if all(x == IGNORE_INDEX for x in labels):
                raise SampleError(name, index, f"{L} tokens > max_length {max_len}; truncation leaves no "
                                               "assistant token", "overlength", where)
            return input_ids, labels
        raise SampleError(name, index, f"{L} tokens > max_length {max_len} (dropped)", "overlength", where)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # a single item needs no copy


def process_or_skip(processor: SampleProcessor, record, dc, index, where: str) -> dict | Skipped:
    try:
        return processor(record, dc, index, where=where)
    except SampleError as e:
        skipped = Skipped(e.dataset, e.index, e.reason, e.kind, e.where)
        log.warning("skipping %s", skipped)
        return skipped


