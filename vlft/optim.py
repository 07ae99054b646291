"""Parameter groups per part with their own learning rate, AdamW, and warm-up then cosine/linear/constant decay."""

from __future__ import annotations

import math

import torch

from vlft.adapters import part_of
from vlft.config import OptimSection


def part_lrs(optim: OptimSection) -> dict[str, float]:
    return {
        "language": optim.lr,
        "vision": optim.lr if optim.vision_lr is None else optim.vision_lr,
        "merger": optim.lr if optim.merger_lr is None else optim.merger_lr,
    }


def param_groups(model: torch.nn.Module, optim: OptimSection) -> list[dict]:
    """Trainable parameters grouped by (part, decay). Weight decay applies to matrices only: biases, norms and DoRA
    magnitude vectors are 1-D and decaying them pulls scales towards zero rather than regularising."""
    lrs = part_lrs(optim)
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        decay = param.ndim >= 2 and optim.weight_decay > 0
        group = groups.setdefault((part, decay), {
            "params": [], "lr": lrs[part], "weight_decay": optim.weight_decay if decay else 0.0,
            "part": part,
        })
        group["params"].append(param)
    if not groups:
        raise ValueError("no trainable parameters: check the lora and freeze sections")
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """torch AdamW over the per-part groups (also under DeepSpeed: it wraps this one, no Adam op to compile)."""
    return torch.optim.AdamW(param_groups(model, optim), betas=tuple(optim.betas), eps=optim.eps)


def warmup_steps(optim: OptimSection, total_steps: int) -> int:
    if optim.warmup_steps > 0:
        return optim.warmup_steps
    return int(round(optim.warmup_ratio * total_steps))


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based). Warm-up is linear and reaches 1 on its last
    step (the first step already trains at 1/warmup); then the decay goes from 1 towards `min_ratio`, which it
    would reach one step after the last (so the last step still learns)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    raise ValueError(f"optim.schedule: unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, total_steps: int):
    warmup = warmup_steps(optim, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, optim.schedule, optim.min_lr_ratio)
    )
