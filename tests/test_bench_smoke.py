"""The benchmark scripts and the GPU session script, on the CPU with tiny shapes: they import without the data
pipeline's packages, their layouts compute the same loss, and the GPU script records failures and timeouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import bench_common  # noqa: E402
import bench_train  # noqa: E402
import gpu_check  # noqa: E402

# packages the GPU machines lack (or that only the data pipeline and other recipes use)
ABSENT = ["PIL", "av", "datasets", "deepspeed", "bitsandbytes", "liger_kernel", "flash_attn", "pytest"]


def test_benchmarks_import_without_the_data_pipeline():
    code = (f"import sys\nfor m in {ABSENT!r}: sys.modules[m] = None\n"
            f"sys.path[:0] = [{str(ROOT / 'recipes')!r}, {str(ROOT / 'tests')!r}]\n"
            "import bench_common, bench_train, bench_model, bench_generate, gpu_check, cuda_checks\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_vlft_lora_targets_are_the_default_ones():
    from vlft.adapters import target_regex
    from vlft.config import LoraSection

    assert bench_common.LANGUAGE_LORA["vlft"] == target_regex(LoraSection())


def test_all_layouts_give_the_same_loss(tmp_path):
    """Packed (vlft), padding-free (transformers) and padded (both): the same samples, the same initial loss."""
    for supervise in ("answers", "all"):  # with "all", a sample's first token is a label too
        out = bench_train.main(["--device", "cpu", "--preset", "tiny", "--layers", "0", "--vision-depth", "0",
                                "--tokens", "900", "--no-memory", "--steps", "1", "--warmup", "0", "--json",
                                str(tmp_path / "r.json"), "--supervise", supervise,
                                "--runs", "vlft-packed,hf-padding-free,hf-padded,vlft-padded"])
        losses = list(out["initial_loss"].values())
        assert out["samples"] >= 2 and len(losses) == 4
        assert max(losses) - min(losses) < 1e-5, (supervise, out["initial_loss"])
        assert json.loads((tmp_path / "r.json").read_text())["runs"].keys() == out["runs"].keys()


def test_gpu_check_records_results_failures_and_timeouts(tmp_path):
    write = "import json, sys; json.dump({'x': 1}, open(sys.argv[-1], 'w'))"
    ok = gpu_check.run_section("ok", ["-c", write], 60, tmp_path)
    assert ok["ok"] and ok["rc"] == 0 and ok["result"] == {"x": 1}
    failed = gpu_check.run_section("failed", ["-c", "raise SystemExit(3)"], 60, tmp_path)
    assert not failed["ok"] and failed["rc"] == 3
    slow = gpu_check.run_section("slow", ["-c", "import time; time.sleep(30)"], 1, tmp_path)
    assert not slow["ok"] and slow["rc"] == "timeout"
    check_failed = gpu_check.run_section("checks", ["-c", "import json, sys; json.dump({'a': {'ok': False}}, "
                                                    "open(sys.argv[-1], 'w'))"], 60, tmp_path)
    assert not check_failed["ok"] and check_failed["rc"] == 0
    (tmp_path / "stale.json").write_text('{"x": 1}')  # left by an earlier run: not this run's result
    stale = gpu_check.run_section("stale", ["-c", "pass"], 60, tmp_path)
    assert not stale["ok"] and "result" not in stale


def test_gpu_sections_name_existing_scripts_and_options():
    import bench_generate
    import bench_model

    parsers = {"recipes/bench_train.py": bench_train.parser(), "recipes/bench_model.py": bench_model.parser(),
               "recipes/bench_generate.py": bench_generate.parser()}
    for name, argv, _ in gpu_check.SECTIONS:
        assert (ROOT / argv[0]).is_file(), name
        if argv[0] in parsers:
            parsers[argv[0]].parse_args(argv[1:])  # exits on an unknown option
