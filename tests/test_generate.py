"""KV-cache generation with 3D positions equals transformers' generate (greedy, image and video prompts, a left-padded
batch of 2), sampling options behave, and `vlft generate` runs from files through a training checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

from export_fixtures import make_checkpoint
from model_fixtures import make_pair, media_inputs
from vlft.cli import main as vlft
from vlft.data import Media, Message
from vlft.export import export_merged
from vlft.generate import encode_prompt, generate, left_pad, load_for_inference, main, stop_ids

N_NEW = 20


def hf_generate(hf, batch, eos, pad):
    ids = batch["input_ids"]
    mm = (ids == hf.config.image_token_id).long() + 2 * (ids == hf.config.video_token_id).long()
    out = hf.generate(**batch, mm_token_type_ids=mm, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos,
                      pad_token_id=pad, repetition_penalty=1.0, temperature=None, top_p=None, top_k=None)
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def pair():
    return make_pair(seed=1)


@pytest.mark.parametrize("samples", [
    [[3, ("image", (1, 8, 12)), 4], [2, ("video", (2, 4, 8)), 9]],  # image row and video row, left padding
    [[5, ("image", (1, 4, 4)), 2, ("image", (1, 4, 8)), 3]],  # two images, no padding
], ids=["image+video-batch", "two-images"])
def test_greedy_equals_transformers(pair, samples):
    model, hf = pair
    batch = media_inputs(model.config, samples, pad_side="left")
    batch.pop("mm_token_type_ids")
    ours = generate(model, **batch, max_new_tokens=N_NEW, eos_token_id=None)
    theirs = hf_generate(hf, batch, eos=None, pad=model.config.bos_token_id)
    assert ours.shape == (len(samples), N_NEW)
    assert torch.equal(ours, theirs)
    if len(samples) == 2:  # the rows really are left-padded to different lengths
        assert batch["attention_mask"][:, 0].tolist() != batch["attention_mask"][:, -1].tolist()


def test_eos_stops_and_pads(pair):
    model, _ = pair
    batch = media_inputs(model.config, [[3, ("image", (1, 8, 12)), 4], [6]], pad_side="left")
    batch.pop("mm_token_type_ids")
    free = generate(model, **batch, max_new_tokens=8)
    stop = int(free[0, 2])  # make row 0's third token the stop token
    k = int((free[0] == stop).nonzero()[0])  # where it first appears
    pad = model.config.bos_token_id
    out = generate(model, **batch, max_new_tokens=8, eos_token_id=stop, pad_token_id=pad)
    assert torch.equal(out[0, :k + 1], free[0, :k + 1]) and (out[0, k + 1:] == pad).all()
    row1_stop = (free[1] == stop).nonzero()
    n = int(row1_stop[0]) + 1 if len(row1_stop) else 8
    assert torch.equal(out[1, :n], free[1, :n])


def test_sampling_options(pair):
    model, _ = pair
    batch = media_inputs(model.config, [[3, ("image", (1, 8, 12)), 4], [6]], pad_side="left")
    batch.pop("mm_token_type_ids")
    greedy = generate(model, **batch, max_new_tokens=6)

    def sample(seed, **kw):
        return generate(model, **batch, max_new_tokens=6, do_sample=True,
                        generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0, top_k=1), greedy)
    assert torch.equal(sample(0, top_p=1e-6), greedy)
    assert torch.equal(sample(0, temperature=1e-6), greedy)
    hot = [sample(s, temperature=5.0) for s in range(3)]
    assert torch.equal(sample(1, temperature=5.0), hot[1])  # seeded
    assert not all(torch.equal(hot[0], h) for h in hot[1:])  # and really random at a high temperature
    penalised = generate(model, **batch, max_new_tokens=6, repetition_penalty=1e6)
    for row, prompt in zip(penalised.tolist(), batch["input_ids"].tolist()):
        assert not set(row) & set(prompt) and len(set(row)) == len(row)  # a huge penalty never repeats a token


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (84, 112, 3), dtype=np.uint8)).save(root / "cat.png")
    (root / "clip").mkdir()
    for i in range(4):  # 4 frames of 56x112: grid (2, 4, 8), shorter in time than in space
        Image.fromarray(rng.integers(0, 255, (56, 112, 3), dtype=np.uint8)).save(root / "clip" / f"{i:02d}.png")
    return root


def test_cli_pipeline_equals_transformers_on_merged_export(tmp_path, media_files, capsys):
    base, ckpt, _, _ = make_checkpoint(tmp_path / "run", steps=1)
    model, tokenizer, limits, _ = load_for_inference(None, str(ckpt), attn="eager")  # base from base_model.json
    assert (limits.max_pixels, limits.video_max_pixels) == (12544, 6272)  # the training limits of the checkpoint
    media = [Media("image", str(media_files / "cat.png")), Media("video", str(media_files / "clip"))]
    samples = [encode_prompt([Message("user", media + [q])], tokenizer, limits) for q in ("what is it?", "and?")]
    assert tokenizer.decode(samples[0]["input_ids"]).endswith("what is it?<|im_end|>\n<|im_start|>assistant\n")
    assert samples[0]["image_grid_thw"].tolist() == [[1, 6, 8]] and samples[0]["video_grid_thw"].tolist() == [[2, 4, 8]]
    pad = tokenizer.pad_token_id
    batch = left_pad(samples, pad)
    eos = stop_ids(tokenizer, model)
    ours = generate(model, **batch, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=pad)
    export_merged(str(ckpt), str(tmp_path / "merged"))
    hf = HFModel.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager").eval()
    theirs = hf_generate(hf, batch, eos=eos, pad=pad)
    assert torch.equal(ours, theirs)

    capsys.readouterr()
    rc = main(["--adapter", str(ckpt), "--image", str(media_files / "cat.png"), "--video",
               str(media_files / "clip"), "--prompt", "what is it?", "--prompt", "and?", "--max-new-tokens", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 2 and out[0].startswith("[0]") and out[1].startswith("[1]")
    rc = vlft(["generate", "--model", str(tmp_path / "merged"), "--image", str(media_files / "missing.png"),
               "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"vlft generate: error: image file not found: {media_files / 'missing.png'}\n"
