"""Packing several samples into rows of at most max_length tokens, and the segment boundaries the model needs.

A sample is never split: a sample longer than the capacity gets a row of its own. Boundaries (`cu_seqlens`) run over
the flattened B*L token stream, row-major: every sample is one segment, and the padding at the end of a row is a
segment of its own, so no token attends outside its sample.
"""

from __future__ import annotations

import torch


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into rows of total length <= capacity, first-fit over lengths in decreasing order.
    Deterministic: ties keep input order. Returns rows of indices, each row in the order samples were placed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def cu_seqlens_for_rows(row_lengths: list[list[int]], row_len: int) -> torch.Tensor:
    """[S+1] int32 cumulative segment lengths over B rows of row_len tokens (flattened row-major)."""
    cu = [0]
    for r, lens in enumerate(row_lengths):
        for n in lens:
            cu.append(cu[-1] + n)
        if sum(lens) < row_len:  # trailing padding: its own segment
            cu.append((r + 1) * row_len)
        assert cu[-1] == (r + 1) * row_len, (lens, row_len)
    return torch.tensor(cu, dtype=torch.int32)
