"""Shared pieces of the side-by-side benchmarks (bench_model, bench_train, bench_generate, gpu_check.py).

- Shapes: a released preset (3B, 7B, ...) cut to fewer text layers and vision blocks, with its full widths, heads and
  vocabulary; `describe` prints what ran.
- Models: vlft's and transformers' Qwen2.5-VL with the same random weights (same init, copied by checkpoint key).
- Batches: synthetic chat samples (prompt text, one image, question, answer) whose labels cover the answers only,
  in three layouts: vlft's packed row (cu_seqlens), transformers' padding-free row (4-row position ids restarting per
  sample, no attention mask) and a right-padded batch for both.
- Measurement: median step time (steps of the compared runs alternate, so both see the same machine load), CUDA
  allocator peak, and on CPU the peak resident memory of a step measured in a *spawned* child process (a fork after
  torch's thread pool has started can deadlock the child).

Imports only torch, transformers, peft and vlft's model code: no data pipeline (datasets, PyAV), no DeepSpeed.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import multiprocessing as mp
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from vlft.model import ModelConfig, build_model, get_rope_index, preset
from vlft.model.weights import to_hub_key

# LoRA targets: every linear layer of the language model's blocks. vlft's spelling is the regex vlft.adapters builds
# from the default vlft.config.LoraSection (a test checks they agree); it is written out here so that the benchmarks
# never import the data pipeline (PIL, PyAV, datasets), which the GPU machines may lack.
LANGUAGE_LORA = {
    "vlft": r"(?:model\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
            r"|model\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj))",
    "hf": r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
}


# ============================================================================= shapes
def bench_config(name: str, layers: int = 0, vision_depth: int = 0, vocab: int = 0) -> ModelConfig:
    """A released preset with `layers` text layers and `vision_depth` vision blocks (0: all). A truncated tower keeps
    at least one full-attention block (its last) so that both kinds of vision attention run."""
    cfg = preset(name)
    if layers:
        cfg.text.num_hidden_layers = layers
    if vision_depth:
        cfg.vision.depth = vision_depth
        kept = [i for i in cfg.vision.fullatt_block_indexes if i < vision_depth]
        cfg.vision.fullatt_block_indexes = kept or [vision_depth - 1]
    if vocab:
        cfg.text.vocab_size = vocab
    return cfg


def describe(cfg: ModelConfig, name: str) -> str:
    """One line: the shape that ran, with the preset's full depth beside the truncated one."""
    t, v, full = cfg.text, cfg.vision, preset(name)
    return (f"{name} shape: text {t.hidden_size} wide, {t.num_hidden_layers} of {full.text.num_hidden_layers} layers, "
            f"{t.num_attention_heads} heads / {t.num_key_value_heads} kv, MLP {t.intermediate_size}, vocabulary "
            f"{t.vocab_size:,}, {'tied' if cfg.tie_word_embeddings else 'untied'} head; vision {v.hidden_size} wide, "
            f"{v.depth} of {full.vision.depth} blocks (full attention at {v.fullatt_block_indexes})")


# ============================================================================= models
def build_vlft(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, dtype=dtype, device=device)


def _hf_skeleton(cfg: ModelConfig, dtype: torch.dtype, device, attn: str):
    """transformers' model with this config, its weights allocated but not initialised where the installed
    transformers allows it (they are overwritten or do not matter)."""
    import contextlib

    from transformers import Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older releases: random initialisation, only slower
        no_init_weights = contextlib.nullcontext
    with torch.device(device), no_init_weights():
        hf = HFModel._from_config(Qwen2_5_VLConfig(**cfg.to_hf_dict()), attn_implementation=attn, dtype=dtype)
    hf.tie_weights()  # skipped with the initialisation
    return hf


def hf_twin(model, attn: str = "sdpa"):
    """transformers' model with the config and weights of a vlft model, on its device and in its dtype. The weights
    are shared, not copied (one copy in memory; each model keeps its own parameters and gradients)."""
    weight = model.lm_head.weight
    hf = _hf_skeleton(model.config, weight.dtype, weight.device, attn)  # untouched pages: no memory used yet
    ours = model.state_dict()
    hf.load_state_dict({k: ours[to_hub_key(k)] for k in hf.state_dict()}, assign=True)
    hf.tie_weights()  # assign=True replaced the tied parameter objects one by one
    return hf


def hf_random(cfg: ModelConfig, dtype: torch.dtype, device: str, attn: str = "sdpa"):
    """transformers' model with this config and small random weights (memory probes: the values do not matter,
    but they stay finite)."""
    hf = _hf_skeleton(cfg, dtype, device, attn)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    return hf


def with_lora(model, vlft_side: bool, rank: int = 16):
    """peft LoRA (rank 16, alpha 32, no dropout) on every linear layer of the language model's blocks."""
    from peft import LoraConfig, get_peft_model

    regex = LANGUAGE_LORA["vlft" if vlft_side else "hf"]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=regex))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ============================================================================= batches
