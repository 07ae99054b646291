"""Forward + backward of vlft's Qwen2.5-VL against transformers' with the same config, weights and inputs.

Runs both side by side in one process (interleaved, so machine load hits both alike) and prints the ratio of median
step times and of peak memory. On CUDA, peak memory is `torch.cuda.max_memory_allocated`; on CPU it is the peak of
live tensor bytes allocated during the step, from the profiler's allocation events.

    python recipes/bench_model.py                       # CPU, fp32, sdpa, a small model (about 420 tokens)
    python recipes/bench_model.py --device cuda --dtype bfloat16 --preset 3B --layers 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen2_5_VLConfig
from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

from vlft.model import ModelConfig, TextConfig, VisionConfig, build_model, preset
from vlft.model.weights import to_hub_key


def bench_config(args) -> ModelConfig:
    if args.preset:
        cfg = preset(args.preset)
        if args.layers:
            cfg.text.num_hidden_layers = args.layers
        if args.vision_depth:
            cfg.vision.depth = args.vision_depth
            cfg.vision.fullatt_block_indexes = [i for i in cfg.vision.fullatt_block_indexes if i < args.vision_depth]
        return cfg
    return ModelConfig(
        vision=VisionConfig(depth=8, hidden_size=320, intermediate_size=640, num_heads=4, fullatt_block_indexes=[3, 7],
                            out_hidden_size=512),
        text=TextConfig(vocab_size=args.vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, mrope_section=[8, 12, 12]),
        tie_word_embeddings=False,
    )


def make_inputs(cfg: ModelConfig, device, text_tokens: int, image_hw=(16, 22), video_thw=(2, 16, 16)):
    g = torch.Generator().manual_seed(0)
    img_n = image_hw[0] * image_hw[1] // 4
    vid_n = video_thw[0] * video_thw[1] * video_thw[2] // 4
    half = text_tokens // 2
    ids = (torch.randint(0, 1000, (half,), generator=g).tolist()
           + [cfg.vision_start_token_id] + [cfg.image_token_id] * img_n + [cfg.vision_end_token_id]
           + torch.randint(0, 1000, (text_tokens - half,), generator=g).tolist()
           + [cfg.vision_start_token_id] + [cfg.video_token_id] * vid_n + [cfg.vision_end_token_id])
    ids = torch.tensor([ids])
    width = 3 * 2 * 14 * 14
    inp = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(4 * img_n, width, generator=g), image_grid_thw=torch.tensor([[1, *image_hw]]),
        pixel_values_videos=torch.randn(4 * vid_n, width, generator=g), video_grid_thw=torch.tensor([list(video_thw)]),
        second_per_grid_ts=torch.tensor([1.0]),
    )
    labels = ids.clone()
    labels[(ids == cfg.image_token_id) | (ids == cfg.video_token_id)] = -100
    inp["labels"] = labels
    out = {k: (v.to(device) if k not in ("image_grid_thw", "video_grid_thw") else v) for k, v in inp.items()}
    mm = torch.zeros_like(ids)
    mm[ids == cfg.image_token_id] = 1
    mm[ids == cfg.video_token_id] = 2
    return out, mm.to(device)


def step_fn(model, inputs):
    def run():
        out = model(**inputs)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def cpu_peak_bytes(fn) -> int:
    """Peak of live tensor bytes allocated while fn runs (allocation/free events in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.profiler.function_events, key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(fn)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--preset", default=None, help="3B/7B/... shapes instead of the small default")
    p.add_argument("--layers", type=int, default=0, help="text layers (with --preset)")
    p.add_argument("--vision-depth", type=int, default=0, help="vision blocks (with --preset)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--text-tokens", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    cfg = bench_config(args)
    cfg.attn_implementation = args.attn
    ours = build_model(cfg, dtype=dtype, device=device).train()
    hf = HFModel._from_config(Qwen2_5_VLConfig(**cfg.to_hf_dict()), attn_implementation=args.attn, dtype=dtype)
    sd = ours.state_dict()
    hf.load_state_dict({k: sd[to_hub_key(k)] for k in hf.state_dict()})
    hf = hf.to(device).train()
    inputs, mm = make_inputs(cfg, device, args.text_tokens)
    n_tokens = inputs["input_ids"].shape[1]

    runs = {
        "transformers": step_fn(hf, {**inputs, "mm_token_type_ids": mm}),
        "vlft": step_fn(ours, inputs),
        "vlft chunked loss": step_fn(ours, {**inputs, "return_logits": False}),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    peaks = {name: peak_bytes(fn, device) for name, fn in runs.items()}

    ref_t, ref_m = statistics.median(times["transformers"]), peaks["transformers"]
    print(f"forward+backward, {n_tokens} tokens (image {inputs['image_grid_thw'].tolist()}, video "
          f"{inputs['video_grid_thw'].tolist()}), {args.dtype}, {args.attn}, {device}, torch threads "
          f"{torch.get_num_threads()}, {args.reps} reps")
    print(f"{'':20s} {'median s':>9s} {'time ratio':>10s} {'peak MiB':>9s} {'mem ratio':>9s}")
    for name in runs:
        t = statistics.median(times[name])
        print(f"{name:20s} {t:9.4f} {t / ref_t:10.2f} {peaks[name] / 2**20:9.1f} {peaks[name] / ref_m:9.2f}")


if __name__ == "__main__":
    main()
