"""From raw records to training samples, and the datasets the DataLoader reads.

`SampleProcessor` turns one record into tensors (each media item decoded once), applying the over-length policy.
`MixedDataset` (map-style) and `StreamingMixedDataset` (iterable) mix several datasets by weight. A sample that
cannot be used comes out as a `Skipped` record (logged with dataset, index, file and line, and reason) instead of
being replaced by another; the collator passes those on and `SkipCounter` counts them in the main process and stops
training once the skipped fraction passes `max_skip_fraction`.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from vlft.data.config import DataConfig, DatasetConfig
from vlft.data.errors import BadInput, SampleError, TooManySkipped, sample_label
from vlft.data.formats import MediaResolver, RecordSource, to_messages
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
        return rescale_messages(messages, lambda m: image_scale(m.source, **self.image_options(m, dc)))

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


def _process_or_skip(processor: SampleProcessor, record, dc, index, where: str) -> dict | Skipped:
    try:
        return processor(record, dc, index, where=where)
    except SampleError as e:
        skipped = Skipped(e.dataset, e.index, e.reason, e.kind, e.where)
        log.warning("skipping %s", skipped)
        return skipped


def mix_order(lengths: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(dataset, row) pairs of one epoch, shuffled: round(weight * len) rows of each dataset (a weight above 1 repeats
    rows, below 1 draws a random subset). Seeded, so every rank and every run gets the same order."""
    rng = random.Random(seed)
    order = []
    for d, (n, w) in enumerate(zip(lengths, weights)):
        if w < 0:
            raise ValueError(f"dataset weight must be >= 0, got {w}")
        want = round(w * n)
        rows = [r for _ in range(want // n) for r in range(n)] if n else []
        rows += rng.sample(range(n), want - len(rows)) if n else []
        order += [(d, r) for r in rows]
    rng.shuffle(order)
    return order


class MixedDataset(torch.utils.data.Dataset):
    """Map-style mix of datasets, already shuffled (use a sequential or non-shuffling distributed sampler; call
    set_epoch to reshuffle). Items are sample dicts or `Skipped` records."""

    def __init__(self, cfg: DataConfig, tokenizer, datasets: list[DatasetConfig] | None = None,
                 rows: list[list[int]] | None = None, tokens_per_second: float = 2.0):
        self.cfg = cfg
        self.datasets = list(cfg.datasets if datasets is None else datasets)
        if not self.datasets:
            raise ValueError("data.datasets is empty")
        self.sources = [RecordSource(d.path) for d in self.datasets]
        self.rows = rows or [list(range(len(s))) for s in self.sources]  # which rows of each source this split uses
        self.processor = SampleProcessor(cfg, tokenizer, tokens_per_second)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        order = mix_order([len(r) for r in self.rows], [d.weight for d in self.datasets], self.cfg.seed + epoch)
        self.order = [(d, self.rows[d][r]) for d, r in order]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict | Skipped:
        d, row = self.order[i]
        record, where = self.sources[d].get(row)
        return _process_or_skip(self.processor, record, self.datasets[d], row, where)


class StreamingMixedDataset(torch.utils.data.IterableDataset):
    """Iterable mix for datasets too large to index: each step draws a dataset with probability proportional to its
    weight (seeded) until every dataset is exhausted. DataLoader workers take every num_workers-th draw."""

    def __init__(self, cfg: DataConfig, tokenizer, datasets: list[DatasetConfig] | None = None,
                 tokens_per_second: float = 2.0):
        self.cfg = cfg
        self.datasets = list(cfg.datasets if datasets is None else datasets)
        self.processor = SampleProcessor(cfg, tokenizer, tokens_per_second)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict | Skipped]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.cfg.seed + self.epoch)
        iters = [iter(RecordSource(d.path, streaming=True)) for d in self.datasets]
        live = list(range(len(iters)))
        step = 0
        while live:
            d = rng.choices(live, weights=[self.datasets[i].weight for i in live])[0]
            try:
                index, record, where = next(iters[d])
            except StopIteration:
                live.remove(d)
                continue
            if step % nw == wid:
                yield _process_or_skip(self.processor, record, self.datasets[d], index, where)
            step += 1


