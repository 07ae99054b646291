"""QLoRA (vlft/quant.py): the language model's linear layers in 4 bits through bitsandbytes, LoRA on them through
peft, the recipe training and resuming on them, export merging into the float base, inference on a 4-bit base.

The NF4 reference below is built from the QLoRA paper's definition (Dettmers et al. 2023: quantiles of a standard
normal, 8 positive and 7 negative levels plus an exact zero, scaled to [-1, 1], one absmax scale per block of 64), not
from bitsandbytes' table, so the per-layer error is checked against an independent quantizer.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from model_fixtures import media_inputs
from test_train_helpers import launch, run_in_process, train_losses, workspace
from vlft.adapters import apply_lora, trainable_report
from vlft.config import (ConfigError, ExperimentConfig, FreezeSection, LoraSection, QuantizationSection,
                         apply_overrides, build)
from vlft.model import build_model, preset
from vlft.quant import frozen_quantizer, import_bitsandbytes, is_4bit, quantize_frozen, quantized_layers

bnb = import_bitsandbytes()
STEPS, SAVED = 20, 10
DECODER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(preset("tiny"))


def dequantized(layer) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def nf4_reference(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 quantize-dequantize by the paper's definition (see the module docstring), and where a weight sits on a
    decision boundary (within 1e-5 of the midpoint of two levels), where either level is a correct rounding."""
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)  # the paper's delta: the outermost quantile that stays finite
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    code = (code / code.max()).float()
    blocks = w.reshape(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    normed = blocks / absmax
    idx = (normed[..., None] - code).abs().argmin(-1)
    tie = ((normed[..., None] - (code[1:] + code[:-1]) / 2).abs() < 1e-5).any(-1)
    return (code[idx] * absmax).reshape(w.shape), tie.reshape(w.shape)


# ============================================================================= settings and layers
def test_quantization_settings_are_strict_and_named():
    def cfg(**q):
        return build(ExperimentConfig, {"model": {"path": "preset:tiny", "quantization": q}})

    assert build(ExperimentConfig, {"model": {"path": "preset:tiny"}}).model.quantization is None
    on_command_line = apply_overrides({}, ["model.quantization.quant_type=fp4"])
    assert build(ExperimentConfig, on_command_line).model.quantization.quant_type == "fp4"
    assert cfg().model.quantization == QuantizationSection(bits=4, quant_type="nf4", double_quant=True,
                                                           compute_dtype="auto", vision=False)
    for bad, key in (({"quant_type": "nf5"}, "model.quantization.quant_type"), ({"bits": 8}, "model.quantization.bits"),
                     ({"blocksize": 64}, "model.quantization.blocksize"),
                     ({"compute_dtype": "int8"}, "model.quantization.compute_dtype")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            cfg(**bad)
    with pytest.raises(ConfigError, match=r"model\.quantization.*ZeRO-3"):
        frozen_quantizer(QuantizationSection(), "cpu", zero_stage=3)
    # no quantization: ZeRO-3 is fine, and there is no after_shard hook (load_pretrained copies tensors out of the
    # file's mapping when given one)
    assert frozen_quantizer(None, "cpu", zero_stage=3) is None


def test_quantized_layers_are_the_decoder_linears():
    model = tiny()
    before = trainable_report(model)
    quantize_frozen(model, QuantizationSection())
    n_layers = model.config.text.num_hidden_layers
    assert quantized_layers(model) == [f"model.layers.{i}.{s}" for i in range(n_layers) for s in DECODER]
    assert model.is_loaded_in_4bit
    assert not is_4bit(model.lm_head) and not is_4bit(model.visual.merger.mlp[0])
    for name in quantized_layers(model):
        layer = model.get_submodule(name)
        assert layer.support_avx512bf16_for_cpu is False  # the CPU repacking trap is off (see the trap test)
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant
        assert layer.in_features * layer.out_features % 64 == 0  # whole 64-blocks: tiny's dims suit bitsandbytes
    # the parameter report counts the weights a 4-bit layer stands for, not its packed bytes
    assert {part: row["total"] for part, row in trainable_report(model).items()} == \
        {part: row["total"] for part, row in before.items()}
    with_vision = quantize_frozen(tiny(), QuantizationSection(vision=True))
    vision = [n for n in quantized_layers(with_vision) if n.startswith("visual.")]
    assert len(vision) == 5 * model.config.vision.depth and not any("merger" in n for n in vision)


def test_each_layer_within_the_nf4_error_of_the_float_layer():
    model = tiny()
    exact = quantize_frozen(copy.deepcopy(model), QuantizationSection(double_quant=False))
    double = quantize_frozen(copy.deepcopy(model), QuantizationSection())
    fp4 = quantize_frozen(copy.deepcopy(model), QuantizationSection(quant_type="fp4"))
    g = torch.Generator().manual_seed(1)
    for name in quantized_layers(exact):
        w = model.get_submodule(name).weight.detach()
        ref, tie = nf4_reference(w)
        assert tie.float().mean() < 1e-3  # 1 weight in 32,768 sits on a boundary in this model
        # bitsandbytes' NF4 is the paper's NF4; double quantization only rounds the block scales to 8 bits
        torch.testing.assert_close(dequantized(exact.get_submodule(name))[~tie], ref[~tie], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(dequantized(double.get_submodule(name))[~tie], ref[~tie], atol=2e-3, rtol=0.02)
        x = torch.randn(16, w.shape[1], generator=g)
        with torch.no_grad():
            ref = model.get_submodule(name)(x)
            errors = {kind: ((m.get_submodule(name)(x) - ref).norm() / ref.norm()).item()
                      for kind, m in (("nf4", double), ("fp4", fp4))}
        assert 0.05 < errors["nf4"] < 0.12, (name, errors)  # about 0.09 measured on every layer
        assert errors["nf4"] < errors["fp4"] < 0.16, (name, errors)  # NF4 fits normal weights better than FP4


# ============================================================================= the CPU repacking trap
def test_eval_forward_then_train_step_then_merge_on_the_same_layers():
    """The sequence that trips bitsandbytes' CPU repacking (module docstring of vlft/quant.py), on a layer with a
    bias (q_proj) and one without (o_proj); then the control: the same forward with the repacking left on changes
    the stored weight on any CPU, so this test would see the trap come back."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(quantize_frozen(tiny(), QuantizationSection()),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["layers.0.self_attn.q_proj",
                                                                         "layers.0.self_attn.o_proj"],
                                      init_lora_weights=False))  # random B: the LoRA path is not zero
    g = torch.Generator().manual_seed(2)
    for name in ("q_proj", "o_proj"):
        layer = model.base_model.model.model.layers[0].self_attn.get_submodule(name)
        base, A, B = layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        W0 = dequantized(base).clone()
        bias = base.bias.detach() if base.bias is not None else 0.0
        effective = W0 + (B @ A).detach() * s
        x = torch.randn(5, base.in_features, generator=g)

        model.eval()
        with torch.no_grad():
            y_eval = layer(x)
        assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        torch.testing.assert_close(y_eval, x @ effective.T + bias, atol=1e-5, rtol=1e-4)

        model.train()
        xg = x.clone().requires_grad_(True)
        upstream = torch.randn(5, base.out_features, generator=g)
        (layer(xg) * upstream).sum().backward()
        torch.testing.assert_close(xg.grad, upstream @ effective, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(B.grad, s * upstream.T @ (x @ A.detach().T), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(A.grad, s * (B.detach().T @ upstream.T) @ x, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dequantized(base), W0, atol=0, rtol=0)  # the stored weight never changed

        layer.merge()  # peft's 4-bit merge: dequantize, add s*B@A, quantize again
        expected = bnb.functional.quantize_4bit(effective, quant_type="nf4", compress_statistics=True)
        torch.testing.assert_close(dequantized(layer.base_layer),
                                   bnb.functional.dequantize_4bit(*expected).float(), atol=1e-6, rtol=0)

    control = quantize_frozen(tiny(), QuantizationSection()).model.layers[1].self_attn.q_proj
    W0 = dequantized(control).clone()
    control.support_avx512bf16_for_cpu = True
    control.eval()
    with torch.no_grad():
        control(torch.randn(3, control.in_features))
    assert control.weight.quant_state.packing_format_for_cpu
    assert not torch.allclose(dequantized(control), W0)


# ============================================================================= LoRA on the 4-bit base
def test_only_lora_and_trained_modules_get_gradients_with_and_without_checkpointing():
    cfg = ExperimentConfig(lora=LoraSection(rank=4, alpha=8, vision=["attn.qkv"], train_fully=["visual.merger"]),
                           freeze=FreezeSection(vision=False, merger=False))
    model = apply_lora(quantize_frozen(tiny(), QuantizationSection()), cfg)
    batch = media_inputs(model.config, [[3, ("image", (1, 4, 4)), 5], [2, ("video", (2, 4, 4)), 4]])
    batch.pop("mm_token_type_ids")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.base_model.model.set_gradient_checkpointing(text=checkpointing, vision=checkpointing)
        model.train()
        model(**batch, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(plain) == trainable
    assert all(".lora_" in n or ".merger.modules_to_save." in n for n in trainable)
    assert all(g.abs().sum() > 0 for n, g in plain.items() if "lora_A" not in n)  # B starts at zero: A gets none yet
    assert any("layers.1.mlp.down_proj.lora_B" in n for n in plain)  # LoRA on a 4-bit layer trains
    checkpointed = grads(True)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"lora\.train_fully.*4-bit"):
        apply_lora(quantize_frozen(tiny(), QuantizationSection()),
                   ExperimentConfig(lora=LoraSection(train_fully=["model.layers.0.mlp"])))


@pytest.mark.parametrize("options", [{"use_dora": True}, {"use_rslora": True, "rank_pattern": {"q_proj": 2}}],
                         ids=["dora", "rslora-ranks"])
def test_attach_adapter_equals_peft_on_a_4bit_base(tmp_path, options):
    """`--load-4bit` puts a saved adapter on the 4-bit base as peft would load it: per-module ranks and scales, DoRA
    magnitudes, the fully trained merger."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from vlft.lora_merge import load_adapter
    from vlft.quant import attach_adapter

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "attn.qkv"],
                        modules_to_save=["visual.merger"], init_lora_weights=False, **options)
    trained = get_peft_model(quantize_frozen(tiny(), QuantizationSection()), config)
    with torch.no_grad():
        trained.base_model.model.visual.merger.modules_to_save["default"].mlp[0].weight.mul_(1.5)
    trained.save_pretrained(str(tmp_path))
    ours = quantize_frozen(tiny(), QuantizationSection())
    attach_adapter(ours, load_adapter(tmp_path))
    reference = PeftModel.from_pretrained(quantize_frozen(tiny(), QuantizationSection()), str(tmp_path)).eval()
    batch = media_inputs(ours.config, [[3, ("image", (1, 4, 4)), 5]])
    batch.pop("mm_token_type_ids")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)
        bare = quantize_frozen(tiny(), QuantizationSection()).eval()
        assert not torch.allclose(ours(**batch).logits, bare(**batch).logits, atol=1e-3)  # the adapter is on


