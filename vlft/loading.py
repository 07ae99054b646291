"""The run's base model: `load_model` is what the training recipe calls between creating the accelerator and
wrapping the model with LoRA.

Without ZeRO-3 (one process, DDP, ZeRO-1/2) every rank holds the whole model: `load_pretrained` reads it shard by
shard (`after_shard` lets QLoRA quantize each shard's layers as they arrive, vlft/quant.py), or a `preset:` model is
built with random weights seeded by train.seed. Under ZeRO-3 the parameters are partitioned as they are read, so
that no process holds the whole model (vlft/zero3_load.py, imported only then: it imports DeepSpeed).
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator

from vlft.config import ExperimentConfig
from vlft.distributed import precision, zero_stage
from vlft.model import Qwen2_5_VLForConditionalGeneration, build_model, load_pretrained, preset


def load_model(cfg: ExperimentConfig, accelerator: Accelerator,
               after_shard: Callable[[torch.nn.Module], object] | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """The base model named by `cfg.model.path` (an HF folder or `preset:NAME`), in eval mode.

    Call it after `make_accelerator` (it needs the process group and the filled-in DeepSpeed config) and before
    `apply_lora` and `accelerator.prepare`, on every rank."""
    if zero_stage(accelerator) == 3:
        from vlft.zero3_load import load_model_zero3

        return load_model_zero3(cfg, accelerator)
    dtype = torch.float32 if precision(cfg) == "fp32" else getattr(torch, cfg.model.dtype)
    path = cfg.model.path
    if not path.startswith("preset:"):
        return load_pretrained(path, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
                               after_shard=after_shard)
    model = build_model(preset(path.split(":", 1)[1]), dtype=dtype)  # seeded by the caller (train.seed)
    model.config.attn_implementation = cfg.model.attn_implementation
    return model
