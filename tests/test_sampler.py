"""The batch plan (vlft/data/sampler.py): every sample once, the same micro-batches whatever the rank count, packed
rows that fit and fill, deterministic from seed and epoch."""

from __future__ import annotations

import random

import pytest

from vlft.data.sampler import PlanSettings, describe, fill, micro_steps, plan_epoch, rank_share


def _mix(n: int, seed: int = 0) -> list[int]:
    """A realistic length mix: mostly short samples, some medium, a few long (tokens)."""
    rng = random.Random(seed)
    return [rng.randint(40, 300) if r < 0.7 else rng.randint(300, 1200) if r < 0.95 else rng.randint(1200, 4000)
            for r in (rng.random() for _ in range(n))]


def test_plain_plan_cuts_the_order_and_drops_the_tail():
    plan = plan_epoch([0] * 11, PlanSettings(micro_batch_size=3, max_length=8), epoch=0)
    assert plan == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert rank_share(plan, 0, world=2, rank=0) == [[0, 1, 2]] and rank_share(plan, 0, 2, 1) == [[3, 4, 5]]
    assert micro_steps(plan, 0, 2) == 1 and micro_steps(plan, 0, 1) == 3


@pytest.mark.parametrize("settings", [PlanSettings(2, 4096), PlanSettings(1, 4096, packing=True, packing_window=200),
                                      PlanSettings(2, 4096, group_by_length=True)])
def test_a_step_holds_the_same_samples_on_any_split(settings):
    """world x accumulation consecutive micro-batches make a step: 2 ranks x 1 equals 1 rank x 2, from any
    position reached at a step boundary (what a checkpoint stores)."""
    plan = plan_epoch(_mix(500), settings, epoch=3)
    for start in (0, 4):
        two = [rank_share(plan, start, 2, r) for r in range(2)]
        one = rank_share(plan, start, 1, 0)
        steps_two = [sorted(two[0][k] + two[1][k]) for k in range(len(two[0]))]
        steps_one = [sorted(one[2 * k] + one[2 * k + 1]) for k in range(len(one) // 2)]
        assert steps_two == steps_one[:len(steps_two)] and len(steps_two) == len(steps_one)
        assert len(two[0]) == len(two[1])  # every rank runs the same number of micro-batches


def test_packed_rows_fit_fill_and_cover_every_sample_once():
    lengths = _mix(2000)
    s = PlanSettings(micro_batch_size=1, max_length=4096, packing=True, packing_window=1000)
    plan = plan_epoch(lengths, s, epoch=0)
    positions = sorted(p for mb in plan for p in mb)
    assert positions == list(range(len(lengths)))
    assert all(sum(lengths[p] for p in mb) <= 4096 for mb in plan)
    assert fill(plan, lengths, 4096, 1) >= 0.90


def test_plan_is_deterministic_per_epoch_and_changes_between_epochs():
    lengths = _mix(300)
    s = PlanSettings(micro_batch_size=2, max_length=2048, packing=True, packing_window=100, seed=7)
    assert plan_epoch(lengths, s, 1) == plan_epoch(lengths, s, 1)
    assert plan_epoch(lengths, s, 1) != plan_epoch(lengths, s, 2)


def test_zero_length_samples_stay_in_the_plan():
    """Dropped (0) and unmeasurable (-1) samples take no room but are read, so they are counted as skipped."""
    lengths = [500, 0, -1, 700, 300]
    plan = plan_epoch(lengths, PlanSettings(1, 1000, packing=True), epoch=0)
    assert sorted(p for mb in plan for p in mb) == [0, 1, 2, 3, 4]


def test_group_by_length_batches_similar_lengths():
    lengths = _mix(640)
    grouped = plan_epoch(lengths, PlanSettings(4, 4096, group_by_length=True), epoch=0)
    plain = plan_epoch(lengths, PlanSettings(4, 4096), epoch=0)

    def padding(plan):
        return sum(len(mb) * max(lengths[p] for p in mb) - sum(lengths[p] for p in mb) for mb in plan)

    assert sorted(p for mb in grouped for p in mb) == list(range(640))
    assert padding(grouped) < 0.2 * padding(plain)


def test_describe_reports_fill_and_steps():
    lengths = [1000] * 8
    s = PlanSettings(1, 2000, packing=True)
    steps, line = describe(plan_epoch(lengths, s, 0), lengths, s, world=2, gradient_accumulation=1)
    assert steps == 2 and "100.0% full" in line and "4 micro-batches and 2 optimizer steps" in line