# ============================================================================= the recipe, export, inference
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    path, _ = workspace(root, ["text", "image"] * 8, model={"quantization": {}},
                        train={"max_steps": STEPS}, checkpoint={"every": SAVED, "keep_last": 0})
    return root, path, run_in_process(path)


def test_qlora_run_learns_and_resumes_exactly(qlora_run):
    root, path, result = qlora_run
    losses = result["losses"]
    assert len(losses) == STEPS and losses[-1] < 0.85 * losses[0]  # 5.82 -> 4.49 measured
    resumed = run_in_process(path, f"checkpoint.resume={root / 'out' / f'checkpoint-{SAVED:07d}'}",
                             f"train.output_dir={root / 'resumed'}")
    assert resumed["losses"] == losses[SAVED:]


def test_checkpoint_holds_only_the_adapter_and_records_the_quantized_base(qlora_run):
    root, _, result = qlora_run
    ckpt = root / "out" / f"checkpoint-{STEPS:07d}"
    keys = load_file(str(ckpt / "adapter_model.safetensors"))
    assert keys and all(".lora_" in k or ".merger." in k for k in keys)  # no 4-bit weight, no quantization state
    assert all(t.dtype == torch.float32 for t in keys.values())
    base = json.loads((ckpt / "base_model.json").read_text())
    assert base["path"] == "preset:tiny" and base["quantization"]["quant_type"] == "nf4"


