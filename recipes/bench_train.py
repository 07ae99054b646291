"""LoRA training step, vlft + peft against transformers + peft: same weights, LoRA settings (rank 16 on every linear
layer of the language model), samples, dtype and attention kernel family (sdpa), side by side in one process.

    python recipes/bench_train.py          # CPU: 3B widths and heads, 4 of 36 layers, 2 vision blocks, ~1k tokens
    python recipes/bench_train.py --device cuda              # GPU: the whole 3B model in bf16, 4k-token rows
    python recipes/bench_train.py --device cuda --preset 7B --tokens 16384 --checkpointing

A step is forward, backward and AdamW on chat samples (prompt, one image, question, answer; labels on the answers
only) in three layouts: vlft's packed row (cu_seqlens), transformers' padding-free row (packed position ids, no
mask) and, for both, right padding. On GPU, transformers + peft + Liger Kernel (fused linear cross-entropy, RMSNorm,
SwiGLU, RoPE) runs too when `liger-kernel` imports. Prints the shape, median step times, tokens/s and peak memory
(CUDA allocator peak above the resident weights; on CPU the peak resident memory of a step, each run in its own
spawned process) and the ratios against transformers + peft padding-free. On a GPU it also prints model FLOPs
utilisation (see bench_common.step_flops for what is counted).
"""

from __future__ import annotations

import argparse

import torch

import bench_common
from bench_common import (bench_config, build_vlft, cuda_peak, describe, hf_accepts, hf_random, hf_twin,
                          interleaved_times, make_samples, packed_batch, padded_batch, padding_free_batch, peak_flops,
                          rss_step_peak, spawned, step_flops, to_device, trainable, with_lora)

LAYOUTS = {"packed": packed_batch, "padding-free": padding_free_batch, "padded": padded_batch}


