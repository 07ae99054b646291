"""Checkpoint I/O: round trips with transformers, shards, v5 keys, tied heads, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

from model_fixtures import make_pair, media_inputs
from vlft.model import load_config, load_pretrained, save_pretrained

SAMPLE = [[3, ("image", (1, 8, 12)), 4, ("video", (2, 4, 8)), 2]]


def _logits(model, inp):
    kw = {k: v for k, v in inp.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        return model(**kw).logits


def _hf_logits(hf, inp):
    with torch.no_grad():
        return hf(**inp).logits


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_save_loads_in_vlft(tmp_path, tie):
    model, hf = make_pair(tie=tie)
    hf.save_pretrained(tmp_path, max_shard_size="300KB")  # nested v5 config.json, Hub keys, several shards
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert "text_config" in json.loads((tmp_path / "config.json").read_text())
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config.tie_word_embeddings == tie
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    inp = media_inputs(model.config, SAMPLE)
    assert (_logits(loaded, inp) - _hf_logits(hf, inp)).abs().max() < 1e-5


@pytest.mark.parametrize("shard", ["5GB", "200KB"])
def test_vlft_save_loads_in_transformers(tmp_path, shard):
    model, _ = make_pair(tie=True)
    save_pretrained(model, tmp_path, max_shard_size=shard)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" in cfg and "text_config" not in cfg  # flat Hub form
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (shard == "200KB")
    hf, info = HFModel.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager",
                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inp = media_inputs(model.config, SAMPLE)
    assert (_logits(model, inp) - _hf_logits(hf.eval(), inp)).abs().max() < 1e-5
    again = load_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(_logits(again, inp), _logits(model, inp))


def test_v5_key_layout_is_read(tmp_path):
    model, _ = make_pair()
    save_pretrained(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    v5 = {("model.language_model." + k[6:] if k.startswith("model.") else
           "model." + k if k.startswith("visual.") else k): v for k, v in sd.items()}
    assert any(k.startswith("model.visual.") for k in v5)
    save_file(v5, tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    inp = media_inputs(model.config, SAMPLE)
    assert torch.equal(_logits(loaded, inp), _logits(model, inp))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model, _ = make_pair()
    save_pretrained(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["visual.blocks.9.extra"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight.*unexpected keys: "
                                       r"visual\.blocks\.9\.extra"):
        load_pretrained(tmp_path)


def test_pickle_weights_are_refused(tmp_path):
    model, _ = make_pair()
    save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        load_pretrained(tmp_path)


def test_load_dtype_and_config_forms(tmp_path):
    model, hf = make_pair()
    save_pretrained(model, tmp_path)
    flat = load_config(tmp_path)
    hf.save_pretrained(tmp_path / "nested")
    nested = load_config(tmp_path / "nested")
    assert flat.text == nested.text and flat.vision == nested.vision
    bf16 = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_loading_peaks_near_one_copy_of_the_weights(tmp_path):
    """Built on the meta device and filled shard by shard: the loader's peak memory growth stays near 1x the weights
    plus about one shard (a load into a materialised model would need 2x). Measured as peak RSS growth in a fresh
    process, with every weight touched so that all of it is resident."""
    import subprocess
    import sys
    import textwrap

    from vlft.model import ModelConfig, TextConfig, VisionConfig, build_model

    cfg = ModelConfig(vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                          fullatt_block_indexes=[1], out_hidden_size=512),
                      text=TextConfig(vocab_size=4000, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                      num_attention_heads=8, num_key_value_heads=2, mrope_section=[8, 12, 12]),
                      tie_word_embeddings=False, torch_dtype="float32")
    model = build_model(cfg)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_pretrained(model, tmp_path / "big", max_shard_size="20MB")
    del model
    tiny, _ = make_pair()
    save_pretrained(tiny, tmp_path / "tiny")
    script = textwrap.dedent(f"""
        import torch
        from vlft.model import load_pretrained

        load_pretrained({str(tmp_path / "tiny")!r}, dtype=torch.float32)  # the first load imports more modules

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        m = load_pretrained({str(tmp_path / "big")!r}, dtype=torch.float32)
        float(sum(p.detach().sum() for p in m.parameters()))  # touch every weight: all of it is resident now
        print(status("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"weights {weight_bytes / 1e6:.0f} MB, peak growth {growth / 1e6:.0f} MB")
    assert weight_bytes > 150e6  # 20 MB shards: one shard is a small part of it
    assert 0.8 * weight_bytes < growth < 1.35 * weight_bytes, f"peak growth {growth / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB of weights"