@dataclass
class Sample:
    ids: list[int]
    labels: list[int]
    grid: list[int]  # [t, h, w] of its image, in patches


# 64 to 256 image tokens (224 x 224 to 448 x 448 pixels)
IMAGE_GRIDS = ([1, 16, 16], [1, 16, 24], [1, 24, 24], [1, 24, 32], [1, 32, 32])


def make_samples(cfg: ModelConfig, budget: int, seed: int = 0, grids=IMAGE_GRIDS, supervise: str = "answers"
                 ) -> list[Sample]:
    """Chat samples filling at most `budget` tokens: prompt text, an image, a question, an answer. Labels on the
    answer (`supervise="answers"`, as in training) or on every text token (`"all"`)."""
    rng = random.Random(seed)
    words = min(1000, cfg.bos_token_id)  # ordinary text ids, below every special token
    samples, total, misses = [], 0, 0
    while misses < 50:  # draw until 50 samples in a row do not fit in what is left
        grid = list(rng.choice(grids))
        prompt, question, answer = rng.randint(20, 60), rng.randint(8, 40), rng.randint(30, 200)
        n_img = grid[0] * grid[1] * grid[2] // 4
        n = prompt + 2 + n_img + question + answer
        if total + n > budget:
            misses += 1
            continue
        misses = 0
        text = lambda k: [rng.randrange(words) for _ in range(k)]  # noqa: E731
        ids = (text(prompt) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
               + text(question) + text(answer))
        if supervise == "all":
            labels = [-100 if t == cfg.image_token_id else t for t in ids]
        else:
            labels = [-100] * (n - answer) + ids[n - answer:]
        samples.append(Sample(ids, labels, grid))
        total += n
    if not samples:
        raise ValueError(f"a budget of {budget} tokens holds no sample (the smallest is about 170 tokens)")
    return samples