def make_step(model, batch: dict, vlft_side: bool):
    """forward + backward + AdamW on the trainable (LoRA) weights."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    kw = {"return_logits": False} if vlft_side else {}

    def step():
        out = model(**batch, **kw)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def initial_loss(model, batch: dict, vlft_side: bool) -> float:
    with torch.no_grad():
        return float(model(**batch, **({"return_logits": False} if vlft_side else {})).loss)


def _batch(cfg, samples, layout: str, device: str, model, vlft_side: bool) -> dict:
    b = to_device(LAYOUTS[layout](cfg, samples), device, vlft_side)
    if not vlft_side and layout == "padded" and hf_accepts(model, "mm_token_type_ids"):
        b["mm_token_type_ids"] = (b["input_ids"] == cfg.image_token_id).long()
    return b


def _cpu_peak_child(cfg_dict: dict, side: str, layout: str, tokens: int, dtype: str, threads: int,
                    supervise: str) -> float:
    """In a spawned process: build one side with LoRA, return the peak RSS growth (GiB) of its first step."""
    from vlft.model import ModelConfig

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    vlft_side = side == "vlft"
    dt = getattr(torch, dtype)
    base = build_vlft(cfg, dt, "cpu") if vlft_side else hf_random(cfg, dt, "cpu")
    model = with_lora(base, vlft_side)
    samples = make_samples(cfg, tokens, supervise=supervise)
    step = make_step(model, _batch(cfg, samples, layout, "cpu", model, vlft_side), vlft_side)
    return rss_step_peak(step)


RUNS = {  # key: (printed name, side, layout)
    "vlft-packed": ("vlft + peft, packed", "vlft", "packed"),
    "hf-padding-free": ("transformers + peft, padding-free", "hf", "padding-free"),
    "hf-padded": ("transformers + peft, padded", "hf", "padded"),
    "vlft-padded": ("vlft + peft, padded", "vlft", "padded"),
}
REFERENCE = "transformers + peft, padding-free"


def _models(cfg, dtype, device: str, checkpointing: bool, hf_base=None):
    """(vlft + peft, transformers + peft) on the same (shared) weights."""
    base = build_vlft(cfg, dtype, device)
    hf = hf_twin(base, "sdpa")
    if checkpointing:  # activation checkpointing of every decoder layer, on both sides
        base.set_gradient_checkpointing(True)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vl, hf = with_lora(base.train(), True), with_lora(hf.train(), False)
    assert trainable(vl) == trainable(hf), (trainable(vl), trainable(hf))
    return vl, hf


def run(args) -> dict:
    args.runs = args.runs.split(",") if isinstance(args.runs, str) else args.runs
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (5 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    dtype = getattr(torch, args.dtype)
    cfg = bench_config(args.preset, args.layers, args.vision_depth)
    cfg.attn_implementation = "sdpa"
    samples = make_samples(cfg, args.tokens, supervise=args.supervise)
    tokens = sum(len(s.ids) for s in samples)
    labelled = sum(sum(1 for x in s.labels[1:] if x != -100) for s in samples)
    runs = [RUNS[k] for k in args.runs]
    print(describe(cfg, args.preset))
    print(f"batch: {len(samples)} samples, {tokens} tokens ({labelled} supervised: {args.supervise}), images "
          f"{[s.grid for s in samples]}; {args.dtype} on {args.device}, sdpa, torch threads {torch.get_num_threads()}"
          + (", activation checkpointing" if args.checkpointing else ""))
    peaks = {}
    if args.device == "cpu" and not args.no_memory:  # before this process holds any model, one child at a time
        for name, side, layout in runs:
            peaks[name] = spawned(_cpu_peak_child, cfg.to_hf_dict(), side, layout, args.tokens, args.dtype,
                                  torch.get_num_threads(), args.supervise)

    vl, hf = _models(cfg, dtype, args.device, args.checkpointing)
    models = {"vlft": vl, "hf": hf}
    batches = {name: _batch(cfg, samples, layout, args.device, models[side], side == "vlft")
               for name, side, layout in runs}
    # before any update: the same loss from every run shows that they compute the same thing
    losses = {name: initial_loss(models[side], batches[name], side == "vlft") for name, side, _ in runs}
    print("loss at the initial weights: " + "; ".join(f"{name} {v:.6f}" for name, v in losses.items()))
    steps = {name: make_step(models[side], batches[name], side == "vlft") for name, side, _ in runs}
    cpu: dict[str, float] = {}
    times = interleaved_times(steps, args.steps, args.device, warmup=args.warmup,
                              cpu_times=cpu if args.device == "cpu" else None)
    if args.device != "cpu" and not args.no_memory:
        peaks.update({name: cuda_peak(steps[name]) for name, _, _ in runs})
    liger = _liger(hf, cfg, samples, args) if args.device.startswith("cuda") else None
    if liger:
        name, fn = liger
        times.update(interleaved_times({name: fn}, args.steps, args.device, warmup=args.warmup))
        peaks[name] = cuda_peak(fn)
    return _report(cfg, args, samples, times, cpu, peaks, losses)


def _report(cfg, args, samples, times: dict, cpu: dict, peaks: dict, losses: dict) -> dict:
    """Print and return the table; ratios are against transformers padding-free (or the first transformers run),
    on CPU also by CPU time."""
    tokens = sum(len(s.ids) for s in samples)
    flops = step_flops(cfg, samples)
    peak = peak_flops(args.device)
    ref = REFERENCE if REFERENCE in times else next((n for n in times if n.startswith("transformers")), None)
    ref_t, ref_c, ref_m = times.get(ref), cpu.get(ref), peaks.get(ref)
    results: dict = {"shape": describe(cfg, args.preset), "tokens": tokens, "samples": len(samples),
                     "supervised": sum(sum(1 for x in s.labels[1:] if x != -100) for s in samples),
                     "dtype": args.dtype, "device": args.device, "checkpointing": args.checkpointing,
                     "initial_loss": losses, "step_flops": flops, "ratios_against": ref, "runs": {}}
    nan = float("nan")
    print(f"ratios (x) against {ref}")
    print(f"{'':42s} {'step s':>8s} {'tokens/s':>9s} {'peak GiB':>9s} {'time x':>7s} {'memory x':>8s}"
          + (f" {'CPU s':>7s} {'CPU x':>6s}" if cpu else "") + ("   MFU" if peak else ""))
    for name, t in times.items():
        m, c = peaks.get(name), cpu.get(name)
        row = {"step_s": t, "tokens_per_s": tokens / t, "peak_gib": m, "cpu_s": c,
               "time_ratio": t / ref_t if ref_t else None,
               "cpu_time_ratio": c / ref_c if c and ref_c else None,
               "memory_ratio": m / ref_m if m is not None and ref_m else None,
               "mfu": flops / t / peak if peak else None}
        results["runs"][name] = row
        print(f"{name:42s} {t:8.2f} {tokens / t:9.0f} {nan if m is None else m:9.2f} "
              f"{row['time_ratio'] or nan:7.2f} {row['memory_ratio'] or nan:8.2f}"
              + (f" {c:7.2f} {row['cpu_time_ratio'] or nan:6.2f}" if cpu else "")
              + (f" {row['mfu']:6.1%}" if peak else ""))
    packed, padded = times.get(RUNS["vlft-packed"][0]), times.get(RUNS["hf-padded"][0])
    if packed and padded:
        print(f"packing: vlft packed takes {packed / padded:.2f}x the step time of transformers padded")
    return results


def _liger(hf, cfg, samples, args):
    """transformers + peft + Liger Kernel on the same model, when liger-kernel is installed (patched in place, so it
    runs after the plain transformers runs)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl
    except Exception as e:  # noqa: BLE001 - any import failure means: not available here
        print(f"transformers + peft + Liger: not run ({type(e).__name__}: {e})")
        return None
    apply_liger_kernel_to_qwen2_5_vl(model=hf.get_base_model(), fused_linear_cross_entropy=True)
    name = "transformers + peft + Liger, padding-free"
    return name, make_step(hf, _batch(cfg, samples, "padding-free", args.device, hf, False), False)


def parser() -> argparse.ArgumentParser:
    p = bench_common.parser(__doc__)
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per step, whole samples up to this many (default: 4096 on GPU, 1024 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 5 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on GPU, 1 on CPU)")
    p.add_argument("--supervise", default="answers", choices=["answers", "all"],
                   help="labels on the answers only (realistic), or on every text token (the head's work is then "
                        "the same on both sides)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the decoder layers")
    p.add_argument("--runs", default="vlft-packed,hf-padding-free",
                   help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    return p


def main(argv=None) -> dict:
    return bench_common.main(parser(), run, argv)


if __name__ == "__main__":
    main()
