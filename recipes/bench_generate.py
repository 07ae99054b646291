"""Inference: `vlft.generate` against transformers' `generate` on the same prompts, weights and dtype (greedy, sdpa).

    python recipes/bench_generate.py                       # CPU: 3B widths, 4 of 36 layers, 2 vision blocks
    python recipes/bench_generate.py --device cuda --batch 8   # GPU: the whole 3B model in bf16

A batch of chat prompts (text, one image, a question), left-padded, each continued by --new-tokens tokens (no stop
token, so both produce the same number). Prints time to first token (prefill and one token), the decoding rate of
the remaining tokens, the total time, their ratios (vlft / transformers), and whether the tokens are identical.
"""

from __future__ import annotations

import argparse

import torch

import bench_common
from bench_common import (bench_config, build_vlft, describe, hf_accepts, hf_twin, interleaved_times, make_samples,
                          sync)


def prompts(cfg, batch: int, seed: int = 0) -> dict:
    """`batch` prompts (the samples' text and image, answers cut off), left-padded."""
    from vlft.generate import left_pad

    samples = []
    while len(samples) < batch:
        samples += make_samples(cfg, 600, seed=seed + len(samples))
    rows = []
    for s in samples[:batch]:
        prompt = [t for t, lab in zip(s.ids, s.labels) if lab == -100]  # everything but the answer
        g = torch.Generator().manual_seed(len(rows))
        rows.append({"input_ids": torch.tensor(prompt), "image_grid_thw": torch.tensor([s.grid]),
                     "pixel_values": torch.randn(s.grid[0] * s.grid[1] * s.grid[2], 1176, generator=g)})
    return left_pad(rows, cfg.bos_token_id)


def run(args) -> dict:
    from vlft.generate import generate

    dtype = getattr(torch, args.dtype)
    cfg = bench_config(args.preset, args.layers, args.vision_depth)
    model = build_vlft(cfg, dtype, args.device).eval()
    hf = hf_twin(model, "sdpa").eval()
    hf.generation_config.eos_token_id = None  # exactly --new-tokens tokens on both sides
    batch = {k: (v if k == "image_grid_thw" else v.to(args.device)) for k, v in prompts(cfg, args.batch).items()}
    hf_batch = dict(batch)
    if hf_accepts(hf, "mm_token_type_ids"):
        hf_batch["mm_token_type_ids"] = (batch["input_ids"] == cfg.image_token_id).long()
    L = batch["input_ids"].shape[1]
    print(describe(cfg, args.preset))
    print(f"prompts: {args.batch} x up to {L} tokens (left-padded), images {batch['image_grid_thw'].tolist()}; "
          f"{args.new_tokens} new tokens each; {args.dtype} on {args.device}, sdpa, greedy, torch threads "
          f"{torch.get_num_threads()}")

    out = {}

    def ours(n):
        def f():
            with torch.no_grad():
                out["vlft", n] = generate(model, **batch, max_new_tokens=n, eos_token_id=None,
                                          pad_token_id=cfg.bos_token_id)
        return f

    def theirs(n):
        def f():
            with torch.no_grad():
                o = hf.generate(**hf_batch, max_new_tokens=n, do_sample=False,
                                pad_token_id=cfg.bos_token_id, temperature=None, top_p=None, top_k=None)
            out["hf", n] = o[:, L:]
        return f

    n = args.new_tokens
    cpu: dict[str, float] = {}
    t = interleaved_times({"vlft first": ours(1), "hf first": theirs(1), "vlft all": ours(n), "hf all": theirs(n)},
                          args.reps, args.device, cpu_times=cpu if args.device == "cpu" else None)
    sync(args.device)
    same = torch.equal(out["vlft", n], out["hf", n])
    rows = {}
    for side, name in (("vlft", "vlft generate"), ("hf", "transformers generate")):
        decode = args.batch * (n - 1) / max(t[f"{side} all"] - t[f"{side} first"], 1e-9)
        rows[name] = {"first_token_s": t[f"{side} first"], "total_s": t[f"{side} all"], "decode_tokens_per_s": decode,
                      "total_cpu_s": cpu.get(f"{side} all")}
    a, b = rows["vlft generate"], rows["transformers generate"]
    print(f"{'':22s} {'first token s':>13s} {'decode tok/s':>12s} {'total s':>8s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['first_token_s']:13.3f} {r['decode_tokens_per_s']:12.1f} {r['total_s']:8.3f}")
    ratios = {"first_token": a["first_token_s"] / b["first_token_s"], "total": a["total_s"] / b["total_s"],
              "decode_rate": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
              "total_cpu": a["total_cpu_s"] / b["total_cpu_s"] if cpu else None}
    print(f"ratios vlft/transformers: first token {ratios['first_token']:.2f}x time, total {ratios['total']:.2f}x "
          f"time" + (f" ({ratios['total_cpu']:.2f}x CPU time)" if cpu else "")
          + f", decoding {ratios['decode_rate']:.2f}x tokens/s; identical tokens: {same}")
    return {"shape": describe(cfg, args.preset), "batch": args.batch, "prompt_len": L, "new_tokens": n,
            "dtype": args.dtype, "device": args.device, "runs": rows, "ratios": ratios, "identical": same}


def parser() -> argparse.ArgumentParser:
    p = bench_common.parser(__doc__)
    p.add_argument("--batch", type=int, default=2, help="prompts per batch")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="timed repetitions (after one warm-up)")
    return p


def main(argv=None) -> dict:
    return bench_common.main(parser(), run, argv)


if __name__ == "__main__":
    main()
