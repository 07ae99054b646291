"""Checkpoints: SIGTERM writes one and exits cleanly, `resume: auto` skips incomplete ones and continues exactly,
keep-last-K, and the pieces (RNG states, resolution of the resume setting)."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch
from test_train_helpers import run_in_process, run_signalled_at, workspace

from vlft.checkpoint import rng_state, set_rng_state
from vlft.run_folder import MARKER, complete_checkpoints, resolve_resume


def test_sigterm_checkpoint_then_exact_resume(tmp_path, monkeypatch):
    path, _ = workspace(tmp_path)
    full = run_in_process(path, f"train.output_dir={tmp_path / 'full'}", "lora.dropout=0.1")["losses"]

    out = tmp_path / "cut"
    first = run_signalled_at(path, 3, f"train.output_dir={out}", "lora.dropout=0.1")  # SIGTERM during step 2 (2 micro-batches per step)
    assert first["status"] == "interrupted" and first["state"]["step"] == 2
    assert (out / "checkpoint-0000002" / MARKER).is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))

    # an interrupted save (no marker) and a temporary folder must be ignored by resume: auto
    (out / "checkpoint-0000003").mkdir()
    (out / ".tmp-checkpoint-0000004").mkdir()
    second = run_in_process(path, f"train.output_dir={out}", "lora.dropout=0.1", "checkpoint.resume=auto")
    assert second["state"]["step"] == 4 and not (out / ".tmp-checkpoint-0000004").exists()
    # dropout 0.1 makes the RNG matter: the resumed steps equal the uninterrupted run's steps 3 and 4
    assert first["losses"] + second["losses"] == pytest.approx(full, abs=1e-6)


def test_keep_last_and_periodic_saves(tmp_path):
    path, _ = workspace(tmp_path)
    run_in_process(path, "checkpoint.every=1", "checkpoint.keep_last=2", "train.max_steps=3")
    names = [p.name for p in complete_checkpoints(tmp_path / "out")]
    assert names == ["checkpoint-0000002", "checkpoint-0000003"]


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing saved yet: a fresh start
    (tmp_path / "checkpoint-0000001").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-0000001"), tmp_path)
    (tmp_path / "checkpoint-0000001" / MARKER).write_text("")
    (tmp_path / "checkpoint-0000010").mkdir()  # newer but incomplete
    assert resolve_resume("auto", tmp_path).name == "checkpoint-0000001"


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