def test_export_merges_into_the_float_base(qlora_run, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

    from vlft.export import ExportError, export_merged

    root, _, _ = qlora_run
    ckpt = root / "out" / f"checkpoint-{STEPS:07d}"
    export_merged(str(ckpt), str(tmp_path / "merged"))  # base: preset:tiny from base_model.json, rebuilt in float
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    reference = PeftModel.from_pretrained(tiny(), str(ckpt)).merge_and_unload().state_dict()  # float base + adapter
    assert set(merged) == set(reference)
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) < 1e-5
    hf, info = HFModel.from_pretrained(str(tmp_path / "merged"), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.arange(10, 60).reshape(2, 25)
    vlft_merged = tiny()
    vlft_merged.load_state_dict(reference)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, vlft_merged(ids).logits, atol=1e-4, rtol=1e-4)

    quantized_base = tmp_path / "bnb-base"  # a checkpoint saved with quantized weights is refused as a base
    from vlft.model import save_pretrained

    save_pretrained(tiny(), quantized_base)
    config = json.loads((quantized_base / "config.json").read_text())
    (quantized_base / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))
    with pytest.raises(ExportError, match="quantized weights"):
        export_merged(str(ckpt), str(tmp_path / "other"), base=str(quantized_base))


def test_load_4bit_runs_the_adapter_as_trained(qlora_run, tmp_path):
    from peft import PeftModel

    from vlft.evaluate import main as evaluate
    from vlft.generate import load_for_inference, main

    root, path, _ = qlora_run
    ckpt = root / "out" / f"checkpoint-{STEPS:07d}"
    model, *_ = load_for_inference(None, str(ckpt), dtype="fp32", device="cpu", load_4bit=True)
    assert len(quantized_layers(model)) == 14
    trained = PeftModel.from_pretrained(quantize_frozen(tiny(), QuantizationSection()), str(ckpt)).eval()
    merged_float, *_ = load_for_inference(None, str(ckpt), dtype="fp32", device="cpu")
    ids = torch.arange(10, 60).reshape(2, 25)
    with torch.no_grad():
        ours, reference, float_logits = model(ids).logits, trained(ids).logits, merged_float(ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, float_logits, atol=1e-3)  # the flag did quantize
    assert main(["--adapter", str(ckpt), "--load-4bit", "--device", "cpu", "--prompt", "hi",
                 "--max-new-tokens", "3"]) == 0  # the command's plumbing (the tiny model's text is arbitrary)
    losses = {}
    for flags in (["--load-4bit"], []):
        out = tmp_path / f"eval{len(flags)}"
        assert evaluate([str(path), "data.eval_split=0.25", "--checkpoint", str(ckpt), *flags, "--no-generate",
                         "--limit", "4", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["samples"] == 4
        losses[bool(flags)] = summary["loss"]
    assert losses[True] != pytest.approx(losses[False], abs=1e-4)  # eval ran the 4-bit base


@pytest.mark.slow
def test_qlora_ddp_two_processes_equals_one_process(tmp_path):
    """Two CPU processes (gloo DDP) with one micro-batch each per step train exactly as one process that
    accumulates the same two micro-batches."""
    path, cfg = workspace(tmp_path, ["text", "image"] * 8, model={"quantization": {}}, train={"max_steps": 4})
    single = run_in_process(path)["losses"]
    ddp_cfg = dict(cfg, train={**cfg["train"], "gradient_accumulation": 1, "output_dir": str(tmp_path / "ddp")})
    ddp_path = tmp_path / "ddp.yaml"
    ddp_path.write_text(yaml.safe_dump(ddp_cfg))
    launch("recipes/sft.py", ddp_path)
    assert train_losses(tmp_path / "ddp") == pytest.approx(single, abs=1e-5)


def test_bitsandbytes_runs_without_the_kernels_package():
    """The `kernels` package downloads compiled code from a model hub: it must not be installed, and the warning
    bitsandbytes logs about its absence is dropped (vlft/__init__.py)."""
    import importlib.util
    import logging

    assert importlib.util.find_spec("kernels") is None
    record = logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 0,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s", ("x",), None)
    assert not logging.getLogger("bitsandbytes.backends.cpu.ops").filter(record)