def build_datasets(cfg: DataConfig, tokenizer, tokens_per_second: float = 2.0):
    """(train, eval or None). Eval comes from eval_datasets, else a seeded eval_split fraction of every dataset."""
    streaming = any(d.streaming for d in cfg.datasets)
    if streaming:
        train = StreamingMixedDataset(cfg, tokenizer, tokens_per_second=tokens_per_second)
        ev = (StreamingMixedDataset(cfg, tokenizer, cfg.eval_datasets, tokens_per_second)
              if cfg.eval_datasets else None)
        return train, ev
    if cfg.eval_datasets:
        return (MixedDataset(cfg, tokenizer, tokens_per_second=tokens_per_second),
                MixedDataset(cfg, tokenizer, [_unweighted(d) for d in cfg.eval_datasets],
                             tokens_per_second=tokens_per_second))
    if cfg.eval_split <= 0:
        return MixedDataset(cfg, tokenizer, tokens_per_second=tokens_per_second), None
    full = MixedDataset(cfg, tokenizer, tokens_per_second=tokens_per_second)
    rng = random.Random(cfg.seed)
    train_rows, eval_rows = [], []
    for s in full.sources:
        perm = list(range(len(s)))
        rng.shuffle(perm)
        k = math.ceil(cfg.eval_split * len(s))
        eval_rows.append(sorted(perm[:k]))
        train_rows.append(sorted(perm[k:]))
    train = MixedDataset(cfg, tokenizer, rows=train_rows, tokens_per_second=tokens_per_second)
    ev = MixedDataset(cfg, tokenizer, [_unweighted(d) for d in cfg.datasets], rows=eval_rows,
                      tokens_per_second=tokens_per_second)
    return train, ev


def _unweighted(dc: DatasetConfig) -> DatasetConfig:
    from dataclasses import replace

    return replace(dc, weight=1.0)


class SkipCounter:
    """Counts samples seen and skipped (in the main process, from what the collator passes on) and raises
    TooManySkipped once skipped / max(seen, min_samples) exceeds max_fraction."""

    def __init__(self, max_fraction: float, min_samples: int = 100):
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.seen = self.bad = self.overlength = 0
        self.examples: list[Skipped] = []

    def add(self, n_used: int, skipped: Iterable[Skipped]) -> None:
        skipped = list(skipped)
        self.seen += n_used + len(skipped)
        for s in skipped:
            if s.kind == "overlength":
                self.overlength += 1
            else:
                self.bad += 1
            if len(self.examples) < 20:
                self.examples.append(s)
        total = self.bad + self.overlength
        if total and total / max(self.seen, self.min_samples) > self.max_fraction:
            shown = "\n".join(f"  {s}" for s in self.examples[:10])
            raise TooManySkipped(
                f"stopping: {total} of {self.seen} samples skipped ({self.bad} bad, {self.overlength} over max_length), "
                f"more than data.max_skip_fraction={self.max_fraction}. Run `vlft data check` on the config. "
                f"First skipped:\n{shown}")


def skip_summary(seen: int, bad: int, overlength: int, examples: list[Skipped], shown: int = 3) -> str:
    """The end-of-run line on skipped samples: how many, of which kind, and the first few with their reasons."""
    if not bad and not overlength:
        return f"samples: {seen} read, none skipped"
    lines = [f"samples: {seen} read, {bad + overlength} skipped ({bad} bad, {overlength} over max_length); first:"]
    lines += [f"  {s}" for s in examples[:shown]]
    if bad + overlength > shown:
        lines.append("  ... (`vlft data check CONFIG` lists them all)")
    return "\n".join(lines)


def iterate_batches(loader: Iterable[dict], counter: SkipCounter) -> Iterator[dict]:
    """Batches from a DataLoader using `Collator`, with the skip bookkeeping removed: pops "skipped" and
    "num_samples", updates the counter (which may raise TooManySkipped) and drops batches left empty."""
    for batch in loader:
        skipped = batch.pop("skipped", [])
        n = batch.pop("num_samples", 0)
        counter.add(n, skipped)
        if n:
            yield batch
