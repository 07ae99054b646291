"""Typed, strict experiment settings.

A config is a tree of dataclasses. `build(cls, data, where)` turns a plain dict (from YAML) into that tree and fails
with the dotted key name on an unknown key or a value of the wrong type; `apply_overrides` takes `a.b=c` strings from
the command line; `to_dict` gives the resolved tree back for saving. YAML is always read with the safe loader.
The experiment's sections (model, lora, freeze, data, optim, train, checkpoint, logging) are defined below the helpers.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message names the dotted key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_convert(k_tp, k, where): _convert(v_tp, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def build(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, strictly: unknown keys and wrong types are errors naming the key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {', '.join(prefix + k for k in unknown)} (allowed in {where or 'the top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A config tree as plain dicts and lists (for YAML/JSON dumps)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text())
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML scalars/lists) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


# ====================================================================== experiment sections
# Every field has a default; the comment next to it is the documentation `vlft train --help` points at.
# Keys are strict: a typo is an error naming the dotted key (see `build`).

from vlft.data.config import DataConfig  # noqa: E402  (the data section is owned by vlft/data)


@dataclasses.dataclass
class ModelSection:
    # HF folder with config.json + *.safetensors, or "preset:<name>" (e.g. "preset:tiny") for a random model.
    path: str = ""
    # Weight dtype. Training on CPU is done in float32 whatever is set here (see train.precision).
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Attention backend. "sdpa" (default, works everywhere): torch's own kernels; on CUDA in bf16/fp16 the packed
    # rows and the vision tower's windows and full-attention blocks run torch's FlashAttention varlen kernel (torch
    # >= 2.10, no extra package), elsewhere scaled_dot_product_attention. "eager": the reference arithmetic.
    # "flash_attention_2": the flash-attn package's kernels (GPU, pip install vlft[flash]).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # Activation checkpointing, separately for the language model and the vision tower.
    gradient_checkpointing: bool = False
    vision_gradient_checkpointing: bool = False
    # Run the vision tower in every step, on a dummy input multiplied by zero when a batch has no image/video,
    # and images+videos in one call. Required for ZeRO-3 (ranks must agree on collectives); cheap elsewhere.
    run_vision_always: bool = True


@dataclasses.dataclass
class LoraSection:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # 0.0 means no dropout (it is passed to peft as given)
    # Targets per part, as module-name suffixes inside each block of that part. An empty list means no LoRA there.
    language_attention: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    language_mlp: list[str] = dataclasses.field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    # e.g. [attn.qkv, attn.proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]; needs freeze.vision=false
    vision: list[str] = dataclasses.field(default_factory=list)
    # e.g. [mlp.0, mlp.2]; needs freeze.merger=false
    merger: list[str] = dataclasses.field(default_factory=list)
    use_dora: bool = False  # weight-decomposed LoRA (peft use_dora)
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(rank) (peft use_rslora)
    # Modules trained in full and saved with the adapter (peft modules_to_save), e.g. [visual.merger].
    train_fully: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FreezeSection:
    # A frozen part gets no LoRA and no full training; the check runs after peft wrapped the model.
    vision: bool = True  # visual.patch_embed + visual.blocks
    merger: bool = True  # visual.merger
    # embed_tokens, decoder layers, final norm and lm_head (these stay frozen unless listed in lora.train_fully)
    language: bool = False


@dataclasses.dataclass
class OptimSection:
    lr: float = 1e-4  # language-model learning rate (LoRA on the language model)
    vision_lr: float | None = None  # None: same as lr
    merger_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0  # applied to matrices only (not to biases, norms or DoRA magnitudes)
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0  # takes precedence over warmup_ratio when > 0
    warmup_ratio: float = 0.0  # fraction of the total optimizer steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables


@dataclasses.dataclass
class TrainSection:
    output_dir: str = "runs/experiment"
    epochs: int = 1  # used when max_steps is 0
    max_steps: int = 0  # optimizer steps; 0: epochs x steps per epoch
    micro_batch_size: int = 1  # samples per forward on each rank
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    seed: int = 42  # model init (presets), data order (same on every rank), dropout
    # "auto": bf16 autocast on GPU, fp32 on CPU; "bf16"/"fp16"/"fp32" force it.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    eval_every: int = 0  # evaluate the held-out split every N steps (and at the end); 0: only at the end if any
    eval_batches: int = 0  # micro-batches per evaluation on each rank; 0: the whole eval split
    log_every: int = 1  # optimizer steps between metric records
    max_bad_steps: int = 3  # consecutive NaN/inf steps (skipped and counted) after which the run stops


@dataclasses.dataclass
class CheckpointSection:
    every: int = 0  # save every N optimizer steps (a final checkpoint is always written); 0: only at the end
    keep_last: int = 2  # complete checkpoints to keep (older ones are deleted); 0 keeps all
    resume: str | None = None  # None: start fresh; "auto": newest complete checkpoint in output_dir; or a path
    save_on_signal: bool = True  # SIGTERM/SIGINT: write a checkpoint at the next step boundary, then exit cleanly


@dataclasses.dataclass
class LoggingSection:
    console: bool = True  # one line per logged step
    progress_bar: bool = True  # tqdm with loss, lr, tokens/s and ETA (main process only)
    jsonl: bool = True  # OUTPUT_DIR/metrics.jsonl
    tensorboard: bool = False  # OUTPUT_DIR/tensorboard
    wandb: bool = False
    wandb_project: str = "vlft"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline needs no network; `wandb sync` later
    run_name: str | None = None  # default: the output folder's name


@dataclasses.dataclass
class ExperimentConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    freeze: FreezeSection = dataclasses.field(default_factory=FreezeSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks that a type cannot express; each message names the keys involved."""
    if not cfg.model.path:
        raise ConfigError("model.path: required (an HF folder or preset:<name>)")
    if cfg.lora.rank < 1:
        raise ConfigError(f"lora.rank: must be >= 1, got {cfg.lora.rank}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    for part, frozen in (("vision", cfg.freeze.vision), ("merger", cfg.freeze.merger)):
        if frozen and getattr(cfg.lora, part):
            raise ConfigError(f"lora.{part} targets are set but freeze.{part} is true; set freeze.{part}=false")
    if cfg.freeze.language and (cfg.lora.language_attention or cfg.lora.language_mlp):
        raise ConfigError("freeze.language is true but lora.language_attention/lora.language_mlp are set; "
                          "empty them to freeze the language model")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    for key in ("micro_batch_size", "gradient_accumulation", "log_every", "max_bad_steps"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {getattr(cfg.train, key)}")
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("train.max_steps and train.epochs are both 0: nothing to train")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1), got {cfg.optim.warmup_ratio}")
    return cfg


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML, apply `section.key=value` overrides, build and check the typed config."""
    data = apply_overrides(load_yaml(path), list(overrides))
    return validate(build(ExperimentConfig, data))


def dump_yaml(cfg: Any, path: str | Path | None = None) -> str:
    """The resolved config as YAML text (written to `path` too when given). Holds no secrets: none are config keys."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
