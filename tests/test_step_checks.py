"""Two processes under `accelerate launch`: a non-finite loss on one rank in the middle of an accumulation window
drops the whole step under DeepSpeed ZeRO-2 (every trainable parameter and optimizer state exactly as before), and the
training loop makes one collective call per optimizer step for its bookkeeping (tokens, samples, loss, NaN flag and
stop request together)."""

from __future__ import annotations

import json

import pytest
import yaml
from test_train_helpers import launch, tiny_config

from vlft.train_cli import make_tiny_data


def _launch(setup: str, mode: str, tmp_path, **train) -> dict:
    data = make_tiny_data(tmp_path / "data", ["text", "image", "video", "image+video"] * 6)
    cfg = tiny_config(tmp_path, data, train={"output_dir": str(tmp_path / mode), "micro_batch_size": 1, **train})
    path = tmp_path / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / f"{mode}.json"
    launch("tests/launched_step_checks.py", mode, path, out, setup=setup)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_nan_in_the_middle_of_a_window_drops_the_whole_step_under_zero2(tmp_path):
    result = _launch("zero2", "nan", tmp_path, gradient_accumulation=3, max_steps=3)
    assert result["skipped_steps"] == 1 and result["steps"] == 2
    assert result["optimizer_tensors"] > 0  # AdamW moments and step counts were compared too
    assert result["unchanged"], "a dropped step changed the trainable or optimizer state"
    assert result["changed_after_next_good_step"]


@pytest.mark.slow
def test_one_collective_per_step_for_the_bookkeeping(tmp_path):
    result = _launch("cpu", "count", tmp_path, gradient_accumulation=2, max_steps=4)
    assert len(result["collectives_before_each_finish"]) == 4
    assert result["per_step"] == [1, 1, 1]
