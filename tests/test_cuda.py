"""GPU checks (skipped without CUDA); the checks themselves live in cuda_checks.py, which recipes/gpu_check.py also
runs: bf16 parity with transformers on the device, varlen FlashAttention against sdpa and eager (kernel and model,
forward and backward), and a forward without host syncs."""

from __future__ import annotations

import pytest
import torch

import cuda_checks

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_logits_match_transformers_on_gpu():
    print(cuda_checks.bf16_parity_with_transformers())


def test_varlen_kernel_matches_sdpa_segments():
    print(cuda_checks.varlen_kernel_matches_sdpa())


def test_varlen_sdpa_and_eager_agree_on_a_packed_row():
    print(cuda_checks.varlen_sdpa_eager_agree())


def test_forward_makes_no_host_sync():
    print(cuda_checks.forward_makes_no_host_sync())