def _pixels(samples: list[Sample], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = sum(t * h * w for t, h, w in (s.grid for s in samples))
    return torch.randn(rows, 3 * 2 * 14 * 14, generator=g)


def _positions(cfg: ModelConfig, s: Sample) -> torch.Tensor:
    pos, _ = get_rope_index(cfg, torch.tensor([s.ids]), image_grid_thw=torch.tensor([s.grid]))
    return pos[:, 0]  # [3, L]


def packed_batch(cfg: ModelConfig, samples: list[Sample], seed: int = 0) -> dict:
    """vlft's packed row: one row of all samples, positions restarting per sample, cu_seqlens on the host."""
    lengths = [len(s.ids) for s in samples]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return {"input_ids": torch.tensor([sum((s.ids for s in samples), [])]),
            "labels": torch.tensor([sum((s.labels for s in samples), [])]),
            "position_ids": torch.cat([_positions(cfg, s) for s in samples], 1)[:, None],
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "pixel_values": _pixels(samples, seed), "image_grid_thw": torch.tensor([s.grid for s in samples])}


def padding_free_batch(cfg: ModelConfig, samples: list[Sample], seed: int = 0) -> dict:
    """transformers' padding-free row: the same row with 4-row position ids (row 0: text positions restarting per
    sample, from which transformers finds the sample boundaries), no attention mask, no cache."""
    b = packed_batch(cfg, samples, seed)
    text = torch.cat([torch.arange(len(s.ids)) for s in samples])[None, None]
    b["position_ids"] = torch.cat([text, b["position_ids"]], 0)
    # transformers' loss shifts over the whole row: no sample's first token may be the target of the previous sample's
    # last one (what transformers' DataCollatorWithFlattening does too)
    b["labels"][0, b["cu_seqlens"][:-1].long()] = -100
    del b["cu_seqlens"]
    b["use_cache"] = False
    return b


def padded_batch(cfg: ModelConfig, samples: list[Sample], seed: int = 0) -> dict:
    """One row per sample, right-padded to the longest, with an attention mask."""
    L = max(len(s.ids) for s in samples)
    ids = torch.zeros(len(samples), L, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    pos = torch.ones(3, len(samples), L, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.ids)
        ids[i, :n], labels[i, :n], mask[i, :n], pos[:, i, :n] = torch.tensor(s.ids), torch.tensor(s.labels), 1, \
            _positions(cfg, s)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos,
            "pixel_values": _pixels(samples, seed), "image_grid_thw": torch.tensor([s.grid for s in samples])}


HOST = ("image_grid_thw", "cu_seqlens", "labels", "attention_mask")


def to_device(batch: dict, device: str, vlft_side: bool) -> dict:
    """vlft keeps grids, boundaries, labels and mask on the host (as vlft.distributed does); transformers gets every
    tensor on the device, as its users pass them."""
    keep = HOST if vlft_side else ("image_grid_thw",)
    return {k: (v.to(device) if torch.is_tensor(v) and k not in keep else v) for k, v in batch.items()}


def hf_accepts(model, name: str) -> bool:
    fwd = getattr(model, "get_base_model", lambda: model)().forward
    return name in inspect.signature(fwd).parameters


# ============================================================================= measuring
def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(runs: dict[str, Callable[[], None]], steps: int, device: str, warmup: int = 1,
                      cpu_times: dict[str, float] | None = None) -> dict[str, float]:
    """Median wall seconds per call of each run; runs alternate call by call after `warmup` calls each.

    `cpu_times`, when given, receives the median CPU seconds of this process (all threads) per call: on a CPU shared
    with other jobs, wall time mostly measures the others' load, CPU time what each run costs.
    """
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    sync(device)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(steps):
        for name, fn in runs.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    if cpu_times is not None:
        cpu_times.update({k: statistics.median(v) for k, v in cpu.items()})
    return {k: statistics.median(v) for k, v in wall.items()}


def cuda_peak(fn: Callable[[], None]) -> float:
    """GiB allocated above what was resident before `fn` (weights, optimizer state), at the peak of `fn`."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_step_peak(fn: Callable[[], None]) -> float:
    """GiB of resident memory above the level before `fn`, at the peak of `fn` (Linux: the high-water mark is reset
    through /proc/self/clear_refs, so the peak of building the model does not hide the step's)."""
    gc.collect()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (_rss_kib("VmHWM") - before) / 2**20


# In the memory probes, glibc hands every allocation of 128 KiB or more straight back to the system when it is freed:
# the resident size then follows the live tensors, and a measurement does not depend on what ran before it.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def spawned(fn: Callable, *args):
    """fn(*args) in a fresh spawned process (never fork: a forked child of a process whose torch thread pool has
    started can deadlock), with PROBE_ENV set; fn must be a module-level function of an importable module."""
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in PROBE_ENV}
    os.environ.update(PROBE_ENV)
    try:
        with ctx.Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ============================================================================= model FLOPs
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks, FLOP/s


def peak_flops(device: str) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def step_flops(cfg: ModelConfig, samples: list[Sample], weight_grads: bool = False) -> float:
    """Model FLOPs of one training step on these samples (multiply-add = 2), the work the step must do:

    - text layers: forward 2N per token and 2N for the input gradients; 2N more for weight gradients when the weights
      train (`weight_grads`, full fine-tuning) and not with LoRA, whose frozen base weights get none; causal attention
      inside each sample (forward 2 * H * D * s^2 per layer, backward twice that);
    - head: only the supervised tokens need logits (forward and input gradient, 4 * hidden * vocab each);
    - vision tower (frozen, forward only): 2N per patch plus window / full attention per segment.
    """
    t, v = cfg.text, cfg.vision
    per_layer = 2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * t.num_key_value_heads * t.head_dim \
        + 3 * t.hidden_size * t.intermediate_size
    tokens = sum(len(s.ids) for s in samples)
    labelled = sum(sum(1 for x in s.labels[1:] if x != -100) for s in samples)
    passes = 6 if weight_grads else 4
    flops = passes * per_layer * t.num_hidden_layers * tokens
    flops += 3 * t.num_hidden_layers * 2 * t.hidden_size * sum(len(s.ids) ** 2 for s in samples)
    flops += (passes if weight_grads else 4) * t.hidden_size * t.vocab_size * labelled
    from vlft.model.vision_index import full_cu_seqlens, window_index

    grids = [s.grid for s in samples]
    patches = sum(a * b * c for a, b, c in grids)
    vis_block = 4 * v.hidden_size * v.hidden_size + 3 * v.hidden_size * v.intermediate_size
    merger = (4 * v.hidden_size) ** 2 + 4 * v.hidden_size * v.out_hidden_size
    flops += 2 * (v.depth * vis_block * patches + merger * patches // 4)
    cells = v.window_size // v.spatial_merge_size // v.patch_size
    windows = window_index(grids, v.spatial_merge_size, cells)[1]
    for cu, blocks in ((full_cu_seqlens(grids), len(v.fullatt_block_indexes)),
                       (windows, v.depth - len(v.fullatt_block_indexes))):
        flops += blocks * 4 * v.hidden_size * sum((b - a) ** 2 for a, b in zip(cu[:-1], cu[1:]))
    return float(flops)


# ============================================================================= command line
def parser(doc: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: device, dtype, shape, JSON output."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--preset", default="3B")
    p.add_argument("--layers", type=int, default=None, help="text layers (0: all; default: all on GPU, 4 on CPU)")
    p.add_argument("--vision-depth", type=int, default=None,
                   help="vision blocks (0: all; default: all on GPU, 2 on CPU)")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p


def main(p: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict], argv=None) -> dict:
    """Parse, fill the device-dependent defaults (the GPU runs the full model, the CPU a truncated one), run, and
    write the JSON."""
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.layers = args.layers if args.layers is not None else (0 if gpu else 4)
    args.vision_depth = args.vision_depth if args.vision_depth is not None else (0 if gpu else 2)
    if getattr(args, "tokens", 0) is None:
        args.tokens = 4096 if gpu else 1024
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results
