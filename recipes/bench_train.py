"""Training-step benchmark: vlft + peft against transformers + peft, same weights, LoRA settings and batch, side by
side in one process (steps alternate, so both see the same machine load). A step is forward, backward and AdamW.

    python recipes/bench_train.py                                  # CPU: 4k tokens, vocabulary 151,936, small model
    python recipes/bench_train.py --packing                        # packed mix of lengths vs transformers' padding
    python recipes/bench_train.py --device cuda --preset 3b --layers 8 --dtype bfloat16 --seq 8192   # 3B-shaped

Prints step time, tokens/s and peak memory for both and the ratios (vlft / transformers). Peak memory is the CUDA
allocator peak on GPU; on CPU each side's first steps run in a forked child and report the growth of its peak RSS.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import tempfile
import time

import torch


def _build(args):
    from vlft.model import build_model, preset, save_pretrained

    cfg = preset(args.preset)
    if args.layers:
        cfg.text.num_hidden_layers = args.layers
        cfg.vision.depth = min(cfg.vision.depth, args.layers)
        cfg.vision.fullatt_block_indexes = [i for i in cfg.vision.fullatt_block_indexes if i < cfg.vision.depth]
    if args.hidden:
        cfg.text.hidden_size, cfg.text.intermediate_size = args.hidden, args.hidden * 4
        cfg.text.num_attention_heads, cfg.text.num_key_value_heads = max(2, args.hidden // 128), 2
        cfg.text.mrope_section = [(args.hidden // cfg.text.num_attention_heads // 2) // 4] * 2
        half = args.hidden // cfg.text.num_attention_heads // 2
        cfg.text.mrope_section.insert(0, half - 2 * cfg.text.mrope_section[0])
        cfg.vision.out_hidden_size = args.hidden
    cfg.text.vocab_size = args.vocab
    torch.manual_seed(0)
    model = build_model(cfg, dtype=getattr(torch, args.dtype), device=args.device)
    folder = tempfile.mkdtemp(prefix="vlft-bench-")
    save_pretrained(model, folder)
    return model, folder


def _hf_model(folder, args):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, args.dtype),
                                                              attn_implementation="sdpa").to(args.device)


def _lora(model, regex):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=regex))


def _batches(args, vocab):
    """(vlft batch, transformers batch, tokens): one 4k row, or a packed row vs the same samples padded."""
    g = torch.Generator().manual_seed(0)
    if not args.packing:
        ids = torch.randint(0, vocab - 1000, (1, args.seq), generator=g)
        b = {"input_ids": ids.to(args.device), "labels": ids.to(args.device)}
        return b, dict(b, attention_mask=torch.ones_like(b["input_ids"])), args.seq
    rng = random.Random(0)
    lengths, total = [], 0
    while True:  # a realistic mix: mostly short chats, some long documents
        n = rng.choice([rng.randint(64, 512)] * 3 + [rng.randint(512, 2048)])
        if total + n > args.seq:
            break
        lengths.append(n)
        total += n
    samples = [torch.randint(0, vocab - 1000, (n,), generator=g) for n in lengths]
    packed = torch.cat(samples)[None]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None, None].expand(3, 1, -1).contiguous()
    vl = {"input_ids": packed.to(args.device), "labels": packed.to(args.device), "cu_seqlens": cu,
          "position_ids": pos.to(args.device)}
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(samples):
        ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(s)] = s, 1, s
    hf = {"input_ids": ids.to(args.device), "attention_mask": mask.to(args.device), "labels": labels.to(args.device)}
    return vl, hf, total


def _step(model, opt, batch, vlft: bool):
    if vlft:
        out = model(**batch, return_logits=False)
    else:
        out = model(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_peak(fn) -> float:
    """Peak RSS growth (GiB) of running `fn` in a forked child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        os.write(w, str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before).encode())
        os._exit(0)
    os.close(w)
    value = os.read(r, 64)
    os.waitpid(pid, 0)
    return int(value or 0) / 2**20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256, help="text width (0: the preset's)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--packing", action="store_true")
    args = p.parse_args(argv)

    from vlft.adapters import target_regex
    from vlft.config import LoraSection

    base, folder = _build(args)
    vl = _lora(base, target_regex(LoraSection()))
    hf = _lora(_hf_model(folder, args), r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|"
                                         r"mlp\.(gate_proj|up_proj|down_proj))")
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(vl) == count(hf), (count(vl), count(hf))
    vb, hb, tokens = _batches(args, args.vocab)
    opts = {name: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-5)
            for name, m in (("vlft", vl), ("hf", hf))}
    runs = {"vlft": lambda: _step(vl, opts["vlft"], vb, True), "hf": lambda: _step(hf, opts["hf"], hb, False)}
    peak = {}
    if args.device == "cpu":
        for name, fn in runs.items():
            peak[name] = _cpu_peak(lambda fn=fn: [fn() for _ in range(2)])
    times: dict[str, list[float]] = {"vlft": [], "hf": []}
    for name, fn in runs.items():  # warm-up
        fn()
    for _ in range(args.steps):
        for name, fn in runs.items():
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()  # both models, optimizer states: not this step's
            _sync(args.device)
            t0 = time.perf_counter()
            fn()
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
            if args.device == "cuda":
                peak[name] = max(peak.get(name, 0.0), (torch.cuda.max_memory_allocated() - resident) / 2**30)
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {args.device}  dtype {args.dtype}  layers {args.layers}  vocab {args.vocab}  tokens/step {tokens}"
          f"  packing {args.packing}  LoRA params {count(vl):,}")
    for name in ("vlft", "hf"):
        print(f"  {name:<5} step {t[name] * 1000:9.1f} ms  {tokens / t[name]:10.0f} tokens/s  "
              f"peak {peak[name]:.2f} GiB")
    if args.device == "cuda":  # model FLOPs utilisation against the bf16 dense peak of an H100/H200 (989 TFLOP/s)
        c = base.config.text
        per_layer = 4 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim \
            + 3 * c.hidden_size * c.intermediate_size
        n = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
        # LoRA: forward 2N and input gradients 2N per token (frozen weights get no weight gradient), plus causal
        # attention scores and values forward and backward (one row of args.seq tokens; not counted when packing)
        attention = 0 if args.packing else 6 * c.num_hidden_layers * c.hidden_size * tokens * args.seq / 2
        flops = 4 * n * tokens + attention
        for name in ("vlft", "hf"):
            print(f"  {name:<5} model FLOPs utilisation {flops / t[name] / 989e12:.1%} (4N per token + attention)")
    print(f"  ratios vlft/transformers: step time {t['vlft'] / t['hf']:.2f}x  tokens/s {t['hf'] / t['vlft']:.2f}x  "
          f"peak memory {peak['vlft'] / max(peak['hf'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
