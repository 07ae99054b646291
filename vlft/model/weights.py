"""Read and write Hugging Face checkpoint folders (safetensors only) by identical key names (docs/checkpoints.md).

Reading builds the model on the meta device and fills it shard by shard with `load_state_dict(assign=True)`, so host
memory peaks near one copy of the weights. Keys in the transformers v5 layout (`model.language_model.*`,
`model.visual.*`) are mapped to the Hub layout, which is vlft's module tree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlft.model.config import ModelConfig, load_config, save_config
from vlft.model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # safetensors names
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def to_hub_key(key: str) -> str:
    """v5 in-memory names -> Hub checkpoint names (identity on Hub names)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when sharded. Pickle-only folders are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"{folder} holds only pickle weight files ({', '.join(pickles)}); vlft reads safetensors only "
                         "because unpickling can run arbitrary code. Convert them to safetensors first.")
    raise FileNotFoundError(f"no *.safetensors weights in {folder}")


def safetensors_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """({name: {dtype, shape, data_offsets}}, offset of the data area) of a safetensors file (an 8-byte length, then
    that much JSON, then the data). What reading one byte range of a tensor needs, e.g. one rank's ZeRO-3 partition
    (vlft/zero3_load.py); whole tensors are read with safetensors' own `safe_open`."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        try:
            header = json.loads(f.read(n)) if n > 0 else None
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (unreadable header)")
    header.pop("__metadata__", None)
    return header, 8 + n


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = config.torch_dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return dtype


def load_pretrained(path: str | Path, dtype: torch.dtype | str | None = torch.bfloat16,
                    device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                    after_shard: Callable[[torch.nn.Module], object] | None = None
                    ) -> Qwen2_5_VLForConditionalGeneration:
    """Load an HF Qwen2.5-VL folder (flat or nested config.json; one file or shards; Hub or v5 keys).

    `after_shard(model)` runs after each shard is loaded, while the layers of later shards are still on the meta
    device: vlft.quant replaces the loaded linear layers by 4-bit ones there, so that a full-precision copy of the
    whole model never exists."""
    config = load_config(path)
    config.attn_implementation = attn_implementation
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    expected = set(model.state_dict().keys())
    tied = config.tie_word_embeddings
    if tied:
        expected.discard("lm_head.weight")
    for f, pairs in checkpoint_keys(path, tied, expected):
        shard = {}
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for key, name in pairs:
                raw = fh.get_tensor(key)
                t = raw.to(dtype)
                if after_shard is not None and t is raw and t.device.type == "cpu":
                    # a tensor read on the CPU is a view of the file's mapping, which stays mapped (with every page
                    # read) while one such view lives: a copy lets the shard's pages go once its layers are replaced
                    t = t.clone()
                shard[name] = t
        model.load_state_dict(shard, strict=False, assign=True)
        if after_shard is not None:
            after_shard(model)
        del shard
    if tied:  # assign=True replaced the embedding parameter; point the head at it again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def checkpoint_keys(path: str | Path, tied: bool, expected: set[str]) -> Iterator[tuple[Path, list[tuple[str, str]]]]:
    """Per safetensors file of the folder, the (key in the file, parameter name) pairs to load; after the last file,
    fails naming the parameters no file provided and the file keys no parameter takes (at most 20 of each)."""
    seen: set[str] = set()
    unexpected: list[str] = []
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
        pairs = []
        for key in keys:
            name = to_hub_key(key)
            if tied and name == "lm_head.weight":
                continue  # some tied checkpoints also store the head; the embedding is authoritative
            if name not in expected:
                unexpected.append(f"{key} ({f.name})")
                continue
            pairs.append((key, name))
        seen.update(name for _, name in pairs)
        yield f, pairs
    missing = sorted(expected - seen)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        raise KeyError(f"checkpoint {path} does not match the Qwen2.5-VL config: " + "; ".join(parts))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a string like '5GB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def hub_state_dict(model: Qwen2_5_VLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Hub-layout tensors to write: every parameter once (a tied head is not written)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_shards(state: dict[str, torch.Tensor], folder: str | Path, max_shard_size: int | str = "5GB") -> None:
    """safetensors shards (`model.safetensors` when one suffices) plus `model.safetensors.index.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t.detach().contiguous().cpu()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_pretrained(model: Qwen2_5_VLForConditionalGeneration, path: str | Path,
                    max_shard_size: int | str = "5GB") -> None:
    """Write config.json and Hub-layout safetensors shards that transformers' from_pretrained loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = hub_state_dict(model)
    dtypes = {t.dtype for t in state.values()}
    config = model.config.replace()
    if len(dtypes) == 1:
        config.torch_dtype = str(next(iter(dtypes))).replace("torch.", "")
    write_shards(state, path, max_shard_size)
    save_config(config, path)
