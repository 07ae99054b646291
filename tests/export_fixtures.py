"""Checkpoints for export/generation tests: a tiny base saved as an HF folder, and a LoRA (or DoRA) adapter on the
language model and the vision tower with the merger trained fully, trained a few steps with peft exactly as the
recipe wraps the model, saved in the training-checkpoint layout (adapter + tokenizer + processor settings)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import get_peft_model

from model_fixtures import make_pair, media_inputs
from vlft.adapters import lora_config
from vlft.config import LoraSection
from vlft.data.tiny_tokenizer import build_tiny_tokenizer
from vlft.model import save_pretrained

VISION_TARGETS = ["attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# the video's time span (2 s) is shorter than its grid (4), where transformers 5.24 and the reference rule agree
SAMPLES = [[3, ("image", (1, 8, 12)), 4], [2, ("video", (2, 4, 8)), 6]]


def lora_section(dora: bool = False, vision: bool = True) -> LoraSection:
    return LoraSection(rank=4, alpha=8.0, vision=VISION_TARGETS if vision else [], train_fully=["visual.merger"],
                       use_dora=dora)


def write_processor_files(folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12544, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 6272, "fps": 2.0, "min_frames": 4, "max_frames": 8}))


def make_checkpoint(root: Path, dora: bool = False, seed: int = 0, max_shard_size="5GB", steps: int = 2,
                    vision: bool = True, **changes):
    """-> (base folder, checkpoint folder, peft model (base + adapter, eval mode), batch of model inputs)."""
    root = Path(root)
    model, _ = make_pair(seed, **changes)
    base, ckpt = root / "base", root / "checkpoint-0000002"
    save_pretrained(model, base, max_shard_size=max_shard_size)
    peft_model = get_peft_model(model, lora_config(lora_section(dora, vision)))
    batch = media_inputs(model.config, SAMPLES, pad_side="left")
    batch.pop("mm_token_type_ids")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # start from a non-zero adapter, then take real optimizer steps
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    peft_model.train()
    for _ in range(steps):
        opt.zero_grad()
        peft_model(**batch, labels=labels).loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(str(ckpt))
    build_tiny_tokenizer(ckpt)
    write_processor_files(ckpt)
    (ckpt / "COMPLETE").write_text("step 2\n")
    (ckpt / "base_model.json").write_text(json.dumps({"path": str(base)}))
    return base, ckpt, peft_model, batch
