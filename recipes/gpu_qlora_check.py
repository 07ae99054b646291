"""QLoRA on a GPU: bitsandbytes' CUDA kernels on vlft's layers, then the memory and speed of a 7B-shaped QLoRA training
step next to the same step with a bf16 base. Writes OUT/qlora.json and prints a summary; exits 1 when a check fails.

    python3 recipes/gpu_qlora_check.py --out gpu_out                  # on a CUDA machine with bitsandbytes
    python3 recipes/gpu_qlora_check.py --device cpu --preset tiny --tokens 256 --image-tokens 64 --out /tmp/q   # smoke

Sections:
- layers: the tiny model's decoder layers quantized on the GPU hold the same NF4 codes as quantized on the CPU (which
  tests/test_quant.py checks against the paper's NF4), stay within the NF4 error of the float layers in bf16, and the
  one-token inference kernel (generation's path) agrees with the batched one; a QLoRA forward and backward on the GPU
  gives finite gradients to LoRA only.
- step: a random 7B-shaped model (Qwen2.5-VL-7B's sizes, vision tower included), LoRA r16 on every language-model
  linear layer, text gradient checkpointing, torch AdamW, one 4,096-token row holding one image (1,008 tokens):
  peak GPU memory of a step (weights included; target 12 GiB for QLoRA) and tokens/s, for the 4-bit (NF4, double
  quantization, bf16 compute) and the bf16 base.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from vlft.adapters import apply_lora
from vlft.config import ExperimentConfig, LoraSection, QuantizationSection
from vlft.model import build_model, preset
from vlft.quant import import_bitsandbytes, quantize_frozen, quantized_layers

TARGET_GIB = 12.0


def check_layers(device: str) -> dict:
    bnb = import_bitsandbytes()
    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # the weights both devices quantize
    on_cpu = quantize_frozen(copy.deepcopy(bf16), QuantizationSection())
    on_gpu = quantize_frozen(bf16, QuantizationSection(), device)
    worst_codes, worst_error, worst_gemv = 0.0, 0.0, 0.0
    for name in quantized_layers(on_cpu):
        a, b = on_cpu.get_submodule(name), on_gpu.get_submodule(name)
        da = bnb.functional.dequantize_4bit(a.weight.data, a.weight.quant_state).float()
        db = bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state).float().cpu()
        # the same NF4 codes (up to a weight lying on a decision boundary, where either rounding is right)
        worst_codes = max(worst_codes, ((da - db).abs() > 1e-2 * da.abs().max()).float().mean().item())
        x = torch.randn(8, a.in_features)
        with torch.no_grad():
            ref = model.get_submodule(name)(x)
            got = b(x.to(device, torch.bfloat16)).float().cpu()
            one = b(x[:1].to(device, torch.bfloat16)).float().cpu()  # one token: bitsandbytes' inference kernel
        worst_error = max(worst_error, ((got - ref).norm() / ref.norm()).item())
        worst_gemv = max(worst_gemv, ((one - got[:1]).norm() / got[:1].norm()).item())
    qlora = apply_lora(quantize_frozen(build_model(preset("tiny")).to(torch.bfloat16), QuantizationSection(), device)
                       .to(device), ExperimentConfig(lora=LoraSection(rank=4, alpha=8)))
    ids = torch.randint(0, 256, (2, 64), device=device)
    qlora.train()
    loss = qlora(input_ids=ids, labels=ids, return_logits=False).loss
    loss.backward()
    with_grad = {n for n, p in qlora.named_parameters() if p.grad is not None}
    trainable = {n for n, p in qlora.named_parameters() if p.requires_grad}
    grads_ok = with_grad == trainable and all(torch.isfinite(p.grad).all() for p in qlora.parameters()
                                              if p.grad is not None)
    checks = {"codes_differ_fraction": worst_codes, "max_relative_error_bf16": worst_error,
              "one_token_vs_batched": worst_gemv, "loss": loss.item(), "lora_grads_only_and_finite": grads_ok}
    checks["ok"] = bool(worst_codes < 1e-3 and worst_error < 0.13 and worst_gemv < 2e-2 and grads_ok
                        and torch.isfinite(loss).item())
    return checks


def step_model(args, quantized: bool):
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32, device=args.device)
    if quantized:
        model = quantize_frozen(model, QuantizationSection(), args.device)
    model.set_gradient_checkpointing(text=True, vision=False)
    model = apply_lora(model, ExperimentConfig(lora=LoraSection(rank=16, alpha=32)))
    return model, cfg


def batch(args, cfg) -> dict:
    """One row: an image of `image_tokens` merged tokens (1,008: a 56 x 72 patch grid) in the middle of text, labels
    on the text."""
    n_img = args.image_tokens
    a = max(d for d in range(1, math.isqrt(n_img) + 1) if n_img % d == 0)  # merged rows; 2x2 patches per token
    grid = (1, 2 * a, 2 * (n_img // a))
    text = args.tokens - n_img - 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.bos_token_id, (text,), generator=g)  # the special tokens start at <|endoftext|>
    image = torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id])
    input_ids = torch.cat([ids[: text // 2], image, ids[text // 2:]])[None]
    labels = input_ids.masked_fill(input_ids >= cfg.vision_start_token_id, -100)
    dev = args.device
    width = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    return {"input_ids": input_ids.to(dev), "labels": labels.to(dev), "image_grid_thw": torch.tensor([grid]),
            "pixel_values": torch.randn(grid[0] * grid[1] * grid[2], width, generator=g).to(dev, dtype)}


def measure_step(args, quantized: bool) -> dict:
    model, cfg = step_model(args, quantized)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    b = batch(args, cfg)
    times, peak, resident = [], 0.0, 0.0
    for i in range(args.steps + 1):  # the first step allocates the optimizer state and warms the kernels up
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model(**b, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
        if i:
            times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        resident = torch.cuda.memory_allocated() / 2**30  # weights, LoRA and optimizer state between steps
    step = statistics.median(times)
    result = {"quantized_layers": len(quantized_layers(model)), "tokens": int(b["input_ids"].numel()),
              "step_s": step, "tokens_per_s": b["input_ids"].numel() / step, "peak_gib": peak,
              "resident_gib": resident, "loss": out.loss.item()}
    del model, opt, out
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="7B")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--image-tokens", type=int, default=1008)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="gpu_out")
    p.add_argument("--json", help="write the report here instead of OUT/qlora.json (recipes/gpu_check.py does)")
    args = p.parse_args(argv)
    bnb = import_bitsandbytes()
    report = {"torch": torch.__version__, "bitsandbytes": bnb.__version__,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "shape": f"{args.preset}, {args.tokens} tokens ({args.image_tokens} image), LoRA r16 on all language "
                       "linears, text gradient checkpointing"}
    report["layers"] = check_layers(args.device)
    print("layers:", json.dumps(report["layers"]), flush=True)
    for name, quantized in (("qlora", True), ("bf16_lora", False)):
        report[name] = measure_step(args, quantized)
        print(f"{name}:", json.dumps(report[name]), flush=True)
    q, f = report["qlora"], report["bf16_lora"]
    report["qlora"]["within_target"] = args.device != "cuda" or q["peak_gib"] <= TARGET_GIB
    report["ratios"] = {"peak_memory_qlora_over_bf16": q["peak_gib"] / max(f["peak_gib"], 1e-9),
                        "tokens_per_s_qlora_over_bf16": q["tokens_per_s"] / f["tokens_per_s"]}
    path = Path(args.json) if args.json else Path(args.out) / "qlora.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"QLoRA {args.preset}: peak {q['peak_gib']:.2f} GiB (target {TARGET_GIB}), {q['tokens_per_s']:.0f} tokens/s; "
          f"bf16 LoRA: peak {f['peak_gib']:.2f} GiB, {f['tokens_per_s']:.0f} tokens/s")
    return 0 if report["layers"]["ok"] and report["qlora"]["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
