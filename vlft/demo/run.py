"""`vlft demo [--out DIR] [--quick] [--seed S]`: the main job out of the box, on a CPU, with nothing downloaded.

A user fine-tunes a Qwen2.5-VL that already sees. The demo does the same at a size a CPU trains in minutes, in two
stages, and reads in the order it runs:
  1. write the task (vlft/demo/task.py): PNG pictures and mp4 clips, captioned for stage 1, with questions for
     stage 2, and a held-out split
  2. stage 1, the base model (vlft/demo/pretrain.py): a tiny Qwen2.5-VL trained in full to describe pictures and
     clips ("a red square", "a square moving left"), saved as an HF folder with a tiny tokenizer
  3. evaluate the base on the held-out split: its captions, and its answers to the questions (exact match of greedy
     answers per question kind; it describes, it does not answer yet)
  4. stage 2: `vlft train configs/demo.yaml ...` (LoRA on the language model of the base) on the question task
  5. evaluate the trained checkpoint, and again with every video frame replaced by the first (time kinds)
  6. `vlft export merged`, reload the export with transformers and answer the same questions
  7. summary table, summary.json and loss_curve.png in the output folder

Stage 2 and everything after it go through the commands and functions a user gets: vlft.data for media and prompts,
recipes/sft.py for training, vlft.export for the merge, vlft.generate for decoding.
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
from vlft.demo.pretrain import BaseTraining, make_base
from vlft.demo.report import plot_losses, table, verdict
from vlft.demo.score import CAPTION_TOKENS, accuracy, answer, prompts, read_records

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
QUICK_STEPS, QUICK_HELDOUT, HELDOUT = 8, 32, 400
DEMO_MARKER = ".vlft-demo"


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


# ---------------------------------------------------------------------------------------------------- 4. stage 2
def train_overrides(out: Path, seed: int, steps: int | None, per_rank_batch: int | None = None) -> list[str]:
    """`section.key=value` settings that point configs/demo.yaml at this output folder. Paths are absolute, so they
    mean the same whatever folder the config is read from; values are JSON, which YAML reads, so any path is safe."""
    j = json.dumps
    o = [f"model.path={j(str(out / 'base'))}", f"data.tokenizer={j(str(out / 'base'))}",
         f"data.datasets=[{{\"path\": {j(str(out / 'data' / 'train.jsonl'))}}}]",
         f"data.eval_datasets=[{{\"path\": {j(str(out / 'data' / 'heldout.jsonl'))}}}]",
         f"train.output_dir={j(str(out / 'train'))}", f"train.seed={seed}", f"data.seed={seed}"]
    if steps is not None:
        o.append(f"train.max_steps={steps}")
        if steps < 100:  # a short run logs every step, so its loss curve has points
            o.append("train.log_every=1")
    if per_rank_batch is not None:
        o.append(f"train.micro_batch_size={per_rank_batch}")
    return o


def per_rank_batch(total: int, processes: int) -> int:
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
    """(step, loss) of the logged training steps and of the held-out evaluations in OUTPUT_DIR/metrics.jsonl."""
    train, evals = [], []
    for line in (train_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            (evals if r.get("split") == "eval" else train).append((r["step"], r["loss"]))
    return train, evals


def stage_record(losses: list[tuple[int, float]], optimizer_steps: int, batch_size: int, seconds: float) -> dict:
    """What summary.json says of one training stage. `losses` are the logged points only: the number of optimizer
    steps comes from the trainer, not from how many points were logged."""
    return {"optimizer_steps": optimizer_steps, "batch_size": batch_size, "samples": optimizer_steps * batch_size,
            "logged_points": len(losses), "first_logged_step": losses[0][0] if losses else None,
            "first_loss": losses[0][1] if losses else None, "last_logged_step": losses[-1][0] if losses else None,
            "last_loss": losses[-1][1] if losses else None, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vlft demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); a folder made by an "
                    "earlier demo is replaced, any other non-empty folder is refused")
    ap.add_argument("--quick", action="store_true", help="a smoke run in well under a minute: little data, few "
                    "steps in both stages (shows the path works, not that the model learns)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML of stage 2 (default "
                    "configs/demo.yaml)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the task data, the base model and both trainings")
    ap.add_argument("--base-steps", type=int, default=None,
                    help=f"optimizer steps of stage 1, the base model's training (default {BaseTraining.steps})")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of stage 2 (overrides train.max_steps)")
    ap.add_argument("--kinds", default=",".join(task.DEFAULT_KINDS),
                    help=f"question kinds, comma-separated, from {', '.join(task.KINDS)}")
    ap.add_argument("--processes", type=int, default=1,
                    help="train stage 2 with `accelerate launch` on this many CPU processes (launch/accelerate/cpu.yaml)")
    return ap.parse_args(argv)


def prepare_out(out: Path) -> bool:
    """Empty the output folder if an earlier demo made it; False (and nothing touched) if it holds anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            return False
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by vlft demo; the next run with this --out replaces this folder\n")
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)  # on a small shared CPU, more threads per process made steps slower, not faster
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlft.config import dump_yaml, load_experiment

    out = Path(args.out).resolve()
    kinds = [k for k in args.kinds.split(",") if k]
    if not prepare_out(out):  # anything the user has there is never deleted
        print(f"vlft demo: {out} is not empty and was not made by vlft demo; choose another --out", file=sys.stderr)
        return 2
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def phase(name: str):
        timings[name] = round(time.perf_counter() - phase.t, 1)
        phase.t = time.perf_counter()
        print(f"[demo] {name}: {timings[name]:.1f}s", flush=True)

    phase.t = time.perf_counter()

    # ---- the stage 2 config, pointed at this folder (saved as OUT/config.yaml: `vlft train` it to redo stage 2)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else None)
    overrides = train_overrides(out, args.seed, steps)
    cfg = load_experiment(args.config, overrides)
    dump_yaml(cfg, out / "config.yaml")
    base = BaseTraining()
    base.steps = args.base_steps or (QUICK_STEPS if args.quick else base.steps)
    n_heldout = QUICK_HELDOUT if args.quick else HELDOUT

    # ---- 1. task: every training step of either stage sees samples it has not seen before
    check_sizes(cfg.data)
    info = task.generate(out / "data", cfg.train.max_steps * cfg.train.micro_batch_size, n_heldout, seed=args.seed,
                         kinds=tuple(kinds), n_describe=base.steps * base.batch_size,
                         describe_weights=task.DESCRIBE_WEIGHTS)
    phase("task data")

    # ---- 2. stage 1: the base model
    base_losses = make_base(out / "base", args.seed, cfg.data, out / "data" / "describe.jsonl", base,
                            task.vocabulary())
    phase("stage 1: base model, full training")

    # ---- 3. the base on the held-out split: captions, and answers to the questions
    from vlft.generate import load_for_inference, stop_ids

    data = out / "data"
    heldout = read_records(data / "heldout.jsonl")
    model, tokenizer, limits, _ = load_for_inference(str(out / "base"), dtype="fp32", device="cpu")
    tps = model.config.vision.tokens_per_second
    stop = stop_ids(tokenizer, model)
    captions = read_records(data / "heldout_describe.jsonl")
    caption_answers = answer(model, tokenizer, prompts(captions, data, tokenizer, limits, tps), stop,
                             max_new_tokens=CAPTION_TOKENS)
    described = accuracy(captions, caption_answers)
    heldout_prompts = prompts(heldout, data, tokenizer, limits, tps)
    answers_before = answer(model, tokenizer, heldout_prompts, stop)
    before = accuracy(heldout, answers_before)
    phase("evaluation of the base")

    # ---- 4. stage 2: LoRA through `vlft train`
    run_overrides = overrides if args.processes == 1 else train_overrides(
        out, args.seed, steps, per_rank_batch(cfg.train.micro_batch_size, args.processes))
    run_training(Path(args.config), run_overrides, args.processes)
    torch.set_num_threads(1)
    phase("stage 2: LoRA training")

    # ---- 5. after training, and with frozen frames
    from vlft.checkpoint import read_trainer_state
    from vlft.lora_merge import resolve_checkpoint

    ckpt = resolve_checkpoint(out / "train")
    model, tokenizer, limits, _ = load_for_inference(str(out / "base"), adapter=str(ckpt), dtype="fp32",
                                                     device="cpu")
    answers_after = answer(model, tokenizer, heldout_prompts, stop)
    after = accuracy(heldout, answers_after)
    frozen = {}
    if (data / "heldout_frozen.jsonl").is_file():
        frozen_records = read_records(data / "heldout_frozen.jsonl")
        frozen_prompts = prompts(frozen_records, data, tokenizer, limits, tps)
        frozen = accuracy(frozen_records, answer(model, tokenizer, frozen_prompts, stop))
    phase("evaluation after stage 2")

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
    lora_losses, eval_losses = loss_history(out / "train")
    plot_losses(base_losses, lora_losses, eval_losses, out / "loss_curve.png")
    lora_steps = read_trainer_state(ckpt)["step"]
    checks = verdict(kinds, before, after, frozen, agree)
    timings["total"] = round(time.perf_counter() - t_all, 1)
    summary: dict[str, Any] = {
        "quick": args.quick, "seed": args.seed, "kinds": kinds,
        "needs": {k: task.KINDS[k][1] for k in kinds},
        "chance": {k: round(100 * task.chance(k), 1) for k in kinds},
        "base_caption_accuracy": described,
        "accuracy_before": before, "accuracy_after": after, "accuracy_after_frozen_frames": frozen,
        "examples_before": {r["kind"]: a for r, a in zip(reversed(heldout), reversed(answers_before))},
        "transformers_reload_agrees": agree, "transformers_same_answers": f"{same}/{len(heldout)}",
        "heldout_samples": len(heldout),
        "stage1_base": stage_record(base_losses, base.steps, base.batch_size,
                                    timings["stage 1: base model, full training"]),
        "stage2_lora": dict(stage_record(lora_losses, lora_steps, cfg.train.micro_batch_size,
                                         timings["stage 2: LoRA training"]),
                            heldout_loss=eval_losses[-1][1] if eval_losses else None),
        "checks": checks, "targets_met": all(checks.values()), "seconds": timings,
        "checkpoint": str(ckpt), "merged": str(out / "merged"), "processes": args.processes,
        "task": info,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nstage 1: {base.steps} steps of full training; the base describes the held-out media: "
          + ", ".join(f"{k} {v:.0f}%" for k, v in described.items()))
    print(f"stage 2: {lora_steps} steps of LoRA through `vlft train`\n")
    print(table(kinds, before, after, frozen))
    print(f"\ntransformers reload of the merged export: {same}/{len(heldout)} answers the same")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    print(f"\n{timings['total'] / 60:.1f} min in all; wrote {out / 'summary.json'} and {out / 'loss_curve.png'}")
    if args.quick:
        print("(--quick trains too briefly to learn the task: the targets are for the full run)")
        return 0
    return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
