"""QLoRA: the frozen linear layers of vlft's model held in 4 bits (NF4 or FP4) by bitsandbytes.

Which layers: every `nn.Linear` of the language model's decoder layers (`model.layers.N.self_attn.{q,k,v,o}_proj`,
`model.layers.N.mlp.{gate,up,down}_proj`: over 90% of a 7B's weights), and with `vision: true` those of the vision
tower's blocks. The embeddings, lm_head, the norms and the vision merger stay in full precision (as in transformers'
bitsandbytes integration, which keeps the head; the merger is small and often trained in full).

Loading: `load_pretrained(..., after_shard=quantizer)` calls the quantizer after each safetensors shard, and it replaces
every layer whose weights are all loaded, so a large model never exists in full precision in host memory: the peak is
one shard plus the 4-bit layers so far. The replacement `bitsandbytes.nn.Linear4bit` quantizes on the device given
(the GPU in training, so host memory never holds the 4-bit copy either).

LoRA: peft puts its bitsandbytes LoRA layers on `Linear4bit` targets when the model says `is_loaded_in_4bit` (the
attribute transformers sets on quantized models). The LoRA weights stay in float32 and train; the 4-bit weights are
frozen, never saved in checkpoints, and never merged into: `vlft export merged` merges into the original float
base, and inference with `--load-4bit` keeps the LoRA layers unmerged (`attach_adapter`), as in training.

One trap (bitsandbytes 0.50, CPUs with AVX512-BF16): the first eval-mode forward of a `Linear4bit` with an input
that needs no gradient repacks its weight in place for a CPU inference kernel. After that, a training step fails
or silently drops the input gradient, and dequantizing (merge, export of the layer) returns garbage. Every layer made
here has that path turned off (`support_avx512bf16_for_cpu = False`), so training, evaluation and inference behave
the same on every CPU (tests/test_quant.py forces the repacking on any CPU to show the trap and the fix).
"""

from __future__ import annotations

import math
import re
import sys
from typing import Callable

import torch

from vlft.config import ConfigError, QuantizationSection
from vlft.errors import UserError

LANGUAGE_LAYERS = "model.layers."  # every Linear under this prefix is quantized
VISION_LAYERS = "visual.blocks."  # ... and under this one with `vision: true`


def import_bitsandbytes():
    """bitsandbytes, or an error that says how to install it (its import warning on some CPUs is dropped in
    vlft/__init__.py)."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise UserError(f"model.quantization needs the bitsandbytes package ({e}); install vlft with it: "
                        "pip install -e '.[qlora]'") from None
    return bitsandbytes


def is_4bit(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit layer (False whenever bitsandbytes was never imported: nothing can be 4-bit then)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def logical_numel(param: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a packed 4-bit weight holds two per byte."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None else param.numel()


def _prefixes(settings: QuantizationSection) -> tuple[str, ...]:
    return (LANGUAGE_LAYERS, VISION_LAYERS) if settings.vision else (LANGUAGE_LAYERS,)


def to_4bit(linear: torch.nn.Linear, settings: QuantizationSection, device: str | torch.device) -> torch.nn.Module:
    """A frozen `Linear4bit` holding `linear`'s weight quantized on `device` (bias kept in its dtype)."""
    bnb = import_bitsandbytes()
    compute = linear.weight.dtype if settings.compute_dtype == "auto" else getattr(torch, settings.compute_dtype)
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute, compress_statistics=settings.double_quant,
                              quant_type=settings.quant_type, device="meta")
    # the float weight is quantized by the move to `device` (bitsandbytes quantizes a Params4bit on its first .to)
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=settings.double_quant,
                                     quant_type=settings.quant_type, module=layer).to(device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    # the CPU inference repacking described in the module docstring; the attribute exists since bitsandbytes 0.48
    layer.support_avx512bf16_for_cpu = False
    layer.train(linear.training)
    return layer


def quantize_frozen(model: torch.nn.Module, settings: QuantizationSection | None, device: str | torch.device = "cpu"
                    ) -> torch.nn.Module:
    """Replace the loaded linear layers that QLoRA quantizes (see the module docstring) by 4-bit ones, in place;
    layers still on the meta device (not loaded yet) and layers already 4-bit are left. Returns `model`; with
    `settings` None it does nothing. Call before peft wraps the model."""
    if settings is None:
        return model
    prefixes = _prefixes(settings)
    targets = [(name, m) for name, m in model.named_modules()
               if name.startswith(prefixes) and type(m) is torch.nn.Linear
               and not any(p.is_meta for p in m.parameters(recurse=False))]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, to_4bit(linear, settings, device))
    if targets:
        model.is_loaded_in_4bit = True  # peft reads this to put its bitsandbytes LoRA layers on Linear4bit targets
    return model


