"""Export round trips: merged folders load in transformers with the logits of vlft base + adapter; PEFT adapters load
with peft on transformers; --for-vllm splits vision/merger (merged) from the language LoRA (adapter)."""

import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

from export_fixtures import make_checkpoint
from vlft.cli import main as vlft
from vlft.export import export_adapter, export_merged, load_adapter, main, merge_into
from vlft.model import load_pretrained


def mm_types(batch):
    ids = batch["input_ids"]
    return (ids == 268).long() + 2 * (ids == 269).long()  # tiny tokenizer <|image_pad|>, <|video_pad|>


def hf_logits(hf, batch):
    with torch.no_grad():
        return hf(**batch, mm_token_type_ids=mm_types(batch)).logits


def vlft_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def max_diff(a, b, batch):
    keep = batch["attention_mask"].bool()
    return (a - b)[keep].abs().max().item()


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "dora"])
def trained(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dora" if request.param else "lora"), dora=request.param)


def test_merge_math_equals_peft_merge(trained, tmp_path):
    base, ckpt, peft_model, _ = trained
    adapter = load_adapter(ckpt)
    merge_into(base, adapter, tmp_path, None)
    ours = load_file(str(tmp_path / "model.safetensors"))
    # peft's own merge, on a fresh copy (merging the fixture's model would alter it)
    fresh = PeftModel.from_pretrained(load_pretrained(base, dtype=torch.float32), str(ckpt)).merge_and_unload()
    ref = fresh.state_dict()
    assert set(ref) == set(ours)
    changed = [k for k in ref if not torch.equal(ref[k], load_file(str(base / "model.safetensors"))[k])]
    # every LoRA target (both towers) and every merger tensor changed, nothing else
    assert len(changed) == len(adapter.lora) + len(adapter.full) == 34 + 5
    worst = max((ref[k] - ours[k]).abs().max().item() for k in ref)
    assert worst < 1e-6


def test_merged_loads_in_transformers_with_equal_logits(trained, tmp_path):
    base, ckpt, peft_model, batch = trained
    out = tmp_path / "merged"
    export_merged(str(ckpt), str(out))  # --base comes from the checkpoint's base_model.json
    hf, info = HFModel.from_pretrained(str(out), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_diff(hf_logits(hf.eval(), batch), vlft_logits(peft_model, batch), batch) < 1e-4
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (out / name).is_file(), name
    # the training pixel limits travel with the merged model
    assert json.loads((out / "preprocessor_config.json").read_text())["max_pixels"] == 12544
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_merged_dtype_conversion(trained, tmp_path):
    base, ckpt, peft_model, batch = trained
    export_merged(str(ckpt), str(tmp_path / "bf16"), base=str(base), dtype="bf16")
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_adapter_export_loads_with_peft_on_transformers(trained, tmp_path):
    base, ckpt, peft_model, batch = trained
    out = tmp_path / "adapter"
    export_adapter(str(ckpt), str(out), base=str(base))
    hf = HFModel.from_pretrained(str(base), attn_implementation="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = PeftModel.from_pretrained(hf, str(out)).eval()
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    n_lora = sum(1 for n, _ in wrapped.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == len(load_adapter(ckpt).lora)
    assert max_diff(hf_logits(wrapped, batch), vlft_logits(peft_model, batch), batch) < 1e-4
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()


def test_for_vllm_splits_vision_into_base_and_keeps_language_adapter(tmp_path):
    base, ckpt, peft_model, batch = make_checkpoint(tmp_path / "run", dora=False, steps=1)
    out = tmp_path / "vllm"
    assert main(["adapter", "--adapter", str(ckpt), "--base", str(base), "--out", str(out), "--for-vllm"]) == 0
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)  # Hub layout, language only
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not config["modules_to_save"] and not config["use_dora"]
    # merged base copy + language adapter == everything merged
    export_merged(str(ckpt), str(tmp_path / "merged"), base=str(base))
    full = vlft_logits(load_pretrained(tmp_path / "merged", dtype=torch.float32), batch)
    served = PeftModel.from_pretrained(load_pretrained(out / "base", dtype=torch.float32), str(out / "adapter"))
    vision_lora = [n for n, _ in served.named_modules() if ".visual." in n and "lora_A" in n]
    assert not vision_lora  # the vision tower is excluded from the adapter
    assert max_diff(vlft_logits(served.eval(), batch), full, batch) < 1e-4
    # and the base copy alone differs from the base (vision/merger changes are in it)
    assert max_diff(vlft_logits(load_pretrained(out / "base", dtype=torch.float32), batch),
                    vlft_logits(load_pretrained(base, dtype=torch.float32), batch), batch) > 1e-3


def test_for_vllm_loads_as_transformers_model_plus_peft(tmp_path):
    """The language adapter also loads with peft on transformers once mapped to v5 names (what vLLM does itself)."""
    base, ckpt, peft_model, batch = make_checkpoint(tmp_path / "run", dora=False, steps=0)
    out = tmp_path / "vllm"
    export_adapter(str(ckpt), str(out), base=str(base), for_vllm=True)
    hf = HFModel.from_pretrained(str(out / "base"), attn_implementation="eager")
    wrapped = PeftModel.from_pretrained(hf, str(out / "adapter"),
                                        key_mapping={r"^model\.(?!language_model|visual)": "model.language_model."})
    assert max_diff(hf_logits(wrapped.eval(), batch), vlft_logits(peft_model, batch), batch) < 1e-4


def test_dora_language_adapter_refused_for_vllm(trained, tmp_path):
    base, ckpt, _, _ = trained
    if load_adapter(ckpt).lora["model.layers.0.self_attn.q_proj"].magnitude is None:
        pytest.skip("only the DoRA variant is refused")
    assert vlft(["export", "adapter", "--adapter", str(ckpt), "--base", str(base), "--out", str(tmp_path / "o"),
                 "--for-vllm"]) == 2
    assert not (tmp_path / "o").exists()

