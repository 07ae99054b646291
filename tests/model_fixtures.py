"""Shared helpers for model tests: tiny configs, token sequences with vision blocks, and the transformers twin."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig
from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

from vlft.model import ModelConfig, build_model, preset
from vlft.model.weights import to_hub_key


def tiny_config(**changes) -> ModelConfig:
    """preset("tiny") with changes: `tie=True`, `depth=6`, `fullatt=[...]`, `mrope=[...]`, `heads`, `kv_heads`."""
    cfg = preset("tiny")
    if "tie" in changes:
        cfg.tie_word_embeddings = changes["tie"]
    if "depth" in changes:
        cfg.vision.depth = changes["depth"]
    if "fullatt" in changes:
        cfg.vision.fullatt_block_indexes = changes["fullatt"]
    if "mrope" in changes:
        cfg.text.mrope_section = changes["mrope"]
    if "heads" in changes:
        cfg.text.num_attention_heads = changes["heads"]
    if "kv_heads" in changes:
        cfg.text.num_key_value_heads = changes["kv_heads"]
    return cfg


def hf_twin(model, attn: str = "eager", dtype: torch.dtype = torch.float32) -> HFModel:
    """transformers' Qwen2.5-VL with the same config and weights as a vlft model."""
    hf_cfg = Qwen2_5_VLConfig(**model.config.to_hf_dict())
    hf = HFModel._from_config(hf_cfg, attn_implementation=attn, dtype=dtype)
    ours = model.state_dict()
    hf_sd = hf.state_dict()
    missing = [k for k in hf_sd if to_hub_key(k) not in ours]
    assert not missing, missing
    hf.load_state_dict({k: ours[to_hub_key(k)].to(dtype) for k in hf_sd})
    return hf.eval()


def make_pair(seed: int = 0, dtype: torch.dtype = torch.float32, **changes):
    torch.manual_seed(seed)
    cfg = tiny_config(**changes)
    model = build_model(cfg, dtype=torch.float32)
    # larger random init than 0.02 so that differences are visible in the logits
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif p.numel() and not torch.all(p == 1):
                p.normal_(0, 0.02)
    model = model.to(dtype).eval()
    return model, hf_twin(model, dtype=dtype)


def sequence(cfg: ModelConfig, parts: list, generator: torch.Generator | None = None) -> list[int]:
    """Token ids from parts: an int n = n random text tokens; ("image", (t, h, w)) or ("video", (t, h, w)) = a block."""
    g = generator or torch.Generator().manual_seed(1)
    ids: list[int] = []
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(0, 250, (p,), generator=g).tolist()
        else:
            kind, (t, h, w) = p
            pad = cfg.image_token_id if kind == "image" else cfg.video_token_id
            ids += [cfg.vision_start_token_id] + [pad] * (t * h * w // 4) + [cfg.vision_end_token_id]
    return ids


def media_inputs(cfg: ModelConfig, samples: list[list], pad_side: str = "right", seed: int = 3) -> dict:
    """A batch of samples (lists of parts) with pixel tensors, grids, attention mask and mm_token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    seqs = [sequence(cfg, s, g) for s in samples]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), cfg.bos_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(0, len(s)) if pad_side == "right" else slice(L - len(s), L)
        ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    images = [p[1] for s in samples for p in s if not isinstance(p, int) and p[0] == "image"]
    videos = [p[1] for s in samples for p in s if not isinstance(p, int) and p[0] == "video"]
    out = {"input_ids": ids, "attention_mask": mask}
    width = 3 * 2 * 14 * 14
    if images:
        out["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), width, generator=g)
        out["image_grid_thw"] = torch.tensor(images)
    if videos:
        out["pixel_values_videos"] = torch.randn(sum(t * h * w for t, h, w in videos), width, generator=g)
        out["video_grid_thw"] = torch.tensor(videos)
    mm = torch.zeros_like(ids)
    mm[ids == cfg.image_token_id] = 1
    mm[ids == cfg.video_token_id] = 2
    out["mm_token_type_ids"] = mm
    return out
