"""Training on datasets read as streams (`streaming: true`): larger than memory, never indexed as a whole.

The training mix is read in file order, record by record (several datasets are interleaved by weight with a seeded
draw, the same on every rank), and cut into windows of consecutive records: `data.packing_window` records when
packing, else `STREAM_WINDOW` micro-batches. A window is a small in-memory dataset: it is shuffled and cut into
micro-batches by the same batch plan as an indexed dataset (vlft/data/sampler.py; for packing the window's lengths
are measured from headers first), and each rank processes only its own share of it (decoding media is what costs;
reading a record it then leaves aside costs little). Only one window of raw records is held at a time.

Every rank runs the same number of micro-batches: a window whose micro-batch count is not a multiple of
world x gradient_accumulation is completed with empty micro-batches (run with no supervised token), so a step never
spans two windows and the steps of a window are the same on any split of world x accumulation. The data position is
(epoch, window, micro-batches consumed in the window): a resume reads and skips the records of the windows before it
(cheap: nothing is decoded) and continues exactly. A stream has no known length, so streaming runs need
`train.max_steps`; the mix is read again, reshuffled within windows, when it ends.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch

from vlft.data.config import DataConfig
from vlft.data.sample import SampleProcessor, process_or_skip
from vlft.data.formats import RecordSource
from vlft.data.lengths import sample_length

STREAM_WINDOW = 64  # micro-batches per window without packing


def record_stream(cfg: DataConfig, epoch: int) -> Iterator[tuple[int, int, Any, str]]:
    """(dataset number, record index in its file, record or BadInput, where) of the whole training mix, in file
    order, datasets interleaved by weight (a seeded draw, the same on every rank and in every epoch)."""
    rng = random.Random(f"{cfg.seed}/mix")
    streams = [iter(RecordSource(d.path, streaming=True)) for d in cfg.datasets]
    live = list(range(len(streams)))
    while live:
        d = live[0] if len(live) == 1 else rng.choices(live, weights=[cfg.datasets[i].weight for i in live])[0]
        try:
            index, record, where = next(streams[d])
        except StopIteration:
            live.remove(d)
            continue
        yield d, index, record, where


class Window(torch.utils.data.Dataset):
    """A window of raw records of the stream, processed on demand (in DataLoader workers) like MixedDataset."""

    def __init__(self, cfg: DataConfig, processor: SampleProcessor, records: list[tuple[int, int, Any, str]]):
        self.cfg, self.processor, self.records = cfg, processor, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        d, index, record, where = self.records[i]
        return process_or_skip(self.processor, record, self.cfg.datasets[d], index, where)

    def lengths(self) -> list[int]:
        """Token counts of the window's samples, measured from headers (see vlft/data/lengths.py)."""
        return [sample_length(self.processor, record, self.cfg.datasets[d], index)
                for d, index, record, _ in self.records]


class TrainStream:
    """The training mix read as a stream: what the recipe iterates instead of an indexed MixedDataset."""

    def __init__(self, cfg: DataConfig, tokenizer, tokens_per_second: float = 2.0):
        self.cfg = cfg
        self.processor = SampleProcessor(cfg, tokenizer, tokens_per_second)

    def windows(self, epoch: int, size: int, skip: int = 0) -> Iterator[tuple[int, Window]]:
        """(window number, window) of one epoch from window `skip` on (the records before it are read, not kept),
        each window shuffled by its own seed (data.seed, epoch, window number)."""
        number, chunk = 0, []
        for item in record_stream(self.cfg, epoch):
            chunk.append(item if number >= skip else None)  # windows before `skip` are only counted
            if len(chunk) == size:
                if number >= skip:
                    yield number, self._window(chunk, epoch, number)
                number, chunk = number + 1, []
        if chunk and number >= skip:
            yield number, self._window(chunk, epoch, number)

    def _window(self, records: list, epoch: int, number: int) -> Window:
        random.Random(f"{self.cfg.seed}/{epoch}/{number}").shuffle(records)
        return Window(self.cfg, self.processor, records)


def window_size(cfg: DataConfig, micro_batch_size: int) -> int:
    return cfg.packing_window if cfg.packing else STREAM_WINDOW * micro_batch_size


def pad_plan(plan: list[list[int]], multiple: int) -> list[list[int]]:
    """The plan completed with empty micro-batches to a multiple of `multiple` (world x accumulation)."""
    return plan + [[] for _ in range(-len(plan) % multiple)]
