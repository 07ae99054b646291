"""3D (t, h, w) position ids for M-RoPE: `get_rope_index`, a pure function the collator calls per sample.

Implements the reference rule of the Qwen2.5-VL release (docs/positions.md), which the released checkpoints were
trained with and serving engines use:
- text before a vision block continues from max(all positions so far) + 1, one id per token, equal in all three rows;
- a vision block of grid (t, h, w) takes merged cells (i, j, k) over (t, h/m, w/m) in raster order with
  t-row = start + trunc(i * second_per_grid_t * tokens_per_second)  (multiplied in float, truncated once; images use 0),
  h-row = start + j, w-row = start + k;
- text after a block starts at max(all positions so far) + 1 (transformers 5.24 uses start + max(h, w) instead, which
  differs only for videos whose time span exceeds their grid).
Masked positions get 1 (as the reference); rope_delta = max + 1 - padded length, so decoding step s (0-based cache
length c) uses position c + rope_delta in all rows.
"""

from __future__ import annotations

import torch


def _grid_rows(grid: torch.Tensor | None) -> list[list[int]]:
    return [] if grid is None else [list(map(int, r)) for r in grid.tolist()]


def vision_block_positions(t: int, h: int, w: int, start: int, interval: float) -> torch.Tensor:
    """Positions [3, t*h*w] of one merged grid (t, h, w) starting at `start`; `interval` = seconds/grid * tokens/s."""
    i = torch.arange(t).view(-1, 1, 1).expand(t, h, w)
    j = torch.arange(h).view(1, -1, 1).expand(t, h, w)
    k = torch.arange(w).view(1, 1, -1).expand(t, h, w)
    # float multiply first, one truncation: truncating second_per_grid_t to int first (transformers 4.52-4.57) collapses
    # the time ids of videos sampled above 2 fps (docs/positions.md#where-transformers-5x-differs)
    t_ids = (i.to(torch.float64) * interval).long()
    return torch.stack([t_ids.flatten(), j.flatten(), k.flatten()]) + start


def get_rope_index(
    config,
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D position ids for a batch.

    Args:
        config: a `ModelConfig` (token ids, `vision.spatial_merge_size`, `vision.tokens_per_second`).
        input_ids: [B, L] token ids; each image/video is a run of pad tokens right after `<|vision_start|>`.
        image_grid_thw, video_grid_thw: [n, 3] patch grids in order of appearance over the whole batch.
        second_per_grid_ts: [n_videos] seconds covered by one temporal patch (None: 1.0 for every video).
        attention_mask: [B, L], 1 for real tokens (left or right padding); None means all real.
    Returns:
        position_ids [3, B, L] int64 (masked positions 1) and rope_deltas [B, 1] int64.
    """
    merge = config.vision.spatial_merge_size
    tokens_per_second = float(config.vision.tokens_per_second)
    B, L = input_ids.shape
    ids_cpu = input_ids.detach().cpu()
    mask = torch.ones_like(ids_cpu) if attention_mask is None else attention_mask.detach().cpu()
    images, videos = _grid_rows(image_grid_thw), _grid_rows(video_grid_thw)
    if second_per_grid_ts is None:
        seconds = [1.0] * len(videos)
    else:
        seconds = [float(s) for s in (second_per_grid_ts.tolist() if torch.is_tensor(second_per_grid_ts)
                                      else second_per_grid_ts)]
    if len(seconds) != len(videos):
        raise ValueError(f"second_per_grid_ts has {len(seconds)} values for {len(videos)} videos")
    img_i = vid_i = 0
    position_ids = torch.ones(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    for b in range(B):
        keep = mask[b].bool()
        tokens = ids_cpu[b][keep].tolist()
        n = len(tokens)
        pieces: list[torch.Tensor] = []
        next_pos = 0  # max(positions so far) + 1
        pos = 0  # index into tokens
        while pos < n:
            # next vision block: a start token followed by an image or video pad token
            blk = pos
            while blk < n and not (
                tokens[blk] in (config.image_token_id, config.video_token_id)
                and blk > 0 and tokens[blk - 1] == config.vision_start_token_id
            ):
                blk += 1
            if blk > pos:  # text run
                pieces.append(torch.arange(blk - pos).expand(3, -1) + next_pos)
                next_pos += blk - pos
            if blk >= n:
                break
            if tokens[blk] == config.image_token_id:
                if img_i >= len(images):
                    raise ValueError(f"sample {b}: more image blocks than image_grid_thw rows ({len(images)})")
                t, h, w = images[img_i]
                img_i += 1
                interval = 0.0
            else:
                if vid_i >= len(videos):
                    raise ValueError(f"sample {b}: more video blocks than video_grid_thw rows ({len(videos)})")
                t, h, w = videos[vid_i]
                interval = seconds[vid_i] * tokens_per_second
                vid_i += 1
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            block = vision_block_positions(t, gh, gw, next_pos, interval)
            run = tokens[blk:blk + count]
            if len(run) != count or any(x != tokens[blk] for x in run):
                raise ValueError(
                    f"sample {b}: a vision block at token {blk} should hold {count} pad tokens for grid "
                    f"({t}, {h}, {w}) but holds {sum(1 for x in run if x == tokens[blk])}"
                )
            pieces.append(block)
            next_pos = int(block.max()) + 1
            pos = blk + count
        if pieces:
            pos_b = torch.cat(pieces, dim=1)
            position_ids[:, b, keep] = pos_b
            deltas[b, 0] = int(pos_b.max()) + 1 - L
        else:
            deltas[b, 0] = -L
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def text_position_ids(attention_mask: torch.Tensor | None, batch: int, length: int, offset: int = 0) -> torch.Tensor:
    """Plain 1D positions copied to the three rows [3, B, L] (text-only input); padding gets 1 like get_rope_index."""
    if attention_mask is None:
        pos = torch.arange(offset, offset + length).expand(batch, -1)
    else:
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1) + offset
    return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
