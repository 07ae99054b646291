"""Index arithmetic of the vision tower as pure functions of the patch grids (docs/vision.md).

Everything here runs on the host from the grid list, so the tower itself never reads a device value back.
Grids are [t, h, w] in patch units; h and w are even (multiples of the 2x2 merge).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merged_tokens(grid_thw: Sequence[int] | torch.Tensor, merge: int) -> int:
    """LLM tokens of one image or video of grid (t, h, w) patches: the merger turns each merge x merge group of
    patches into one token, so t*h*w / merge^2."""
    t, h, w = (int(x) for x in torch.as_tensor(grid_thw).reshape(3).tolist())
    return t * h * w // (merge * merge)


def rotary_pos_ids(grids: list[list[int]], merge: int) -> torch.Tensor:
    """[N, 2] (row, col) patch coordinates in processor row order (merge-block major), repeated for every t."""
    out = []
    for t, h, w in grids:
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        # rows are ordered (block row, block col, row in block, col in block)
        hh = hh.permute(0, 2, 1, 3).reshape(-1)
        ww = ww.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_index(grids: list[list[int]], merge: int, window_cells: int) -> tuple[torch.Tensor, list[int]]:
    """Window partition of merged cells.

    Each temporal slice's merged grid (h/m, w/m) is cut into window_cells x window_cells windows in raster order
    (partial windows at the bottom/right edge keep only their real cells). Returns
    - window_index [N/m^2]: merged-cell indices (global over items) listed window by window, cells raster inside;
    - cu_window_seqlens: 0 then cumulative window sizes in *patches*, empty windows skipped.
    """
    index: list[torch.Tensor] = []
    cu = [0]
    base = 0
    unit = merge * merge
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        cells = torch.arange(t * gh * gw).view(t, gh, gw) + base
        for ti in range(t):
            for y0 in range(0, gh, window_cells):
                for x0 in range(0, gw, window_cells):
                    win = cells[ti, y0:y0 + window_cells, x0:x0 + window_cells].reshape(-1)
                    index.append(win)
                    cu.append(cu[-1] + win.numel() * unit)
        base += t * gh * gw
    return torch.cat(index), cu


def full_cu_seqlens(grids: list[list[int]]) -> list[int]:
    """0 then cumulative lengths of the full-attention segments: one per temporal slice of every item (h*w patches)."""
    cu = [0]
    for t, h, w in grids:
        for _ in range(t):
            cu.append(cu[-1] + h * w)
    return cu
