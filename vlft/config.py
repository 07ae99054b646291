"""Typed, strict experiment settings.

A config is a tree of dataclasses. `build(cls, data, where)` turns a plain dict (from YAML) into that tree and fails
with the dotted key name on an unknown key or a value of the wrong type; `apply_overrides` takes `a.b=c` strings from
the command line; `to_dict` gives the resolved tree back for saving. YAML is always read with the safe loader.
The experiment's sections (model, lora, freeze, data, optim, train, checkpoint, logging) are defined below the helpers.

Paths: a relative path in a YAML file is relative to that file's folder (as in a compose file or a Makefile), so an
experiment folder works from any current folder; a relative path given as a `section.key=value` override is relative
to the current folder. `load_config_tree` makes both absolute, for every command (`vlft train`, `vlft data check`,
`vlft eval`), so the resolved config saved with a run records absolute paths. `check_inputs` checks that the
datasets, the tokenizer and the base model exist before anything is built or written.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from vlft.errors import ConfigError, UserError  # noqa: F401  (ConfigError is part of this module's interface)

T = TypeVar("T")


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
        if len(errors) == 1:  # `X | None`: X's own message names the inner key (model.quantization.quant_type)
            raise ConfigError(errors[0])
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
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not a valid YAML file: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def _parse_value(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: {raw!r} is not a valid YAML value ({e})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str], base: str | Path | None = None,
                    at: tuple[str, ...] = ()) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML scalars/lists) to a nested dict, in place.
    With `base`, relative paths in the values are made absolute against it (the current folder for a command line);
    `at` is where `data` sits in an experiment config (("data",) for a data section alone)."""
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
        value = _parse_value(key, raw)
        node[parts[-1]] = value if base is None else resolve_paths(value, Path(base), (*at, *parts))
    return data


# ====================================================================== paths
# Where a config holds paths ("*": any item of a list). Values here are local paths, never Hub names: vlft reads
# local folders only, so a path that does not exist is an error naming its key (see check_inputs).
PATH_KEYS = {("model", "path"), ("data", "tokenizer"), ("train", "output_dir"), ("checkpoint", "resume")} | {
    ("data", section, "*", key) for section in ("datasets", "eval_datasets") for key in ("path", "media_root")}


def _not_a_path(at: tuple[str, ...], value: str) -> bool:
    """The values of a path key that name something else: a random model preset, resuming from the newest checkpoint."""
    return (at == ("model", "path") and value.startswith("preset:")) or (at == ("checkpoint", "resume")
                                                                          and value == "auto")


def absolute_path(value: str, base: Path) -> str:
    """`value` made absolute against `base`, ~ expanded (an empty value stays empty: the checks name it)."""
    if not value:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def resolve_paths(tree: Any, base: Path, at: tuple[str, ...] = ()) -> Any:
    """A copy of a config tree (or of the subtree found at key path `at`) with its relative paths made absolute."""
    if isinstance(tree, dict):
        return {k: resolve_paths(v, base, (*at, str(k))) for k, v in tree.items()}
    if isinstance(tree, list):
        return [resolve_paths(v, base, (*at, "*")) for v in tree]
    if at in PATH_KEYS and isinstance(tree, str) and not _not_a_path(at, tree):
        return absolute_path(tree, base)
    return tree


def load_config_tree(path: str | Path, overrides: list[str] | tuple[str, ...] = (), at: tuple[str, ...] = ()
                     ) -> dict[str, Any]:
    """The YAML at `path` as a plain tree, overrides applied, every path absolute: the YAML's relative to its own
    folder, the overrides' relative to the current folder. The one path rule of every command. `at`: where the
    YAML's top level sits in an experiment config (("data",) for a YAML holding only the data section)."""
    path = Path(path)
    tree = resolve_paths(load_yaml(path), path.absolute().parent, at)
    return apply_overrides(tree, list(overrides), base=Path.cwd(), at=at)


# ====================================================================== experiment sections
# Every field has a default; the comment next to it is the documentation `vlft train --help` points at.
# Keys are strict: a typo is an error naming the dotted key (see `build`).

