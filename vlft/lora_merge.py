"""Saved LoRA/DoRA adapters without peft: read one, check it against a base, merge it into weights.

`vlft export` merges shard by shard from these pieces; `vlft generate`, `vlft chat` and `vlft eval` merge into a
loaded model with `apply_adapter` (with `--load-4bit` they keep it unmerged on the 4-bit layers instead,
vlft.quant.attach_adapter). The training side (peft wrapping, targets, freezing) is vlft/adapters.py.

Merge math (what peft computes, written out here; checked against peft's own merge in tests/test_export.py):
    LoRA:  W' = W + s * B @ A,                 s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    DoRA:  W' = m / ||W + s*B@A||_row * (W + s*B@A)   (norm over the input dim, per output row; bias unchanged)
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlft.errors import UserError
from vlft.model.weights import to_hub_key
from vlft.run_folder import MARKER, complete_checkpoints

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's own names
# peft options whose merge this module does not implement: refused rather than merged wrongly
UNSUPPORTED = {"fan_in_fan_out": False, "lora_bias": False, "use_bdlora": None, "target_parameters": None,
               "alora_invocation_tokens": None, "trainable_token_indices": None}
PARTS = ("language", "vision", "merger")  # the parts that freeze, learning rates and exports speak of


class AdapterError(UserError, ValueError):
    """A bad or unusable adapter: the message names the file, key or option."""


def part_of(name: str) -> str:
    """The part ("language", "vision" or "merger") of a parameter or module name (Hub or peft names).

    Embeddings, the final norm and lm_head belong to the language model."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    if name.startswith("visual.merger"):
        return "merger"
    return "vision" if name.startswith("visual.") else "language"


@dataclass
class LoraWeights:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # [out], DoRA only


@dataclass
class Adapter:
    """A checkpoint's adapter in Hub names: LoRA per module (`model.layers.0.self_attn.q_proj`) and the fully trained
    parameters (`visual.merger.mlp.0.weight`)."""

    folder: Path
    config: dict
    lora: dict[str, LoraWeights] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        ts = [t for w in self.lora.values() for t in (w.A, w.B, w.magnitude) if t is not None] + list(self.full.values())
        return sum(t.numel() * t.element_size() for t in ts)


def resolve_checkpoint(path: str | Path) -> Path:
    """A folder with adapter_config.json; a run folder resolves to its newest complete checkpoint-N."""
    p = Path(path)
    if not p.is_dir():
        raise AdapterError(f"adapter checkpoint not found: {p}")
    if not (p / ADAPTER_CONFIG).is_file():
        done = complete_checkpoints(p)
        if done:
            print(f"using the newest complete checkpoint of {p}: {done[-1].name}", file=sys.stderr)
            return done[-1]
        raise AdapterError(f"{p} holds no {ADAPTER_CONFIG} and no complete checkpoint-N folder")
    if (p / "trainer_state.json").is_file() and not (p / MARKER).is_file():
        raise AdapterError(f"{p} is an incomplete checkpoint (no {MARKER} marker): its save was interrupted")
    return p


def _alpha_for(name: str, config: dict) -> float:
    for key, alpha in (config.get("alpha_pattern") or {}).items():  # peft's rule: the pattern ends the module name
        if re.match(rf"(.*\.)?({key})$", name):
            return float(alpha)
    return float(config["lora_alpha"])


