"""`vlft demo [--out DIR] [--quick]`: the main job out of the box, on a CPU, with nothing downloaded.

Reads in the order it runs:
  1. write the task (vlft/demo/task.py): PNG pictures and mp4 videos, train and held-out splits, messages jsonl
  2. make the base model: a tiny random Qwen2.5-VL and a tiny tokenizer with Qwen's special tokens, saved as an HF folder
  3. evaluate the base model on the held-out split (exact match of greedy answers, per question kind)
  4. `vlft train configs/demo.yaml ...` (LoRA on language and vision, merger and final norm trained fully)
  5. evaluate the trained checkpoint, and again with every video frame replaced by the first (time kinds)
  6. `vlft export merged`, reload the export with transformers and answer the same questions
  7. summary table, summary.json and loss_curve.png in the output folder

Every step goes through the commands and functions a user gets: vlft.data for media and prompts, recipes/sft.py for
training, vlft.export for the merge, vlft.generate for decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vlft.demo import task

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
EVAL_BATCH = 32
MAX_NEW_TOKENS = 4  # an answer is one word token and <|im_end|>; more would only show a model that rambles

# The demo's learning targets (checked and reported, see `verdict`).
PICTURE_TARGET, TIME_TARGET, FROZEN_DROP, FROZEN_CEILING = 90.0, 80.0, 40.0, 50.0


# ---------------------------------------------------------------------------------------------------- 1. task
def check_sizes(data_cfg) -> None:
    """The task is drawn to the patch grid; a config that resizes its pictures or videos would undo that."""
    want = {"min_pixels": task.IMAGE_PIXELS, "max_pixels": task.IMAGE_PIXELS,
            "video_min_pixels": task.VIDEO_PIXELS, "video_max_pixels": task.VIDEO_PIXELS,
            "video_fps": float(task.VIDEO_FPS), "video_min_frames": task.VIDEO_FRAMES,
            "video_max_frames": task.VIDEO_FRAMES}
    wrong = {k: getattr(data_cfg, k) for k, v in want.items() if getattr(data_cfg, k) != v}
    if wrong:
        raise ValueError("the demo config's data section must keep the task's sizes: "
                         + ", ".join(f"data.{k} is {v}, expected {want[k]}" for k, v in wrong.items()))


# ---------------------------------------------------------------------------------------------------- 2. base model
def make_base(folder: Path, seed: int, data_cfg) -> None:
    """A random tiny Qwen2.5-VL (preset "tiny": text 128 wide, vision 64 wide, 320-token vocabulary) with the tiny
    tokenizer, whose task words are single tokens, and the processor files of the demo's pixel limits."""
    from vlft.checkpoint import write_inference_files
    from vlft.data.tiny_tokenizer import build_tiny_tokenizer
    from vlft.model import build_model, preset, save_pretrained

    tokenizer = build_tiny_tokenizer(folder, task.vocabulary())
    config = preset("tiny")
    if len(tokenizer) > config.text.vocab_size:
        raise ValueError(f"the tiny tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                         f"{config.text.vocab_size}")
    torch.manual_seed(seed)
    model = build_model(config)
    save_pretrained(model, folder)
    write_inference_files(folder, tokenizer, data_cfg, config, str(folder))


# ---------------------------------------------------------------------------------------------------- 3/5. evaluation
def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prompts(records: list[dict], root: Path, tokenizer, limits, tokens_per_second: float) -> list[dict]:
    """The user turn of each record as a prompt ready for vlft.generate.left_pad (the training template)."""
    from vlft.data import MediaResolver, to_messages
    from vlft.generate import encode_prompt

    resolve = MediaResolver(root)
    out = []
    for r in records:
        messages = [m for m in to_messages(r, "messages", resolve) if m.role != "assistant"]
        out.append(encode_prompt(messages, tokenizer, limits, tokens_per_second))
    return out


def decode(tokenizer, rows: torch.Tensor, stop: list[int]) -> list[str]:
    answers = []
    for row in rows.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def answer(model, tokenizer, batch_prompts: list[dict], stop: list[int], hf: bool = False) -> list[str]:
    """Greedy answers of vlft's model (vlft.generate) or of a transformers model (its own generate), up to a stop
    token (vlft.generate.stop_ids)."""
    from vlft.generate import generate, left_pad

    pad = tokenizer.pad_token_id
    out = []
    for i in range(0, len(batch_prompts), EVAL_BATCH):
        batch = left_pad(batch_prompts[i:i + EVAL_BATCH], pad)
        with torch.no_grad():
            if hf:
                full = model.generate(**batch, mm_token_type_ids=mm_token_types(batch["input_ids"], model.config),
                                      max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stop,
                                      pad_token_id=pad)
                new = full[:, batch["input_ids"].shape[1]:]
            else:
                new = generate(model, **batch, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stop, pad_token_id=pad)
        out += decode(tokenizer, new, stop)
    return out


def mm_token_types(input_ids: torch.Tensor, hf_config) -> torch.Tensor:
    """What transformers' processor adds as `mm_token_type_ids` (0 text, 1 image, 2 video token). transformers v5
    computes Qwen2.5-VL's 3D positions only when it is given; without it every token gets a 1D position."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == hf_config.image_token_id] = 1
    types[input_ids == hf_config.video_token_id] = 2
    return types


def accuracy(records: list[dict], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy in percent per question kind."""
    hits: dict[str, list[bool]] = {}
    for r, a in zip(records, answers):
        hits.setdefault(r["kind"], []).append(a == r["messages"][-1]["content"])
    return {k: round(100.0 * sum(v) / len(v), 1) for k, v in hits.items()}


# ---------------------------------------------------------------------------------------------------- 4. training
def train_overrides(out: Path, steps: int | None, processes: int) -> list[str]:
    """`section.key=value` settings that point configs/demo.yaml at this output folder (values are JSON, which YAML
    reads, so any path is safe)."""
    j = json.dumps
    o = [f"model.path={j(str(out / 'base'))}", f"data.tokenizer={j(str(out / 'base'))}",
         f"data.datasets=[{{\"path\": {j(str(out / 'data' / 'train.jsonl'))}}}]",
         f"data.eval_datasets=[{{\"path\": {j(str(out / 'data' / 'heldout.jsonl'))}}}]",
         f"train.output_dir={j(str(out / 'train'))}"]
    if steps is not None:
        o.append(f"train.max_steps={steps}")
        if steps < 100:  # a short run logs every step, so its loss curve has points
            o.append("train.log_every=1")
    if processes > 1:
        o.append(f"train.micro_batch_size={_per_rank_batch(out, processes)}")
    return o


def _per_rank_batch(out: Path, processes: int) -> int:
    from vlft.config import load_experiment

    total = load_experiment(out / "config.yaml").train.micro_batch_size
    if total % processes:
        raise ValueError(f"train.micro_batch_size {total} does not split over {processes} processes")
    return total // processes  # the same global batch, so the same steps learn the same thing


def run_training(config: Path, overrides: list[str], processes: int) -> None:
    if processes == 1:
        from vlft.train_cli import main as train_main

        print(f"$ vlft train {config} {' '.join(overrides)}", flush=True)
        if train_main([str(config), *overrides]) != 0:
            raise RuntimeError("vlft train failed")
        return
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "accelerate" / "cpu.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(free_port()), str(REPO / "recipes" / "sft.py"), str(config), *overrides]
    print("$ accelerate launch --config_file launch/accelerate/cpu.yaml --num_processes "
          f"{processes} recipes/sft.py {config} {' '.join(overrides)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, env=env)


def free_port() -> int:
    """A port nobody listens on now: two launches at once on one machine must not share the rendezvous port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_history(train_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, evals = [], []
    for line in (train_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            (evals if r.get("split") == "eval" else train).append((r["step"], r["loss"]))
    return train, evals


def plot_losses(train_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_history(train_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([s for s, _ in train], [v for _, v in train], lw=1, label="train (per step)")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o", label="held-out")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_title("vlft demo: LoRA on a tiny Qwen2.5-VL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- 7. summary
def verdict(kinds: list[str], before, after, frozen, agree: bool) -> dict[str, bool]:
    """The demo's targets, each as a named pass/fail."""
    checks = {}
    for k in kinds:
        needs, ch = task.KINDS[k][1], 100 * task.chance(k)
        checks[f"{k}: before training at or below chance ({ch:.0f}%)"] = before[k] <= ch + 10
        target = PICTURE_TARGET if needs == "picture" else TIME_TARGET
        checks[f"{k}: after training >= {target:.0f}%"] = after[k] >= target
        if needs == "time":
            checks[f"{k}: frozen frames drop >= {FROZEN_DROP:.0f} points and end < {FROZEN_CEILING:.0f}%"] = (
                after[k] - frozen[k] >= FROZEN_DROP and frozen[k] < FROZEN_CEILING)
    checks["merged export reloaded in transformers gives the same answers"] = agree
    return checks


def table(kinds: list[str], before, after, frozen) -> str:
    rows = [f"{'kind':<8} {'needs':<8} {'chance':>6} {'before':>7} {'after':>7} {'frozen':>7}"]
    for k in kinds:
        fz = f"{frozen[k]:6.1f}%" if k in frozen else f"{'-':>7}"
        rows.append(f"{k:<8} {task.KINDS[k][1]:<8} {100 * task.chance(k):5.0f}% {before[k]:6.1f}% {after[k]:6.1f}% "
                    f"{fz}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vlft demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); a folder made by an earlier demo is replaced, "
                    "any other non-empty folder is refused")
    ap.add_argument("--quick", action="store_true", help="a smoke run in about a minute: little data, few steps "
                                                        "(shows the path works, not that the model learns)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default configs/demo.yaml)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the task data and of the base model")
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--kinds", default=",".join(task.DEFAULT_KINDS),
                    help=f"question kinds, comma-separated, from {', '.join(task.KINDS)}")
    ap.add_argument("--processes", type=int, default=1,
                    help="train with `accelerate launch` on this many CPU processes (launch/accelerate/cpu.yaml)")
    return ap.parse_args(argv)


DEMO_MARKER = ".vlft-demo"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)  # on a small shared CPU, more threads per process made steps slower, not faster
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlft.config import dump_yaml, load_experiment

    out = Path(args.out).resolve()
    kinds = [k for k in args.kinds.split(",") if k]
    if out.exists() and any(out.iterdir()):
        # only a folder an earlier demo made is replaced; anything else the user has there is never deleted
        if not (out / DEMO_MARKER).is_file():
            print(f"vlft demo: {out} is not empty and was not made by vlft demo; choose another --out",
                  file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by vlft demo; the next run with this --out replaces this folder\n")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def phase(name: str):
        timings[name] = round(time.perf_counter() - phase.t, 1)
        phase.t = time.perf_counter()
        print(f"[demo] {name}: {timings[name]:.1f}s", flush=True)

    phase.t = time.perf_counter()

    # ---- the experiment config, pointed at this folder (saved as OUT/config.yaml: `vlft train` it to redo step 4)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else None)
    base_overrides = train_overrides(out, steps, 1)
    cfg = load_experiment(args.config, base_overrides)
    dump_yaml(cfg, out / "config.yaml")
    n_train = cfg.train.max_steps * cfg.train.micro_batch_size  # every step sees samples it has not seen before
    n_heldout = QUICK_HELDOUT if args.quick else HELDOUT

    # ---- 1. task
    check_sizes(cfg.data)
    info = task.generate(out / "data", n_train, n_heldout, seed=args.seed, kinds=tuple(kinds),
                         train_weights=task.DEFAULT_TRAIN_WEIGHTS)
    phase("task data")

    # ---- 2. base model + tokenizer
    make_base(out / "base", args.seed, cfg.data)
    phase("base model")

    # ---- 3. before training
    from vlft.generate import load_for_inference, stop_ids

    heldout = read_records(out / "data" / "heldout.jsonl")
    frozen_records = read_records(out / "data" / "heldout_frozen.jsonl") if (
        out / "data" / "heldout_frozen.jsonl").is_file() else []
    model, tokenizer, limits, _ = load_for_inference(str(out / "base"), dtype="fp32", device="cpu")
    tps = model.config.vision.tokens_per_second
    heldout_prompts = prompts(heldout, out / "data", tokenizer, limits, tps)
    stop = stop_ids(tokenizer, model)
    before = accuracy(heldout, answer(model, tokenizer, heldout_prompts, stop))
    phase("evaluation before training")

    # ---- 4. train
    run_training(Path(args.config), train_overrides(out, steps, args.processes) if args.processes > 1 else
                 base_overrides, args.processes)
    torch.set_num_threads(1)
    phase("training")

    # ---- 5. after training, and with frozen frames
    from vlft.lora_merge import resolve_checkpoint

    ckpt = resolve_checkpoint(out / "train")
    model, tokenizer, limits, _ = load_for_inference(str(out / "base"), adapter=str(ckpt), dtype="fp32",
                                                     device="cpu")
    answers_after = answer(model, tokenizer, heldout_prompts, stop)
    after = accuracy(heldout, answers_after)
    frozen = {}
    if frozen_records:
        frozen_prompts = prompts(frozen_records, out / "data", tokenizer, limits, tps)
        frozen = accuracy(frozen_records, answer(model, tokenizer, frozen_prompts, stop))
    phase("evaluation after training")

    # ---- 6. export and reload with transformers
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlft.export import main as export_main

    print(f"$ vlft export merged --base {out / 'base'} --adapter {ckpt} --out {out / 'merged'}", flush=True)
    if export_main(["merged", "--base", str(out / "base"), "--adapter", str(ckpt), "--out", str(out / "merged")]):
        raise RuntimeError("vlft export merged failed")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    answers_hf = answer(hf, tokenizer, heldout_prompts, stop, hf=True)
    same = sum(a == b for a, b in zip(answers_after, answers_hf))
    agree = same == len(heldout)
    phase("export and transformers reload")

    # ---- 7. summary
    plot_losses(out / "train", out / "loss_curve.png")
    train_losses, eval_losses = loss_history(out / "train")
    checks = verdict(kinds, before, after, frozen, agree)
    timings["total"] = round(time.perf_counter() - t_all, 1)
    summary: dict[str, Any] = {
        "quick": args.quick, "seed": args.seed, "kinds": kinds,
        "needs": {k: task.KINDS[k][1] for k in kinds},
        "chance": {k: round(100 * task.chance(k), 1) for k in kinds},
        "accuracy_before": before, "accuracy_after": after, "accuracy_after_frozen_frames": frozen,
        "transformers_reload_agrees": agree, "transformers_same_answers": f"{same}/{len(heldout)}",
        "heldout_samples": len(heldout), "train_samples": info["train"], "steps": len(train_losses),
        "first_loss": train_losses[0][1] if train_losses else None,
        "last_loss": train_losses[-1][1] if train_losses else None,
        "heldout_loss": eval_losses[-1][1] if eval_losses else None,
        "checks": checks, "targets_met": all(checks.values()), "seconds": timings,
        "checkpoint": str(ckpt), "merged": str(out / "merged"), "processes": args.processes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + table(kinds, before, after, frozen))
    print(f"\ntransformers reload of the merged export: {same}/{len(heldout)} answers the same")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    print(f"\n{timings['total'] / 60:.1f} min in all; wrote {out / 'summary.json'} and {out / 'loss_curve.png'}")
    if args.quick:
        print("(--quick trains too briefly to learn the task: the targets are for the full run)")
        return 0
    return 0 if summary["targets_met"] else 1


QUICK_STEPS, QUICK_HELDOUT, HELDOUT = 8, 32, 400

if __name__ == "__main__":
    sys.exit(main())
