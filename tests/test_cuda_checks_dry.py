"""The GPU checks of cuda_checks.py, dry-run on the CPU: torch's varlen kernel emulated, sync checks disabled. This
catches mistakes in the check code itself before a GPU session runs it; the real bounds are checked on the GPU."""

from __future__ import annotations

import pytest
import torch

import cuda_checks
import vlft.model.attention as attention
from varlen_emulation import emulated_varlen


@pytest.fixture
def on_cpu(monkeypatch):
    if not attention._VARLEN_ARGS:
        pytest.skip("the installed torch has no torch.nn.attention.varlen")
    monkeypatch.setattr(cuda_checks, "DEVICE", "cpu")
    monkeypatch.setattr(attention, "varlen_attn", emulated_varlen)
    monkeypatch.setattr(attention, "uses_varlen", lambda impl, device, dtype: impl == "sdpa")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)


@pytest.mark.parametrize("check", cuda_checks.CHECKS, ids=lambda c: c.__name__)
def test_check_runs_on_cpu(on_cpu, check):
    result = check()
    print(check.__name__, result)
    assert isinstance(result, dict) and result
