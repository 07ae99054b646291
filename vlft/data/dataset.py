"""The datasets the DataLoader reads, and the bookkeeping of skipped samples.

`MixedDataset` (map-style) mixes several datasets by weight, reshuffled per epoch; `build_datasets` makes the
training and evaluation sets (a `TrainStream` from vlft/data/streaming.py when the training data streams). One
record becomes one sample in vlft/data/sample.py; a sample that cannot be used comes out as a `Skipped` record,
which the collator passes on and `SkipCounter` counts in the main process, stopping training once the skipped
fraction passes `max_skip_fraction`.
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Iterator

import torch

from vlft.data.collator import model_inputs
from vlft.data.config import DataConfig, DatasetConfig
from vlft.data.errors import TooManySkipped
from vlft.data.formats import RecordSource
from vlft.data.sample import SampleProcessor, Skipped, process_or_skip
from vlft.data.streaming import TrainStream


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
        return process_or_skip(self.processor, record, self.datasets[d], row, where)


def build_datasets(cfg: DataConfig, tokenizer, tokens_per_second: float = 2.0):
    """(train, eval or None). Eval comes from eval_datasets, else a seeded eval_split fraction of every dataset.
    When any training dataset streams, the training mix is a `TrainStream` (vlft/data/streaming.py); eval sets are
    small and always read as indexed datasets."""
    if any(d.streaming for d in cfg.datasets):
        ev = (MixedDataset(cfg, tokenizer, [_unweighted(d) for d in cfg.eval_datasets],
                           tokens_per_second=tokens_per_second) if cfg.eval_datasets else None)
        return TrainStream(cfg, tokenizer, tokens_per_second), ev
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
    """The model inputs of a DataLoader's `Collator` batches: the skips are counted (which may raise
    TooManySkipped), batches left empty are dropped, the bookkeeping keys removed."""
    for batch in loader:
        counter.add(batch.get("num_samples", 0), batch.get("skipped", []))
        if batch.get("num_samples", 0):
            yield model_inputs(batch)
