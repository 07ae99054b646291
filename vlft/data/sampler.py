"""The batch plan: which samples make each micro-batch, the same on every rank and independent of the rank count.

An epoch's order is the dataset's own shuffle (from data.seed + epoch). The plan cuts it into *global* micro-batches:
- plain: `micro_batch_size` consecutive samples;
- `group_by_length`: within windows of 64 micro-batches, samples sorted by length, cut into micro-batches, and the
  micro-batches shuffled (less padding, still random);
- `packing`: within windows of `packing_window` samples, first-fit decreasing fills rows of `max_length` tokens from
  the length index, the rows are shuffled, and `micro_batch_size` rows make a micro-batch.

Global micro-batch i of an optimizer step goes to rank i % world (see `rank_share`), so a step made of
world x gradient_accumulation consecutive micro-batches holds the same samples whatever the split into ranks and
accumulation: a run saved on 2 processes resumes on 1 process with twice the accumulation and computes the same
steps. The data position is the number of global micro-batches consumed in the epoch; together with the plan's
fingerprint it is all a checkpoint needs. Every rank runs the same number of micro-batches (the tail of an epoch that
cannot give one to every rank is dropped).

Samples of length 0 (dropped as over-length) or unmeasurable (-1) take no room but stay in the plan, so that they are
read, reported and counted as skipped like any other bad sample.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Sequence

from vlft.data.packing import pack_first_fit

GROUP_WINDOW = 64  # micro-batches per sorting window of group_by_length


@dataclass(frozen=True)
class PlanSettings:
    micro_batch_size: int
    max_length: int
    packing: bool = False
    packing_window: int = 1000
    group_by_length: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, data_cfg, micro_batch_size: int) -> "PlanSettings":
        return cls(micro_batch_size, data_cfg.max_length, data_cfg.packing, data_cfg.packing_window,
                   data_cfg.group_by_length, data_cfg.seed)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def plan_epoch(lengths: Sequence[int], s: PlanSettings, epoch: int, start: int = 0, salt: str = ""
               ) -> list[list[int]]:
    """Global micro-batches (lists of positions in the epoch's order) over positions start..len(lengths)-1.
    `lengths[p]` is the token count of the sample at position p (needed for packing and grouping only); `salt`
    tells apart the windows of a stream (vlft/data/streaming.py), which are planned one by one."""
    n, B = len(lengths), s.micro_batch_size
    rng = random.Random(f"{s.seed}/{epoch}/{start}/{salt}")
    if s.packing:
        rows: list[list[int]] = []
        for w0 in range(start, n, s.packing_window):
            window = list(range(w0, min(n, w0 + s.packing_window)))
            room = [max(0, int(lengths[p])) for p in window]
            packed = [[window[i] for i in row] for row in pack_first_fit(room, s.max_length)]
            rng.shuffle(packed)  # first-fit decreasing makes long-first rows; the model should not see that order
            rows += packed
        return [sum(rows[i:i + B], []) for i in range(0, len(rows), B)]
    if s.group_by_length:
        batches: list[list[int]] = []
        for w0 in range(start, n, B * GROUP_WINDOW):
            window = sorted(range(w0, min(n, w0 + B * GROUP_WINDOW)), key=lambda p: -int(lengths[p]))
            cut = [window[i:i + B] for i in range(0, len(window) - B + 1, B)]
            rng.shuffle(cut)
            batches += cut
        return batches
    return [list(range(p, p + B)) for p in range(start, n - B + 1, B)]


def rank_share(plan: list[list[int]], index: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of the plan from global micro-batch `index` on: every world-th one, starting at
    index + rank; the tail that cannot give every rank one is left out."""
    usable = (len(plan) - index) // world * world
    return [plan[i + rank] for i in range(index, index + usable, world)]


def micro_steps(plan: list[list[int]], index: int, world: int) -> int:
    """Micro-batches each rank runs from `index` to the end of the epoch."""
    return (len(plan) - index) // world


def fill(plan: list[list[int]], lengths: Sequence[int], max_length: int, micro_batch_size: int) -> float:
    """Real tokens / row capacity of a packed plan (1.0 = every row full)."""
    tokens = sum(max(0, int(lengths[p])) for mb in plan for p in mb)
    rows = 0
    for mb in plan:
        rows += len(pack_first_fit([max(0, int(lengths[p])) for p in mb], max_length)) if mb else 0
    return tokens / max(1, rows * max_length)


def describe(plan: list[list[int]], lengths: Sequence[int], s: PlanSettings, world: int,
             gradient_accumulation: int) -> tuple[int, str]:
    """(optimizer steps of this epoch plan, a line saying what a micro-batch holds, how full packed rows are, and
    how many micro-batches and steps an epoch makes). The training run and `vlft data check` both print it."""
    steps = micro_steps(plan, 0, world) // gradient_accumulation
    if s.packing:
        held = (f"{s.micro_batch_size} packed row(s) of up to {s.max_length} tokens, "
                f"{100 * fill(plan, lengths, s.max_length, s.micro_batch_size):.1f}% full")
    else:
        held = f"{s.micro_batch_size} sample(s)" + (", grouped by length" if s.group_by_length else "")
    return steps, (f"batch plan: each micro-batch holds {held}; {len(plan)} micro-batches and {steps} optimizer "
                   f"steps per epoch on {world} process(es) x {gradient_accumulation} accumulation")
