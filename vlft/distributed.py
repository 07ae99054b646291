"""The one place that knows accelerate and DeepSpeed: the accelerator, reductions across ranks, the data order shared
by all ranks, gathering trainable weights under ZeRO-3, and optimizer state files per topology.

The rest of vlft sees plain tensors and `torch.nn.Module`s; the recipe calls these helpers.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType

from vlft.config import ExperimentConfig

# Batch keys that stay on the host: the model reads them there (grids, packing boundaries, the padding side, the
# supervised positions) and copies to the device what it needs without waiting; on the device each would cost a sync.
HOST_KEYS = ("image_grid_thw", "video_grid_thw", "cu_seqlens", "attention_mask", "labels")


def precision(cfg: ExperimentConfig) -> str:
    """"bf16", "fp16" or "fp32": `auto` is bf16 on GPU and fp32 on CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def make_accelerator(cfg: ExperimentConfig) -> Accelerator:
    """An Accelerator for whatever `accelerate launch` chose (1 process, DDP, DeepSpeed ZeRO-2/3, many nodes).

    On CPU the process group uses gloo (without it every DeepSpeed rank believes it is rank 0 of 1) and accelerate is
    told `cpu=True`, which turns a 2-process launch into MULTI_CPU DDP. The DeepSpeed JSON's "auto" values are filled
    from the experiment config here, since the recipe prepares no accelerate DataLoader to infer them from.
    """
    on_cpu = not torch.cuda.is_available()
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision(cfg)]
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a backend set in one plain process would break accelerate
    pg = InitProcessGroupKwargs(backend="gloo" if on_cpu else None, timeout=datetime.timedelta(minutes=30))
    accelerator = Accelerator(
        cpu=on_cpu and not use_deepspeed,
        mixed_precision=None if use_deepspeed else mixed,
        gradient_accumulation_steps=cfg.train.gradient_accumulation,
        kwargs_handlers=[pg] if launched else [],
        step_scheduler_with_optimizer=False,  # the recipe steps the schedule once per optimizer step itself
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.train.gradient_accumulation
        ds["train_batch_size"] = (cfg.train.micro_batch_size * cfg.train.gradient_accumulation
                                  * accelerator.num_processes)
        ds["gradient_clipping"] = cfg.optim.max_grad_norm
        ds["bf16"] = {"enabled": mixed == "bf16"}
        ds["fp16"] = {"enabled": mixed == "fp16"}
        zero = ds.get("zero_optimization", {})
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            if zero.get(key) == "auto":  # model-size based values need the hidden size; fixed safe values instead
                zero[key] = {"reduce_bucket_size": int(5e8), "stage3_prefetch_bucket_size": int(5e8),
                             "stage3_param_persistence_threshold": int(1e6)}[key]
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def global_sum(accelerator: Accelerator, value: float) -> float:
    """Sum of a number over all ranks (every rank gets the result)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return float(t.item())


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a NaN loss or a received SIGTERM)."""
    return global_sum(accelerator, 1.0 if flag else 0.0) > 0


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a collated batch to `device`, keeping the vision grids on the host."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_KEYS else v)
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- data order
def rank_batches(order: list[int], micro_batch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch. The global order is the same on every rank (the dataset shuffles
    itself per epoch from data.seed); micro-step j takes the j-th block of `micro_batch * world` samples of it and
    rank r its r-th slice. The tail that cannot fill a block on every rank is dropped, so all
    ranks run the same number of steps."""
    block = micro_batch * world
    n_blocks = len(order) // block
    return [order[j * block + rank * micro_batch: j * block + (rank + 1) * micro_batch] for j in range(n_blocks)]


def eval_rank_batches(num_samples: int, micro_batch: int, rank: int, world: int) -> list[list[int]]:
    """Evaluation batches: every sample exactly once, in order, and the same number of batches on every rank (ZeRO-3
    needs equal forward counts). A rank past the end gets empty batches, which the recipe runs with no supervised
    token, so nothing is counted twice."""
    block = micro_batch * world
    n_blocks = max(1, -(-num_samples // block))
    return [[i for i in range(j * block + rank * micro_batch, j * block + (rank + 1) * micro_batch) if i < num_samples]
            for j in range(n_blocks)]


# ---------------------------------------------------------------------------------------------- weights and state
def trainable_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of the trainable parameters (LoRA, DoRA magnitudes, fully trained modules), with peft's
    names. Under ZeRO-3 only these are gathered, never the frozen base (a 72B model would not fit on one host)."""
    unwrapped = accelerator.unwrap_model(model)
    named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_optimizer(accelerator: Accelerator, model: Any, optimizer: Any, folder: Path) -> None:
    """Optimizer state into `folder` (called on every rank). DeepSpeed partitions it per rank, so its engine writes
    its own shards (trainable weights only); otherwise the main process writes one tensor file."""
    if is_deepspeed(accelerator):
        model.save_checkpoint(str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        torch.save(optimizer.optimizer.state_dict() if hasattr(optimizer, "optimizer") else optimizer.state_dict(),
                   folder / "optimizer.pt")


def load_optimizer(accelerator: Accelerator, model: Any, optimizer: Any, folder: Path) -> None:
    """Restore what `save_optimizer` wrote. The torch file is read with `weights_only=True` (tensors and plain
    containers only, no pickled code)."""
    if is_deepspeed(accelerator):
        model.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
        return
    state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    inner.load_state_dict(state)
