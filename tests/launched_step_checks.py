"""Run under `accelerate launch` by tests (not a test module itself).

    launched_step_checks.py nan CONFIG OUT.json      an inf loss in the middle of an accumulation window on one rank
                                                     drops the whole step: trainable and optimizer state unchanged
    launched_step_checks.py count CONFIG OUT.json    collectives made from Python per optimizer step of the loop
    launched_step_checks.py stream CONFIG OUT.json   which records of a streamed dataset each rank trained on, by epoch

Rank 0 writes OUT.json. tests/test_step_checks.py runs the first two, tests/test_streaming.py the third.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from vlft.config import load_experiment
from vlft.distributed import gather_optimizer_state, gather_trainable
from vlft.train_cli import load_recipe

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier", "gather",
               "scatter", "all_to_all", "all_to_all_single", "send", "recv")


def full_state(s) -> dict[str, torch.Tensor]:
    return {**gather_trainable(s.accelerator, s.model),
            **{f"opt/{k}": v for k, v in gather_optimizer_state(s.accelerator, s.model, s.optimizer).items()}}


def check_nan(recipe, cfg) -> dict:
    """The real loop (recipe.run) with one poisoned micro-batch; the trainable and optimizer state is gathered
    around each of the first three steps' finish_step, where a step is applied or dropped."""
    forward, finish, calls, steps = recipe.forward, recipe.finish_step, {"n": 0}, []

    def poisoned(setup, batch):
        out = forward(setup, batch)
        calls["n"] += 1
        # the 2nd of 3 micro-batches of the 2nd step, on rank 1 only. An infinite loss whose gradients stay finite:
        # DeepSpeed's own overflow check (which skips steps with non-finite gradients) does not see it.
        if calls["n"] == cfg.train.gradient_accumulation + 2 and setup.accelerator.process_index == 1:
            out.loss_sum = out.loss_sum + float("inf")
        return out

    def observed(s, state, pending, totals, history):
        before = full_state(s)  # collective: every rank finishes the same steps
        finish(s, state, pending, totals, history)
        steps.append({"before": before, "after": full_state(s), "step": state["step"],
                      "skipped_steps": state["skipped_steps"]})

    recipe.forward, recipe.finish_step = poisoned, observed
    recipe.run(cfg)
    bad, good = steps[1], steps[2]  # the poisoned step, and the one after it
    return {"steps": good["step"], "skipped_steps": good["skipped_steps"], "tensors": len(bad["before"]),
            "optimizer_tensors": sum(k.startswith("opt/") for k in bad["before"]),
            "unchanged": bad["before"].keys() == bad["after"].keys()
            and all(torch.equal(bad["before"][k], bad["after"][k]) for k in bad["before"]),
            "changed_after_next_good_step": any(not torch.equal(bad["before"][k], good["after"][k])
                                                for k in bad["before"])}


def count_collectives(recipe, cfg) -> dict:
    counter = {"n": 0}
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapped(*args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)
    per_step, finish = [], recipe.finish_step

    def counted(s, state, pending, totals, history):
        per_step.append(counter["n"])
        return finish(s, state, pending, totals, history)

    recipe.finish_step = counted
    recipe.run(cfg)
    return {"collectives_before_each_finish": per_step,
            "per_step": [b - a for a, b in zip(per_step, per_step[1:])]}


def record_stream_use(recipe, cfg) -> dict:
    from vlft.data.streaming import TrainStream, Window

    epoch_now, seen = {"epoch": 0}, []
    windows, getitem = TrainStream.windows, Window.__getitem__

    def tagged_windows(self, epoch, size, skip=0):
        for number, window in windows(self, epoch, size, skip):
            epoch_now["epoch"] = epoch
            yield number, window

    def recorded(self, i):
        seen.append((epoch_now["epoch"], self.records[i][1]))
        return getitem(self, i)

    TrainStream.windows, Window.__getitem__ = tagged_windows, recorded
    result = recipe.run(cfg)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"seen": seen, "steps": len(result["losses"])})
    return {"ranks": every}


def main() -> None:
    mode, config, out = sys.argv[1:4]
    recipe = load_recipe()
    cfg = load_experiment(config, sys.argv[4:])
    checks = {"nan": check_nan, "count": count_collectives, "stream": record_stream_use}
    result = checks[mode](recipe, cfg)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
