"""`vlft smoke`: build the tiny model, run one image + video sample through it and print what happened."""

from __future__ import annotations

import argparse
import time

import torch

from vlft.model import build_model, get_rope_index, preset
from vlft.model.vision_index import merged_tokens


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="vlft smoke", description=__doc__).parse_args(argv)
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = build_model(cfg).eval()
    img, vid = (1, 8, 12), (2, 8, 8)
    m = cfg.vision.spatial_merge_size
    vs, ve = cfg.vision_start_token_id, cfg.vision_end_token_id
    ids = ([1, 2, vs] + [cfg.image_token_id] * merged_tokens(img, m) + [ve, 3]
           + [vs] + [cfg.video_token_id] * merged_tokens(vid, m) + [ve, 4])
    input_ids = torch.tensor([ids])
    kw = dict(pixel_values=torch.randn(96, 1176), image_grid_thw=torch.tensor([img]),
              pixel_values_videos=torch.randn(128, 1176), video_grid_thw=torch.tensor([vid]),
              second_per_grid_ts=torch.tensor([1.0]))
    pos, _ = get_rope_index(cfg, input_ids, kw["image_grid_thw"], kw["video_grid_thw"], kw["second_per_grid_ts"])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids, position_ids=pos, labels=input_ids, **kw)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen2.5-VL: {n_params:,} parameters (vision depth {cfg.vision.depth}, text layers "
          f"{cfg.text.num_hidden_layers}, vocab {cfg.text.vocab_size})")
    print(f"input: {len(ids)} tokens with an image grid {img} and a video grid {vid}")
    print(f"logits {tuple(out.logits.shape)}, loss {out.loss.item():.4f} (ln vocab = "
          f"{torch.log(torch.tensor(float(cfg.text.vocab_size))).item():.4f}), {time.perf_counter() - t0:.3f} s")
    print(f"3D positions of the last token: {pos[:, 0, -1].tolist()}")
    return 0
