"""One GPU session in at most about 8 minutes on one H100/H200, writing one JSON of results.

    python3 recipes/gpu_check.py --out DIR        # or: bash recipes/gpu_check.sh (OUT=DIR)

Sections, in order of importance, each in its own process with its own time limit (a crash, an out-of-memory or a
timeout is recorded and the next section runs; the whole stays inside --budget seconds):
1. CUDA checks (tests/cuda_checks.py): bf16 parity with transformers on the device, varlen FlashAttention against
   sdpa and eager (kernel and model, forward and backward), no host sync in the forward.
2. LoRA training step, 3B and 7B at full depth, 4k-token packed rows with images: vlft + peft against transformers +
   peft padding-free and padded (and + Liger where it is installed), with tokens/s, peak memory and MFU.
3. Inference: vlft generate against transformers generate, 3B full depth.
4. Model forward and forward+backward (every weight trained), 3B full depth, 4k tokens.
5. Peak memory and speed at 16k tokens (activation checkpointing on both sides), 3B and 7B.
6. QLoRA (recipes/gpu_qlora_check.py): vlft's 4-bit layers on CUDA, and a 7B-shaped QLoRA step's memory (target
   12 GB) and tokens/s beside a bf16 base; only where bitsandbytes imports, and only with the budget left.
Needs only torch (CUDA), transformers, peft and safetensors (and bitsandbytes for section 6): no data pipeline,
DeepSpeed, flash-attn or pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL = ["--device", "cuda", "--dtype", "bfloat16", "--layers", "0", "--vision-depth", "0"]  # the whole model
TRAIN = ["recipes/bench_train.py", *FULL]
SECTIONS = [  # (name, script and arguments, seconds)
    ("cuda_checks", ["tests/cuda_checks.py"], 75),
    ("train_3B_4k", [*TRAIN, "--preset", "3B", "--tokens", "4096", "--runs", "vlft-packed,hf-padding-free,hf-padded"],
     90),
    ("train_7B_4k", [*TRAIN, "--preset", "7B", "--tokens", "4096", "--runs", "vlft-packed,hf-padding-free,hf-padded"],
     110),
    ("generate_3B", ["recipes/bench_generate.py", *FULL, "--preset", "3B", "--batch", "8", "--new-tokens", "64"], 60),
    ("model_3B_4k", ["recipes/bench_model.py", *FULL, "--preset", "3B", "--tokens", "4096", "--reps", "3"], 60),
    ("memory_3B_16k", [*TRAIN, "--preset", "3B", "--tokens", "16384", "--checkpointing", "--steps", "2",
                       "--warmup", "1"], 60),
    ("memory_7B_16k", [*TRAIN, "--preset", "7B", "--tokens", "16384", "--checkpointing", "--steps", "2",
                       "--warmup", "1"], 75),
    # last, and only where bitsandbytes imports (carried as a wheel: recipes/gpu_check.sh installs it from .whl/)
    ("qlora_7B_4k", ["recipes/gpu_qlora_check.py"], 150),
]


def environment() -> dict:
    env = {"python": platform.python_version(), "host": platform.node()}
    # one process (each start imports torch): versions, and which optional kernels import
    probe = ("import json, torch, transformers, peft\n"
             "def imports(module):\n"
             "    try:\n"
             "        __import__(module)\n"
             "        return True\n"
             "    except Exception:\n"
             "        return False\n"
             "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, 'peft': "
             "peft.__version__, 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if "
             "torch.cuda.is_available() else None, **{m: imports(m) for m in ('liger_kernel', 'flash_attn', "
             "'bitsandbytes')}}))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
        env.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except Exception as e:  # noqa: BLE001 - recorded
        env["probe_error"] = f"{type(e).__name__}: {e}"
    return env


def run_section(name: str, argv: list[str], seconds: float, out_dir: Path) -> dict:
    """Run one section in its own process; its JSON, exit status, time and the end of its output."""
    result_file = out_dir / f"{name}.json"
    result_file.unlink(missing_ok=True)  # a result left by an earlier run must not pass for this run's
    cmd = [sys.executable, *argv, "--json", str(result_file)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds, cwd=ROOT, env=env)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    record = {"command": " ".join(argv), "seconds": round(time.time() - t0, 1), "limit_s": round(seconds),
              "rc": rc, "output_tail": "\n".join(line for line in output.splitlines()
                                                 if "USDT" not in line)[-3000:]}
    if result_file.is_file():
        record["result"] = json.loads(result_file.read_text())
    record["ok"] = rc == 0 and "result" in record and not _failed_checks(record["result"])
    (out_dir / f"{name}.log").write_text(output)
    return record


def _failed_checks(result: dict) -> list[str]:
    return [k for k, v in result.items() if isinstance(v, dict) and v.get("ok") is False]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="folder for gpu_check.json and logs")
    p.add_argument("--budget", type=float, default=470, help="seconds for all sections together")
    p.add_argument("--only", default="", help="comma-separated section names (default: all)")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    report = {"environment": environment(), "sections": {}}
    wanted = [s for s in SECTIONS if not args.only or s[0] in args.only.split(",")]
    if not report["environment"].get("bitsandbytes"):
        wanted = [s for s in wanted if s[0] != "qlora_7B_4k"]
        report["sections"]["qlora_7B_4k"] = {"ok": None, "rc": "not run: bitsandbytes does not import here"}
    for name, section_argv, seconds in wanted:
        left = args.budget - (time.time() - start)
        if left < 20:
            report["sections"][name] = {"ok": False, "rc": "skipped: out of time budget"}
            continue
        report["sections"][name] = run_section(name, section_argv, min(seconds, left - 5), out_dir)
        s = report["sections"][name]
        print(f"{name}: ok={s['ok']} rc={s['rc']} {s['seconds']}s", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))  # kept up to date as sections end
    report["total_s"] = round(time.time() - start, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'gpu_check.json'} in {report['total_s']} s")
    return 0 if all(s.get("ok") is not False for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
