"""Model forward and forward+backward (every weight trained), vlft against transformers: same config, weights,
samples, dtype and attention kernel family (sdpa), side by side in one process.

    python recipes/bench_model.py          # CPU: 3B widths and heads, 4 of 36 layers, 2 vision blocks, ~1k tokens
    python recipes/bench_model.py --device cuda              # GPU: the whole 3B model in bf16, a 4k-token row

The batch is chat samples with images and answer-only labels in one row: vlft packed (cu_seqlens) against
transformers padding-free (packed position ids). vlft computes its loss chunk by chunk over the supervised tokens
(`return_logits=False`, what training uses); transformers builds the full logits. Prints the shape, median times,
peak memory (CUDA allocator peak; on CPU the peak resident memory of a step in a spawned process) and the ratios.
"""

from __future__ import annotations

import argparse

import torch

import bench_common
from bench_common import (bench_config, build_vlft, cuda_peak, describe, hf_random, hf_twin, interleaved_times,
                          make_samples, packed_batch, padding_free_batch, peak_flops, rss_step_peak, spawned,
                          step_flops, to_device)

SIDES = {"vlft": ("vlft, packed", packed_batch), "hf": ("transformers, padding-free", padding_free_batch)}
MODES = {"forward": False, "forward+backward": True}  # what is timed, and whether it runs backward


def make_call(model, batch: dict, vlft_side: bool, backward: bool):
    kw = {"return_logits": False} if vlft_side else {}

    def call():
        if backward:
            model(**batch, **kw).loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(**batch, **kw)
    return call


def _cpu_peak_child(cfg_dict: dict, side: str, tokens: int, dtype: str, threads: int) -> dict[str, float]:
    """In a spawned process: the peak RSS growth (GiB) of a forward, then of a forward+backward, of one side."""
    from vlft.model import ModelConfig

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    dt = getattr(torch, dtype)
    model = (build_vlft(cfg, dt, "cpu") if side == "vlft" else hf_random(cfg, dt, "cpu")).train()
    batch = to_device(SIDES[side][1](cfg, make_samples(cfg, tokens)), "cpu", side == "vlft")
    return {what: rss_step_peak(make_call(model, batch, side == "vlft", backward))
            for what, backward in MODES.items()}


def run(args) -> dict:
    dtype = getattr(torch, args.dtype)
    cfg = bench_config(args.preset, args.layers, args.vision_depth)
    samples = make_samples(cfg, args.tokens)
    tokens = sum(len(s.ids) for s in samples)
    print(describe(cfg, args.preset))
    print(f"batch: {len(samples)} samples in one row, {tokens} tokens, images {[s.grid for s in samples]}; "
          f"{args.dtype} on {args.device}, sdpa, torch threads {torch.get_num_threads()}")
    mem: dict[str, dict] = {what: {} for what in MODES}
    if args.device == "cpu" and not args.no_memory:  # before this process holds any model, one child at a time
        for side in SIDES:
            peaks = spawned(_cpu_peak_child, cfg.to_hf_dict(), side, args.tokens, args.dtype, torch.get_num_threads())
            for what in MODES:
                mem[what][side] = peaks[what]
    ours = build_vlft(cfg, dtype, args.device).train()
    models = {"vlft": ours, "hf": hf_twin(ours, "sdpa").train()}
    batches = {side: to_device(make(cfg, samples), args.device, side == "vlft") for side, (_, make) in SIDES.items()}
    results: dict = {"shape": describe(cfg, args.preset), "tokens": tokens, "dtype": args.dtype,
                     "device": args.device, "runs": {}}
    peak = peak_flops(args.device)
    nan = float("nan")
    for what, backward in MODES.items():
        calls = {side: make_call(models[side], batches[side], side == "vlft", backward) for side in SIDES}
        cpu: dict[str, float] = {}
        times = interleaved_times(calls, args.reps, args.device, cpu_times=cpu if args.device == "cpu" else None)
        if args.device != "cpu" and not args.no_memory:
            mem[what] = {side: cuda_peak(calls[side]) for side in SIDES}
        m = mem[what]
        flops = step_flops(cfg, samples, weight_grads=True) if backward else None
        print(f"{what}:")
        for side, (name, _) in SIDES.items():
            row = {"s": times[side], "tokens_per_s": tokens / times[side], "peak_gib": m.get(side),
                   "time_ratio": times[side] / times["hf"], "cpu_s": cpu.get(side),
                   "cpu_time_ratio": cpu[side] / cpu["hf"] if cpu else None,
                   "memory_ratio": m[side] / m["hf"] if m else None,
                   "mfu": flops / times[side] / peak if peak and flops else None}
            results["runs"][f"{what}, {name}"] = row
            print(f"  {name:28s} {row['s']:8.3f} s {row['tokens_per_s']:9.0f} tokens/s  peak "
                  f"{m.get(side, nan):6.2f} GiB  time {row['time_ratio']:.2f}x  memory "
                  f"{row['memory_ratio'] or nan:.2f}x" + (f"  CPU time {row['cpu_time_ratio']:.2f}x" if cpu else "")
                  + (f"  MFU {row['mfu']:.1%}" if row["mfu"] else ""))
    return results


def parser() -> argparse.ArgumentParser:
    p = bench_common.parser(__doc__)
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens in the row, whole samples up to this many (default: 4096 on GPU, 1024 on CPU)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions of each (after one warm-up)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    return p


def main(argv=None) -> dict:
    return bench_common.main(parser(), run, argv)


if __name__ == "__main__":
    main()