def frozen_quantizer(settings: QuantizationSection | None, device: str | torch.device = "cpu", zero_stage: int = 0
                     ) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
    """`quantize_frozen` with these settings, for `load_pretrained(after_shard=...)` and for a built model; None
    without settings, so that a plain load passes no `after_shard` (with one, load_pretrained copies every tensor out
    of the file's mapping, which a plain load must not: ranks on a node share the mapped pages). Refuses ZeRO-3 at
    once, before any weight is read."""
    if settings is not None and zero_stage == 3:
        raise ConfigError("model.quantization: DeepSpeed ZeRO-3 would partition the packed 4-bit weights, which "
                          "bitsandbytes cannot use; launch with DDP (launch/accelerate/multi_gpu.yaml) or ZeRO-2 "
                          "(launch/accelerate/zero2.yaml), or set model.quantization=null")
    if settings is None:
        return None
    import_bitsandbytes()  # a missing package fails here, before the model is read
    return lambda model: quantize_frozen(model, settings, device)


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """Names of the 4-bit layers of `model` (peft's wrappers included: their `base_layer`)."""
    return [name for name, m in model.named_modules() if is_4bit(m)]


def check_train_fully(model: torch.nn.Module, train_fully: list[str]) -> None:
    """A module trained in full must not hold 4-bit layers (they are frozen by construction)."""
    quantized = quantized_layers(model)
    for entry in train_fully:
        inside = [n for n in quantized if n == entry or n.startswith(entry + ".")]
        if inside:
            raise ConfigError(f"lora.train_fully: {entry!r} holds 4-bit layers ({inside[0]}, ...) that "
                              "model.quantization keeps frozen; train them with LoRA instead, or set "
                              "model.quantization=null")


# ---------------------------------------------------------------------------------------------- inference
def recorded_settings(base_info: dict | None) -> QuantizationSection:
    """The quantization a checkpoint's run trained with (base_model.json), else the QLoRA defaults (NF4 with double
    quantization): what `--load-4bit` uses."""
    from vlft.config import build

    recorded = (base_info or {}).get("quantization")
    return build(QuantizationSection, recorded, "base_model.json quantization") if recorded else QuantizationSection()


def attach_adapter(model: torch.nn.Module, adapter) -> None:
    """Put a saved adapter (`vlft.lora_merge.Adapter`) on `model` as unmerged peft LoRA layers, which compute
    y = base(x) + s * B(A(x)) exactly as in training on a 4-bit base; fully trained modules are copied in.
    Merging into a 4-bit weight would dequantize it, add the update and quantize again, losing updates smaller than
    the quantization step (about 10% of a weight)."""
    from peft import LoraConfig, inject_adapter_in_model

    from vlft.lora_merge import Adapter, AdapterError, apply_adapter, check_fits

    quantized = set(quantized_layers(model))
    shapes = {n + ".weight": list(model.get_submodule(n).weight.quant_state.shape) for n in quantized}
    shapes.update({n: list(p.shape) for n, p in model.named_parameters() if n not in shapes})
    check_fits(adapter, shapes, "<loaded model>")
    overwritten = [k for k in adapter.full if k.rpartition(".")[0] in quantized]
    if overwritten:
        raise AdapterError(f"{adapter.folder}: {overwritten[0]} was trained in full but is a 4-bit layer with "
                           "--load-4bit; run without --load-4bit (the float base takes it)")
    modules = sorted(adapter.lora)
    if modules:
        # per-module rank and alpha (alpha = scale * rank gives peft's scale alpha / rank, rsLoRA included)
        ranks = {m: adapter.lora[m].A.shape[0] for m in modules}
        config = LoraConfig(
            r=max(ranks.values()), lora_alpha=1.0, lora_dropout=0.0, bias="none", inference_mode=True,
            target_modules="(?:" + "|".join(re.escape(m) for m in modules) + ")",
            rank_pattern={re.escape(m): r for m, r in ranks.items()},
            alpha_pattern={re.escape(m): adapter.lora[m].scale * ranks[m] for m in modules},
            use_dora=any(adapter.lora[m].magnitude is not None for m in modules))
        inject_adapter_in_model(config, model)
        with torch.no_grad():
            for m in modules:
                layer, w = model.get_submodule(m), adapter.lora[m]
                layer.lora_A["default"].weight.copy_(w.A)
                layer.lora_B["default"].weight.copy_(w.B)
                if w.magnitude is not None:
                    layer.lora_magnitude_vector["default"].weight.copy_(w.magnitude)
    if adapter.full:
        apply_adapter(model, Adapter(adapter.folder, adapter.config, {}, adapter.full))
