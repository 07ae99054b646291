"""LoRA per part: every option takes effect, targets that match nothing fail, frozen parts stay frozen."""

from __future__ import annotations

import pytest
import torch

from vlft.adapters import apply_lora, part_of, target_regex, trainable_report
from vlft.config import ConfigError, ExperimentConfig, build
from vlft.optim import lr_factor, param_groups


def _cfg(**lora) -> ExperimentConfig:
    freeze = {"vision": not lora.get("vision"), "merger": not (lora.get("merger") or lora.get("train_fully"))}
    return build(ExperimentConfig, {"model": {"path": "preset:tiny"}, "lora": lora, "freeze": freeze})


def _wrap(**lora):
    from vlft.model import build_model, preset

    torch.manual_seed(0)
    return apply_lora(build_model(preset("tiny")), _cfg(**lora))


def _count(model, part=None) -> int:
    report = trainable_report(model)
    return sum(r["trainable"] for p, r in report.items() if part in (None, p))


def test_rank_and_targets_change_the_trainable_count():
    base = _count(_wrap(rank=4))
    assert _count(_wrap(rank=8)) == 2 * base
    assert _count(_wrap(rank=4, language_mlp=[])) < base
    with_vision = _wrap(rank=4, vision=["attn.qkv", "mlp.down_proj"])
    assert _count(with_vision, "vision") > 0 and _count(_wrap(rank=4), "vision") == 0
    # a vision suffix must not catch the language model's module of the same name
    names = [n for n, p in with_vision.named_parameters() if p.requires_grad and "down_proj" in n]
    assert names and all(part_of(n) == "vision" or "model.layers" in n for n in names)
    # tiny merger mlp.0 maps 4 merged patches x 64 = 256 features to 256: rank 4 adds 4 * (256 + 256)
    assert _count(_wrap(rank=4, merger=["mlp.0"]), "merger") == 4 * (256 + 256)


def test_dora_and_rslora_change_the_modules():
    plain, dora = _wrap(rank=4), _wrap(rank=4, use_dora=True)
    assert not any("lora_magnitude_vector" in n for n, _ in plain.named_parameters())
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    plain_q, rs_q = dict(plain.named_modules())[q], dict(_wrap(rank=4, alpha=8, use_rslora=True).named_modules())[q]
    assert plain_q.scaling["default"] == pytest.approx(32 / 4)  # alpha / r, with the default alpha 32
    assert rs_q.scaling["default"] == pytest.approx(8 / 4 ** 0.5)


def test_dropout_is_passed_through():
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert isinstance(dict(_wrap(rank=4).named_modules())[q].lora_dropout["default"], torch.nn.Identity)
    assert dict(_wrap(rank=4, dropout=0.1).named_modules())[q].lora_dropout["default"].p == 0.1


def test_train_fully_and_frozen_parts():
    model = _wrap(rank=4, train_fully=["visual.merger"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("visual.merger.modules_to_save" in n for n in trainable)
    assert not any(("lm_head" in n or "embed_tokens" in n or "norm" in n) and "merger" not in n for n in trainable)
    assert not any(part_of(n) == "vision" for n in trainable)
    with pytest.raises(ConfigError, match="freeze.language"):
        cfg = build(ExperimentConfig, {"model": {"path": "preset:tiny"}, "lora": {"train_fully": ["lm_head"]},
                                       "freeze": {"language": True}})
        cfg.lora.language_attention, cfg.lora.language_mlp, cfg.lora.vision = [], [], ["attn.qkv"]
        cfg.freeze.vision = False
        from vlft.model import build_model, preset

        apply_lora(build_model(preset("tiny")), cfg)


def test_target_that_matches_nothing_fails():
    with pytest.raises(ConfigError, match="lora.language_attention.*qq_proj"):
        _wrap(rank=4, language_attention=["qq_proj"])
    with pytest.raises(ConfigError, match="lora.train_fully"):
        _wrap(rank=4, train_fully=["visual.mergr"])
    assert target_regex(_cfg(language_attention=[], language_mlp=[]).lora) is None


def test_param_groups_per_part_lr_and_schedule():
    from vlft.config import OptimSection

    model = _wrap(rank=4, vision=["attn.qkv"], train_fully=["visual.merger"])
    groups = param_groups(model, OptimSection(lr=1e-4, vision_lr=2e-5, merger_lr=5e-5, weight_decay=0.1))
    lrs = {(g["part"], g["weight_decay"] > 0): g["lr"] for g in groups}
    assert lrs[("language", True)] == 1e-4 and lrs[("vision", True)] == 2e-5 and lrs[("merger", True)] == 5e-5
    assert lrs[("merger", False)] == 5e-5  # merger biases and norm: no weight decay
    assert [round(lr_factor(s, 2, 10, "cosine", 0.0), 4) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_factor(2, 2, 10, "linear", 0.1) == 1.0 and lr_factor(6, 2, 10, "linear", 0.1) == pytest.approx(0.55)
