"""The one place that knows accelerate and DeepSpeed: the accelerator, the one reduction of a step's bookkeeping,
backward and optimizer step (with NaN steps dropped on every topology), and gathering / scattering the trainable
weights and their optimizer state by parameter name, so checkpoints are the same files on every topology.

The rest of vlft sees plain tensors and `torch.nn.Module`s; the recipe calls these helpers.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType

from vlft.config import ExperimentConfig
from vlft.errors import UserError


def precision(cfg: ExperimentConfig) -> str:
    """"bf16", "fp16" or "fp32": `auto` is bf16 on GPU and fp32 on CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


class _Accelerator(Accelerator):
    """accelerate's unwrap_model imports DeepSpeed whenever it is installed, only to compare a type, and that import
    prints DeepSpeed's accelerator warning in runs that do not use it. Without DeepSpeed vlft's model is wrapped by
    DDP at most."""

    def unwrap_model(self, model, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True):
        if self.distributed_type == DistributedType.DEEPSPEED:
            return super().unwrap_model(model, keep_fp32_wrapper, keep_torch_compile)
        while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        return model


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
    accelerator = _Accelerator(
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


def deepspeed_config(accelerator: Accelerator) -> dict[str, Any] | None:
    """This run's DeepSpeed config with the "auto" values filled in by `make_accelerator` (None without DeepSpeed):
    what `deepspeed.zero.Init` needs to partition the model exactly as the engine will (vlft.zero3_load)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config if plugin is not None else None


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def reduce_sum(accelerator: Accelerator, values: list[float | torch.Tensor]) -> list[float]:
    """Sums over all ranks of a few numbers (host floats or 0-d device tensors, e.g. a loss), in ONE all-reduce,
    then one read back to the host. The training loop's bookkeeping of a step goes through this once."""
    device = accelerator.device
    t = torch.stack([v.detach().to(device=device, dtype=torch.float64).reshape(()) if torch.is_tensor(v)
                     else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


# ---------------------------------------------------------------------------------------------- evaluation order
def eval_rank_batches(num_samples: int, micro_batch: int, rank: int, world: int) -> list[list[int]]:
    """Evaluation batches: every sample exactly once, in order, and the same number of batches on every rank (ZeRO-3
    needs equal forward counts). A rank past the end gets empty batches, which the recipe runs with no supervised
    token, so nothing is counted twice."""
    block = micro_batch * world
    n_blocks = max(1, -(-num_samples // block))
    return [[i for i in range(j * block + rank * micro_batch, j * block + (rank + 1) * micro_batch) if i < num_samples]
            for j in range(n_blocks)]


# ---------------------------------------------------------------------------------------------- one optimizer step
def backward(accelerator: Accelerator, model: Any, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch of an accumulation window; gradients are synchronised on the `last` one.

    Under DeepSpeed the engine is driven directly: accelerate's wrapper would also run the optimizer step inside the
    last backward, before the loop knows whether a rank saw a NaN loss. Both paths divide the loss by the
    accumulation steps (accelerate and DeepSpeed do), which the recipe's loss scale accounts for."""
    if is_deepspeed(accelerator):
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss)
    elif last:
        accelerator.backward(loss)
    else:
        with accelerator.no_sync(model):
            accelerator.backward(loss)


def optimizer_step(accelerator: Accelerator, model: Any, optimizer: Any, max_grad_norm: float, drop: bool
                   ) -> torch.Tensor | float | None:
    """Apply the accumulated gradients (clipped to `max_grad_norm`; 0 disables), or with `drop` discard them and
    leave every trainable parameter and optimizer state exactly as they were. Returns the gradient norm (a device
    tensor or a float; not read here, so no host sync) or None.

    DeepSpeed has already reduced the gradients into its own partitioned buffers, which only its step clears; a
    dropped step therefore runs that step and then puts back this rank's share of the trainable state (LoRA-sized,
    so the copy is cheap and needs no communication)."""
    if is_deepspeed(accelerator):
        saved = _snapshot(model) if drop else None
        model.step()
        if saved is not None:
            _restore(saved)
            return None
        return model.get_global_grad_norm()
    if drop:
        optimizer.zero_grad(set_to_none=True)
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _flat_partitions(engine: Any) -> list[torch.Tensor]:
    """This rank's float32 master partitions, the tensors DeepSpeed's inner torch optimizer steps (ZeRO-3 hands
    them to it only during its step, so they are taken from the ZeRO optimizer itself)."""
    zero = engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    return list(flats if flats is not None else zero.single_partition_of_fp32_groups)  # ZeRO-1/2


def _local_trainable_tensors(engine: Any) -> tuple[Any, list[torch.Tensor]]:
    """(inner torch optimizer, the tensors of this rank that a DeepSpeed step changes): the module's trainable
    parameters (their local partition under ZeRO-3) and the float32 master partitions."""
    tensors = [getattr(p, "ds_tensor", p).data for p in engine.module.parameters() if p.requires_grad]
    return engine.optimizer.optimizer, tensors + [flat.data for flat in _flat_partitions(engine)]


def _snapshot(engine: Any) -> dict[str, Any]:
    inner, tensors = _local_trainable_tensors(engine)
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in inner.state.items()}
    return {"inner": inner, "tensors": [(t, t.clone()) for t in tensors], "state": state}


def _restore(saved: dict[str, Any]) -> None:
    for t, copy in saved["tensors"]:
        t.copy_(copy)
    inner = saved["inner"]
    for p in list(inner.state):
        before = saved["state"].get(id(p))
        if before is None:  # the state was created by the dropped step (no step had run before)
            del inner.state[p]
            continue
        for k, v in before.items():
            if torch.is_tensor(v):
                inner.state[p][k].copy_(v)
            else:
                inner.state[p][k] = v


# ---------------------------------------------------------------------------------------------- trainable state
def trainable_parameters(accelerator: Accelerator, model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything that trains, with the unwrapped peft model's names (the same names on every
    topology, which is what makes checkpoints portable between DDP and ZeRO, and between process counts)."""
    return [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]


def gather_trainable(accelerator: Accelerator, model: Any) -> dict[str, torch.Tensor]:
    """Full-size float32 CPU copies of the trainable parameters, by name; call on every rank (collective under
    DeepSpeed). Under DeepSpeed these are the optimizer's float32 master weights, which a bf16 module only rounds;
    under ZeRO-3 only these small tensors are gathered, never the frozen base."""
    named = trainable_parameters(accelerator, model)
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in named}
    return {n: p.detach().float().cpu() for n, p in named}


def gather_optimizer_state(accelerator: Accelerator, model: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    """{f"{name}/{key}": full float32 tensor} of the optimizer state of every trainable parameter (AdamW: exp_avg,
    exp_avg_sq and the step count); empty before the first step. Call on every rank (collective under DeepSpeed)."""
    named = trainable_parameters(accelerator, model)
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = model.optimizer.optimizer
        if not inner.state:
            return {}
        _link_state_fragments(model)
        first = next(iter(inner.state.values()))
        keys = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
        out = {f"{n}/{k}": safe_get_full_optimizer_state(p, k).detach().float().cpu() for n, p in named for k in keys}
        step = max(float(st["step"]) for st in inner.state.values())
        out.update({f"{n}/step": torch.tensor(step) for n, _ in named})
        return out
    inner = getattr(optimizer, "optimizer", optimizer)
    out = {}
    for n, p in named:
        for k, v in inner.state.get(p, {}).items():
            out[f"{n}/{k}"] = v.detach().float().cpu() if torch.is_tensor(v) else torch.tensor(float(v))
    return out


def _link_state_fragments(engine: Any) -> None:
    """Point each parameter's view of the optimizer state at the current state tensors (ZeRO-1/2). DeepSpeed 0.19
    links them once, right after the step of the first parameter group, so parameters of later groups (vlft has
    one group per part and decay) find no state; and a resume replaces the state tensors."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def load_trainable(accelerator: Accelerator, model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Set the trainable parameters (and, under DeepSpeed, the float32 masters) from full tensors by name; call on
    every rank after `prepare`. Fails naming the parameters that the checkpoint lacks or has in excess."""
    named = trainable_parameters(accelerator, model)
    missing = [n for n, _ in named if n not in weights]
    extra = sorted(set(weights) - {n for n, _ in named})
    if missing or extra:
        raise UserError(f"the checkpoint's trainable weights do not match the model: missing {missing[:5]}, "
                        f"unexpected {extra[:5]} (were the lora/freeze settings changed?)")
    if is_deepspeed(accelerator):
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        partitioned = [p for _, p in named if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0, enabled=bool(partitioned)):
            with torch.no_grad():
                for n, p in named:
                    p.data.copy_(weights[n].to(p.dtype).view_as(p.data))
        for n, p in named:
            safe_set_full_fp32_param(p, weights[n].to(accelerator.device).view(getattr(p, "ds_shape", p.shape)))
        return
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n].to(p.dtype))


def load_optimizer_state(accelerator: Accelerator, model: Any, optimizer: Any, state: dict[str, torch.Tensor]
                         ) -> None:
    """Restore what `gather_optimizer_state` returned, on any topology; call on every rank after `prepare`."""
    named = trainable_parameters(accelerator, model)
    if not state:
        return
    keys = sorted({k.rsplit("/", 1)[1] for k in state} - {"step"})
    missing = [f"{n}/{k}" for n, _ in named for k in keys + ["step"] if f"{n}/{k}" not in state]
    if missing:
        raise UserError(f"the checkpoint's optimizer state lacks {missing[:5]}")
    step = max(float(state[f"{n}/step"]) for n, _ in named)
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_set_full_optimizer_state

        inner = model.optimizer.optimizer
        for flat in _flat_partitions(model):  # the optimizer creates this state lazily, at its first step
            inner.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                                 **{k: torch.zeros_like(flat) for k in keys}}
        _link_state_fragments(model)
        for n, p in named:
            for k in keys:
                safe_set_full_optimizer_state(p, state[f"{n}/{k}"].to(accelerator.device).view(
                    getattr(p, "ds_shape", p.shape)), k)
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    for n, p in named:
        inner.state[p] = {"step": torch.tensor(float(state[f"{n}/step"]), dtype=torch.float32),
                          **{k: state[f"{n}/{k}"].to(device=p.device, dtype=p.dtype).view_as(p) for k in keys}}