def load_adapter(path: str | Path) -> Adapter:
    """Read and check a PEFT LoRA/DoRA adapter; keys saved from vlft (Hub layout) or transformers v5 both work."""
    from safetensors.torch import load_file

    folder = resolve_checkpoint(path)
    weights_file = folder / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} is missing"
                           + (" (only a pickle adapter_model.bin; vlft reads safetensors only)"
                              if (folder / "adapter_model.bin").is_file() else ""))
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r}; only LORA (with or "
                           "without DoRA) can be used")
    for key, default in UNSUPPORTED.items():
        if config.get(key) not in (default, None, [], {}):
            raise AdapterError(f"{folder / ADAPTER_CONFIG}: {key}={config[key]!r} is not supported by vlft")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: bias={config['bias']!r}; only bias='none' is supported")
    state = load_file(str(weights_file))
    adapter = Adapter(folder, config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if t.numel() == 0:
            raise AdapterError(f"{weights_file}: tensor {key} is empty; the checkpoint was saved without gathering "
                               "ZeRO-3 shards (save with vlft's recipe, which gathers them)")
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", name)
        if m:
            kind = m.group(2).split(".")[0]
            parts.setdefault(to_hub_key(m.group(1)), {})[kind] = t
        elif ".lora_" in name:
            raise AdapterError(f"{weights_file}: {key} is a kind of LoRA weight vlft does not merge")
        else:  # a parameter of a fully trained module (peft modules_to_save)
            adapter.full[to_hub_key(name)] = t
    rslora = bool(config.get("use_rslora"))
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterError(f"{weights_file}: {module} has {sorted(p)} but needs both lora_A and lora_B")
        A, B = p["lora_A"], p["lora_B"]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
            raise AdapterError(f"{weights_file}: {module} lora_A {list(A.shape)} and lora_B {list(B.shape)} are not "
                               "the two factors of a Linear LoRA")
        alpha = _alpha_for(module, config)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        adapter.lora[module] = LoraWeights(A, B, scale, p.get("lora_magnitude_vector"))
    both = [m for m in adapter.lora if any(k.startswith(m + ".") for k in adapter.full)]
    if both:
        raise AdapterError(f"{weights_file}: {both[0]} has LoRA weights and is also trained fully")
    if not adapter.lora and not adapter.full:
        raise AdapterError(f"{weights_file} holds no LoRA weights and no trained modules")
    return adapter


def merge_weight(W: torch.Tensor, w: LoraWeights, out_dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] merged with one LoRA/DoRA module, computed in float32 whatever the storage dtype (W is not
    modified: a tensor read from a file may be a view of the file's mapping)."""
    merged = W.to(torch.float32, copy=True)
    merged.addmm_(w.B.to(torch.float32), w.A.to(torch.float32), alpha=w.scale)
    if w.magnitude is not None:
        norm = torch.linalg.vector_norm(merged, dim=1)
        merged.mul_((w.magnitude.to(torch.float32) / norm).unsqueeze(1))
    return merged.to(out_dtype)


def check_fits(adapter: Adapter, shapes: dict[str, list[int]], base: Path) -> None:
    """Fail naming the keys when the adapter was trained on a base of another shape (or architecture)."""
    problems = []
    for module, w in adapter.lora.items():
        key = module + ".weight"
        want = [w.B.shape[0], w.A.shape[1]]
        if key not in shapes:
            problems.append(f"{module} (LoRA target) is not in the base")
        elif shapes[key] != want:
            problems.append(f"{key} is {shapes[key]} in the base but the LoRA factors make {want}")
        elif w.magnitude is not None and list(w.magnitude.shape) != [want[0]]:
            problems.append(f"{module} DoRA magnitude is {list(w.magnitude.shape)}, expected [{want[0]}]")
    for key, t in adapter.full.items():
        if key not in shapes:
            problems.append(f"{key} (fully trained) is not in the base")
        elif shapes[key] != list(t.shape):
            problems.append(f"{key} is {shapes[key]} in the base but {list(t.shape)} in the adapter")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise AdapterError(f"the adapter {adapter.folder} does not fit the base {base}; was it trained on another "
                           f"base model size?\n  " + "\n  ".join(problems[:8]) + more)


def apply_adapter(model: torch.nn.Module, adapter: Adapter, parts: tuple[str, ...] = PARTS) -> None:
    """Merge an adapter into a loaded vlft model in place (generation and evaluation use this)."""
    params = dict(model.named_parameters())
    check_fits(adapter, {k: list(v.shape) for k, v in params.items()}, Path("<loaded model>"))
    with torch.no_grad():
        for module, w in adapter.lora.items():
            if part_of(module) in parts:
                p = params[module + ".weight"]
                p.copy_(merge_weight(p.detach(), w, p.dtype))
        for key, t in adapter.full.items():
            if part_of(key) in parts:
                params[key].copy_(t.to(params[key].dtype))
