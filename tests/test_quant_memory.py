"""QLoRA loading quantizes shard by shard: loading a base split into several shards with model.quantization needs about
two copies of the largest shard (its file pages and the tensors read from them) plus the loaded model (4-bit layers and
the float rest) and the quantization's temporaries, never the whole model in full precision; measured as the peak
resident set of a fresh process (Linux /proc)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from test_export_memory import can_reset_peak
from vlft.model import build_model, preset, save_pretrained

MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from vlft.config import QuantizationSection
    from vlft.model import load_pretrained
    from vlft.quant import frozen_quantizer, quantized_layers, to_4bit

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    quantize = frozen_quantizer(QuantizationSection(), "cpu")
    to_4bit(torch.nn.Linear(64, 64), QuantizationSection(), "cpu")  # bitsandbytes' one-time setup, before the reset
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set to the current one
    before = status("VmRSS")
    model = quantize(load_pretrained(sys.argv[1], dtype=torch.float32, after_shard=quantize))
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"peak_extra": status("VmHWM") - before, "held": held,
                      "quantized": len(quantized_layers(model))}))
""")


@pytest.mark.skipif(not can_reset_peak(), reason="needs Linux /proc/self/clear_refs to measure peak memory")
def test_quantized_loading_never_holds_the_float_model(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny")  # wider language model: ~140 MB of float32 weights in ~16 MB shards
    cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.num_hidden_layers = 512, 2048, 8
    cfg.text.mrope_section = [16, 24, 24]
    cfg.vision.out_hidden_size = 512
    save_pretrained(build_model(cfg), tmp_path, max_shard_size="16MB")

    shards = sorted(tmp_path.glob("model-*.safetensors"))
    sizes = [sum(t.numel() * t.element_size() for t in load_file(str(s)).values()) for s in shards]
    largest, total = max(sizes), sum(sizes)
    largest_weight = 4 * cfg.text.hidden_size * cfg.text.intermediate_size  # float32 bytes of an MLP matrix
    # glibc returns freed blocks above its mmap threshold (32 MB at most) to the system at once and keeps smaller ones
    # in its heap; a fixed low threshold makes this model's 4 MB matrices behave like a 7B's 100+ MB ones, so the peak
    # measures what the loader holds rather than the allocator's cache
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["quantized"] == 7 * cfg.text.num_hidden_layers
    # the shard's file pages and its tensors, the loaded model, and quantizing one matrix (a float32 copy, the scaled
    # values, the int32 codes: 3 of its size; 4 allowed)
    bound = 2 * largest + got["held"] + 4 * largest_weight
    assert got["peak_extra"] <= bound, (got, largest, total)
    assert total > 1.5 * bound  # loading in float first would break the bound: the check can fail