from vlft.data.config import DataConfig, check_range, validate_data  # noqa: E402  (the data section: vlft/data)


@dataclasses.dataclass
class QuantizationSection:
    """QLoRA: the frozen base's linear layers held in 4 bits by bitsandbytes (vlft/quant.py). LoRA, trained modules,
    embeddings, lm_head, norms and the vision merger stay in model.dtype. Works with 1 process, DDP and ZeRO-2;
    ZeRO-3 is refused (it would partition the packed 4-bit weights)."""

    bits: Literal[4] = 4  # only 4-bit (QLoRA); 8-bit bases are not offered
    quant_type: Literal["nf4", "fp4"] = "nf4"  # NF4: the QLoRA paper's normal-float code (use it unless comparing)
    double_quant: bool = True  # quantize the per-block scales too (about 0.4 bit less per weight)
    # dtype of the dequantized weight in each matmul; "auto": the dtype the layer was loaded in (model.dtype, or
    # float32 when training on CPU)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    vision: bool = False  # also quantize the vision tower's blocks (attn.qkv, attn.proj, mlp.*); the merger never


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
    # null: a full-precision base. A mapping (`{}` for the defaults): QLoRA, see QuantizationSection above; set it
    # from the command line with model.quantization={} or model.quantization.quant_type=fp4.
    quantization: QuantizationSection | None = None


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
    # A new run refuses an output_dir that holds another run; true replaces that run (its checkpoints, metrics and
    # config are deleted; files that vlft did not write are never touched).
    overwrite_output_dir: bool = False


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
    """Every value in range and the cross-field checks a type cannot express; each message names the keys."""
    if not cfg.model.path:
        raise ConfigError("model.path: required (an HF folder or preset:<name>)")
    check_range("lora.rank", cfg.lora.rank, 1)
    check_range("lora.alpha", cfg.lora.alpha, 0, lo_open=True)
    check_range("lora.dropout", cfg.lora.dropout, 0, 1, hi_open=True)
    for part in ("language_attention", "language_mlp", "vision", "merger", "train_fully"):
        if not all(getattr(cfg.lora, part)):
            raise ConfigError(f"lora.{part}: a module name is empty in {getattr(cfg.lora, part)}")
    for part, frozen in (("vision", cfg.freeze.vision), ("merger", cfg.freeze.merger)):
        if frozen and getattr(cfg.lora, part):
            raise ConfigError(f"lora.{part} targets are set but freeze.{part} is true; set freeze.{part}=false")
    if cfg.freeze.language and (cfg.lora.language_attention or cfg.lora.language_mlp):
        raise ConfigError("freeze.language is true but lora.language_attention/lora.language_mlp are set; "
                          "empty them to freeze the language model")
    validate_data(cfg.data)
    o = cfg.optim
    for key in ("lr", "vision_lr", "merger_lr", "eps"):
        check_range(f"optim.{key}", getattr(o, key), 0, lo_open=True)
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {o.betas}")
    for i, beta in enumerate(o.betas):
        check_range(f"optim.betas[{i}]", beta, 0, 1, hi_open=True)
    for key in ("weight_decay", "warmup_steps", "max_grad_norm"):
        check_range(f"optim.{key}", getattr(o, key), 0)
    check_range("optim.warmup_ratio", o.warmup_ratio, 0, 1, hi_open=True)
    check_range("optim.min_lr_ratio", o.min_lr_ratio, 0, 1)
    t = cfg.train
    if not t.output_dir:
        raise ConfigError("train.output_dir: required (the run folder)")
    for key in ("micro_batch_size", "gradient_accumulation", "log_every", "max_bad_steps"):
        check_range(f"train.{key}", getattr(t, key), 1)
    for key in ("epochs", "max_steps", "seed", "eval_every", "eval_batches"):
        check_range(f"train.{key}", getattr(t, key), 0)
    if t.max_steps == 0 and t.epochs == 0:
        raise ConfigError("train.max_steps and train.epochs are both 0: nothing to train")
    check_range("checkpoint.every", cfg.checkpoint.every, 0)
    check_range("checkpoint.keep_last", cfg.checkpoint.keep_last, 0)
    if cfg.checkpoint.resume == "":
        raise ConfigError("checkpoint.resume: empty; use auto, a checkpoint path, or leave it unset (null)")
    if cfg.logging.wandb and not cfg.logging.wandb_project:
        raise ConfigError("logging.wandb_project: required when logging.wandb is true")
    return cfg


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML, apply `section.key=value` overrides, build and check the typed config. Relative paths
    are resolved as `load_config_tree` says (a default output_dir is relative to the YAML's folder too)."""
    cfg = validate(build(ExperimentConfig, load_config_tree(path, overrides)))
    cfg.train.output_dir = absolute_path(cfg.train.output_dir, Path(path).absolute().parent)
    return cfg


# ====================================================================== inputs exist (before anything is built)
NOT_FOUND_HINT = ("(a relative path in a YAML file is relative to that file's folder, one given on the command line to "
                  "the current folder; vlft reads local folders only and downloads nothing)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def check_model_path(key: str, path: str) -> None:
    """A preset name or an HF folder with config.json and safetensors weights."""
    if path.startswith("preset:"):
        from vlft.model.config import preset

        try:
            preset(path.split(":", 1)[1])
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
        return
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}: model folder not found: {folder} {NOT_FOUND_HINT}")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {folder} has no config.json (is it a Hugging Face model folder?)")
    from vlft.model.weights import weight_files

    try:
        weight_files(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def check_tokenizer_path(key: str, path: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}: tokenizer folder not found: {folder} {NOT_FOUND_HINT}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)})")


