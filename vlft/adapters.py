"""peft LoRA on vlft's model, with targets and freezing expressed per part.

Parts: `language_attention` (model.layers.N.self_attn.*), `language_mlp` (model.layers.N.mlp.*), `vision`
(visual.patch_embed, visual.blocks.N.*) and `merger` (visual.merger.*); embeddings, final norm and lm_head belong to
the language model. The LoRA targets of all parts become one regular expression over full module names (peft
full-matches a string `target_modules`), so a suffix such as `mlp.gate_proj` in the vision list never catches the
language model's `mlp.gate_proj`. Every suffix must match at least one Linear module, or the run stops naming it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from vlft.config import ConfigError, ExperimentConfig, LoraSection
from vlft.lora_merge import PARTS, part_of
from vlft.quant import check_train_fully, logical_numel

# Where each part's blocks live; a target suffix is appended to one of these prefixes.
PART_PREFIXES = {
    "language_attention": r"model\.layers\.\d+\.self_attn\.",
    "language_mlp": r"model\.layers\.\d+\.mlp\.",
    "vision": r"visual\.blocks\.\d+\.",
    "merger": r"visual\.merger\.",
}


def target_regex(lora: LoraSection) -> str | None:
    """One regex that full-matches exactly the targeted module names; None when no part has targets."""
    alternatives = []
    for part, prefix in PART_PREFIXES.items():
        suffixes = getattr(lora, part)
        if suffixes:
            alternatives.append(prefix + "(?:" + "|".join(re.escape(s) for s in suffixes) + ")")
    return "(?:" + "|".join(alternatives) + ")" if alternatives else None


def check_targets(model: torch.nn.Module, lora: LoraSection) -> None:
    """Fail naming the config key when a target suffix or a `train_fully` module matches nothing."""
    names = {name: module for name, module in model.named_modules()}
    for part, prefix in PART_PREFIXES.items():
        for suffix in getattr(lora, part):
            pattern = re.compile(prefix + re.escape(suffix))
            hits = [n for n in names if pattern.fullmatch(n)]
            if not hits:
                raise ConfigError(f"lora.{part}: target {suffix!r} matches no module of the model")
            not_linear = [n for n in hits if not isinstance(names[n], torch.nn.Linear)]
            if not_linear:
                raise ConfigError(f"lora.{part}: target {suffix!r} matches {not_linear[0]}, "
                                  "which is not a Linear layer")
    for full in lora.train_fully:
        if full not in names:
            raise ConfigError(f"lora.train_fully: {full!r} is not a module name of the model (e.g. visual.merger)")


def lora_config(lora: LoraSection) -> LoraConfig:
    """The peft LoraConfig for these settings; every option is passed through as given (dropout 0.0 stays 0.0)."""
    regex = target_regex(lora)
    if regex is None:
        raise ConfigError("lora: no targets in any part (language_attention, language_mlp, vision, merger)")
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=regex,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=list(lora.train_fully) or None,
        bias="none",
    )


def apply_lora(model: torch.nn.Module, cfg: ExperimentConfig) -> PeftModel:
    """Wrap `model` with LoRA per `cfg.lora`, then check that nothing in a frozen part is trainable.

    peft freezes every base weight (lm_head and embeddings included); only LoRA weights, DoRA magnitudes and the
    copies of `train_fully` modules train. The check after wrapping catches a `train_fully` entry inside a frozen part.
    """
    check_targets(model, cfg.lora)
    check_train_fully(model, cfg.lora.train_fully)  # no 4-bit layer inside a fully trained module (QLoRA)
    peft_model = get_peft_model(model, lora_config(cfg.lora))
    frozen = {"language": cfg.freeze.language, "vision": cfg.freeze.vision, "merger": cfg.freeze.merger}
    for name, param in peft_model.named_parameters():
        if param.requires_grad and frozen[part_of(name)]:
            raise ConfigError(f"freeze.{part_of(name)} is true but {name} would train (check lora.train_fully)")
    return peft_model


def trainable_report(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per part (counts the elements DeepSpeed ZeRO-3 may have partitioned)."""
    report = {part: {"trainable": 0, "total": 0} for part in PARTS}
    for name, param in model.named_parameters():
        if ".original_module." in name:  # peft keeps the frozen original next to a fully trained copy
            continue
        n = int(getattr(param, "ds_numel", logical_numel(param)))
        row = report[part_of(name)]
        row["total"] += n
        if param.requires_grad:
            row["trainable"] += n
    return report


def format_report(report: dict[str, dict[str, Any]]) -> str:
    lines = ["trainable parameters per part:"]
    all_t = sum(r["trainable"] for r in report.values())
    all_n = sum(r["total"] for r in report.values())
    for part, r in list(report.items()) + [("all", {"trainable": all_t, "total": all_n})]:
        pct = 100.0 * r["trainable"] / max(r["total"], 1)
        lines.append(f"  {part:<9} {r['trainable']:>14,} / {r['total']:>15,}  ({pct:.3f}%)")
    return "\n".join(lines)
