"""A CPU emulation of torch.nn.attention.varlen.varlen_attn (a CUDA-only kernel), for tests of the varlen path."""

from __future__ import annotations

import torch

import vlft.model.attention as attention


def emulated_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kw):
    """torch.nn.attention.varlen.varlen_attn's contract, in float64 on CPU, segment by segment from its arguments.

    Causality comes from `is_causal` (torch 2.10) or `window_size` ((-1, 0) causal, (-1, -1) full); the keyword
    arguments must be ones the installed torch's varlen_attn accepts (`attention._VARLEN_ARGS`).
    """
    unknown = set(kw) - attention._VARLEN_ARGS
    assert not unknown, f"varlen_attn has no argument {unknown}"
    if "enable_gqa" in attention._VARLEN_ARGS and query.shape[1] != key.shape[1]:
        assert kw.get("enable_gqa"), "torch >= 2.12 refuses fewer key/value heads without enable_gqa=True"
    causal = kw["is_causal"] if "is_causal" in kw else tuple(kw["window_size"]) == (-1, 0)
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    out = torch.empty(query.shape, dtype=torch.float64)
    groups = query.shape[1] // key.shape[1]
    cu = cu_seq_q.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        assert 0 < b - a <= max_q, "a segment longer than max_q (or empty) would be cut short by the kernel"
        q = query[a:b].double().transpose(0, 1)
        k = key[a:b].double().repeat_interleave(groups, 1).transpose(0, 1)
        v = value[a:b].double().repeat_interleave(groups, 1).transpose(0, 1)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if causal:
            scores = scores.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), float("-inf"))
        out[a:b] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out.to(query.dtype)