def check_data_inputs(data: DataConfig, where: str = "data") -> None:
    """Every dataset file is there and not empty, every media_root is a folder."""
    from vlft.data.formats import dataset_files

    for name in ("datasets", "eval_datasets"):
        for i, d in enumerate(getattr(data, name)):
            key = f"{where}.{name}[{i}]"
            try:
                dataset_files(d.path)
            except (OSError, UserError) as e:
                raise ConfigError(f"{key}.path: {e} {NOT_FOUND_HINT if isinstance(e, OSError) else ''}".rstrip()) \
                    from None
            if d.media_root is not None and not Path(d.media_root).is_dir():
                raise ConfigError(f"{key}.media_root: folder not found: {d.media_root} {NOT_FOUND_HINT}")


def check_inputs(cfg: ExperimentConfig) -> None:
    """Pre-flight, before any model is built or anything is written: the base model, the tokenizer, the datasets,
    the checkpoint to resume from and the output folder. Raises ConfigError naming the key."""
    check_model_path("model.path", cfg.model.path)
    if cfg.data.tokenizer:
        check_tokenizer_path("data.tokenizer", cfg.data.tokenizer)
    elif cfg.model.path.startswith("preset:"):
        raise ConfigError("data.tokenizer: required when model.path is a preset (a random model has no tokenizer)")
    else:
        check_tokenizer_path("model.path (the tokenizer folder while data.tokenizer is unset)", cfg.model.path)
    check_data_inputs(cfg.data)
    streamed = [i for i, d in enumerate(cfg.data.datasets) if d.streaming]
    if streamed:  # see vlft/data/streaming.py
        key = f"data.datasets[{streamed[0]}].streaming"
        if cfg.train.max_steps <= 0:
            raise ConfigError(f"{key}: a stream has no known length; set train.max_steps (the stream is read again "
                              "from its start when it ends)")
        if cfg.data.eval_split > 0:
            raise ConfigError(f"{key}: data.eval_split needs indexed datasets; give the held-out set as "
                              "data.eval_datasets instead")
    resume = cfg.checkpoint.resume
    if resume not in (None, "auto") and not Path(resume).is_dir():
        raise ConfigError(f"checkpoint.resume: checkpoint folder not found: {resume} {NOT_FOUND_HINT}")
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a folder")


def dump_yaml(cfg: Any, path: str | Path | None = None) -> str:
    """The resolved config as YAML text (written to `path` too when given). Holds no secrets: none are config keys."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
