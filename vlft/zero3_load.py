"""The run's base model under DeepSpeed ZeRO-3, built so that no process ever holds all of it (vlft/loading.py calls
this module only under ZeRO-3: importing it imports DeepSpeed).

The model is built inside `deepspeed.zero.Init`, which
partitions each module's parameters as soon as the module is constructed, and then every rank fills only its own
partitions:

- ZeRO-3 gives rank r the elements [r * n, (r + 1) * n) of each flattened tensor (n = ceil(numel / world)), padded
  past the end. In a safetensors file that is one contiguous byte range, so each rank reads exactly its range of
  every tensor (through a bounded buffer that also converts the dtype) into its partition, `param.ds_tensor`.
  Host memory per rank: its partitions (1/world of the model) plus the buffer.
- Where only rank 0 sees the checkpoint folder, rank 0 reads tensor by tensor and each tensor is gathered, written
  on rank 0 and re-partitioned (`deepspeed.zero.GatheredParameters`): one full tensor per rank at a time.
- A `preset:` model is constructed with torch's default initialisation (the same random draws as the non-sharded
  path) and re-initialised module by module with `init_weights`, each module gathered while it is written, so with
  the same seed it holds the same values as `build_model` in float32. (In bf16/fp16 the construction draws happen
  on half-precision tensors, which consume the generator differently: a different random model.)

This module relies on DeepSpeed internals (`ds_tensor`, `ds_numel`, `ds_shape`, the partition layout above, and two
methods of `zero.Init` overridden below); tests/test_zero3_loading.py pins them: gathered weights equal the files,
losses equal ZeRO-2's, and each of 2 ranks grows by under 0.75x the model's bytes while loading (0.59x measured:
its half, the read buffer and DeepSpeed's engine).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import deepspeed
import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors import safe_open

from vlft.config import ExperimentConfig
from vlft.distributed import deepspeed_config, reduce_sum
from vlft.model import ModelConfig, Qwen2_5_VLForConditionalGeneration, load_config
from vlft.model import preset as model_preset
from vlft.model.qwen2_5_vl import LMHead, init_weights
from vlft.model.weights import ST_DTYPES, checkpoint_keys, safetensors_header, weight_files

READ_BUFFER_BYTES = 16 * 2**20  # file bytes read at a time into a partition (also bounds the dtype conversion)


def load_model_zero3(cfg: ExperimentConfig, accelerator: Accelerator) -> Qwen2_5_VLForConditionalGeneration:
    """The base model with its parameters partitioned as they are read (`param.numel() == 0`; the full shape is
    `param.ds_shape`); `accelerator.prepare` takes them as they are. Called by vlft.loading.load_model under ZeRO-3."""
    # the parameter dtype is the DeepSpeed config's (bf16/fp16 when enabled, else float32), which is also what the
    # engine would convert the model to
    path = cfg.model.path
    ds_config = deepspeed_config(accelerator)
    if path.startswith("preset:"):
        config = model_preset(path.split(":", 1)[1])
        config.attn_implementation = cfg.model.attn_implementation
        return build_partitioned_preset(config, ds_config)
    # Partitions swapped out to NVMe are not in memory to be written: those runs take the gathered path too.
    nvme = (ds_config.get("zero_optimization", {}).get("offload_param") or {}).get("device") == "nvme"
    if reduce_sum(accelerator, [0.0 if _has_checkpoint(path) else 1.0])[0] == 0 and not nvme:
        return load_partitioned(path, ds_config, cfg.model.attn_implementation)
    return _load_gathered(path, ds_config, cfg.model.attn_implementation, accelerator)


# ---------------------------------------------------------------------------------------------- construction
class _PartitionedInit(deepspeed.zero.Init):
    """`zero.Init` for a model whose partitions are all written after construction. Two departures from DeepSpeed's
    defaults while `constructing`, both about host memory:

    - no broadcast from rank 0 when a parameter is partitioned: it would write every full tensor on every rank, only
      for the values to be overwritten;
    - a tied head's own weight is not partitioned: the model replaces it by the embedding right after constructing
      the head, and a partitioned orphan would hold an embedding-sized share until garbage collection.

    Afterwards (`constructing` cleared) parameters created later, such as LoRA weights and the copies of fully trained
    modules, which `accelerator.prepare` converts, take DeepSpeed's usual path, broadcast included.
    """

    def __init__(self, ds_config: dict, tied_head: bool):
        # No `dtype=`: DeepSpeed then takes it from the config. With `dtype=` on its CPU accelerator it builds bf16
        # parameters whatever was asked (its default reads fp16 support, which the CPU accelerator reports as None).
        super().__init__(config_dict_or_path=ds_config)
        self.constructing = True
        self.tied_head = tied_head

    def _zero_init_param(self, param: torch.nn.Parameter) -> None:
        if not self.constructing:
            return super()._zero_init_param(param)
        self._convert_to_deepspeed_param(param)
        param.partition()

    def _post_init_method(self, module: torch.nn.Module) -> None:
        if self.constructing and self.tied_head and isinstance(module, LMHead):
            return
        super()._post_init_method(module)


def _construct(config: ModelConfig, ds_config: dict, random_init: bool) -> Qwen2_5_VLForConditionalGeneration:
    """The model with partitioned parameters; seeded `init_weights` values when `random_init`, else whatever the
    fresh memory held (every partition is overwritten by the caller)."""
    from transformers.initialization import no_init_weights  # skips torch's per-module random init

    init = _PartitionedInit(ds_config, tied_head=config.tie_word_embeddings)
    if random_init and not init.override_module_apply:
        raise ValueError("a preset model under ZeRO-3 is initialised through Module.apply, which DeepSpeed gathers "
                         "only with zero_optimization.override_module_apply true (its default)")
    # no_init_weights is entered first: it imports transformers modules, which must not happen inside zero.Init
    with nullcontext() if random_init else no_init_weights(), init:
        model = Qwen2_5_VLForConditionalGeneration(config)
        if random_init:
            # Module.apply inside zero.Init gathers each module's parameters, applies, broadcasts rank 0's values and
            # re-partitions. Leaves in apply's order are leaves in modules() order, init_weights' own order.
            model.apply(lambda m: init_weights(m) if next(m.children(), None) is None else None)
    init.constructing = False
    return model


def build_partitioned_preset(config: ModelConfig, ds_config: dict) -> Qwen2_5_VLForConditionalGeneration:
    """A random model (seed with torch.manual_seed first, the same on every rank) partitioned across ranks."""
    return _construct(config, ds_config, random_init=True).eval()


# ---------------------------------------------------------------------------------------------- reading shards
def _has_checkpoint(path: str) -> bool:
    try:
        weight_files(path)
    except (FileNotFoundError, ValueError):
        return False
    return (Path(path) / "config.json").is_file()


def load_partitioned(path: str | Path, ds_config: dict, attn_implementation: str = "sdpa"
                     ) -> Qwen2_5_VLForConditionalGeneration:
    """Build the model partitioned and fill each rank's partitions from the safetensors files (every rank must see
    the folder). Call on every rank, inside an initialised process group."""
    config = load_config(path)
    config.attn_implementation = attn_implementation
    model = _construct(config, ds_config, random_init=False)
    params = dict(model.named_parameters())  # a tied head shares the embedding's parameter: one name
    for f, pairs in checkpoint_keys(path, config.tie_word_embeddings, set(params)):
        header, data_start = safetensors_header(f)
        with open(f, "rb") as fh:
            for key, name in pairs:
                _read_partition(fh, header[key], data_start, params[name], f"{key} in {f}")
    return model.eval()


def _check_shape(entry: dict, param: torch.nn.Parameter, where: str) -> None:
    if list(entry["shape"]) != list(param.ds_shape):
        raise ValueError(f"{where}: shape {entry['shape']} in the file, {list(param.ds_shape)} in the model config")


def _read_partition(fh: BinaryIO, entry: dict, data_start: int, param: torch.nn.Parameter, where: str) -> None:
    """Copy this rank's share of one tensor from an open safetensors file into `param.ds_tensor`; zero the padding."""
    _check_shape(entry, param, where)
    if entry["dtype"] not in ST_DTYPES or not ST_DTYPES[entry["dtype"]].is_floating_point:
        raise ValueError(f"{where}: dtype {entry['dtype']} is not a floating-point weight")
    part = param.ds_tensor.view(-1)
    world, rank = dist.get_world_size(param.ds_process_group), dist.get_rank(param.ds_process_group)
    n = part.numel()
    if n != -(-param.ds_numel // world):
        raise RuntimeError(f"{where}: a partition of {n} elements on {world} ranks for {param.ds_numel}; this "
                           "DeepSpeed version splits parameters differently from what vlft.zero3_load expects")
    src = ST_DTYPES[entry["dtype"]]
    item = src.itemsize
    begin, end = entry["data_offsets"]
    if end - begin != param.ds_numel * item:
        raise ValueError(f"{where}: the byte range does not match the shape {entry['shape']}")
    start = rank * n
    count = max(0, min(n, param.ds_numel - start))
    buf = torch.empty(max(1, min(count, READ_BUFFER_BYTES // item)), dtype=src)
    for done in range(0, count, buf.numel()):
        k = min(buf.numel(), count - done)
        fh.seek(data_start + begin + (start + done) * item)
        if fh.readinto(memoryview(buf[:k].view(torch.uint8).numpy())) != k * item:
            raise ValueError(f"{where}: the file is truncated")
        part[done:done + k].copy_(buf[:k])
    part[count:].zero_()


# ---------------------------------------------------------------------------------------------- rank 0 only
def _load_gathered(path: str, ds_config: dict, attn_implementation: str, accelerator: Accelerator
                   ) -> Qwen2_5_VLForConditionalGeneration:
    """Fallback for a folder that only rank 0 sees: rank 0 reads each tensor whole, and it reaches the other ranks'
    partitions through a gather and a write on rank 0 (`GatheredParameters(modifier_rank=0)`): one full tensor per
    rank at a time, and every tensor crosses the network."""
    rank0 = accelerator.is_main_process
    if reduce_sum(accelerator, [1.0 if rank0 and _has_checkpoint(path) else 0.0])[0] == 0:
        if rank0:  # raise the precise reason
            weight_files(path)
            load_config(path)
        raise FileNotFoundError(f"model.path {path}: rank 0 finds no checkpoint there either (see its error)")
    text = _broadcast_text((Path(path) / "config.json").read_text() if rank0 else "", accelerator)
    config = ModelConfig.from_hf_dict(json.loads(text))
    config.attn_implementation = attn_implementation
    model = _construct(config, ds_config, random_init=False)
    params = dict(model.named_parameters())
    where: dict[str, tuple[Path, str]] = {}
    problem: Exception | None = None
    if rank0:  # every check before the first collective write, so that an error cannot leave the others waiting
        try:
            for f, pairs in checkpoint_keys(path, config.tie_word_embeddings, set(params)):
                header = safetensors_header(f)[0]
                for key, name in pairs:
                    _check_shape(header[key], params[name], f"{key} in {f}")
                    where[name] = (f, key)
        except (KeyError, ValueError) as e:
            problem = e
    if reduce_sum(accelerator, [1.0 if problem is not None else 0.0])[0]:
        raise problem or RuntimeError(f"model.path {path}: rank 0 could not load the checkpoint (see its error)")
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank0:
                f, key = where[name]
                with safe_open(str(f), framework="pt") as fh:
                    param.data.copy_(fh.get_tensor(key))
    return model.eval()


def _broadcast_text(text: str, accelerator: Accelerator) -> str:
    """Rank 0's `text` on every rank (as bytes in tensors: nothing is pickled)."""
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=accelerator.device)
    dist.broadcast(size, 0)
    buf = data.to(accelerator.device) if accelerator.is_main_process else torch.empty(
        int(size), dtype=torch.uint8, device=accelerator.device)
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode()
