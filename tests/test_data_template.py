"""Token ids identical to transformers' Qwen2_5_VLProcessor + apply_chat_template (tiny tokenizer), and labels."""

import pytest
import torch
from data_fixtures import hf_processor, make_video, rand_image, tiny_tokenizer

from vlft.data import DataConfig, DatasetConfig, SampleProcessor
from vlft.data.template import IGNORE_INDEX, Media, Message, encode_conversation

LIMITS = (3136, 28 * 28 * 16)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"), words=["cat", "dog"])


def _to_ours(conv):
    """transformers-style conversation -> vlft Messages (PIL images as sources)."""
    out = []
    for m in conv:
        c = m["content"]
        parts = [c] if isinstance(c, str) else [
            p["text"] if p["type"] == "text" else Media(p["type"], p[p["type"]]) for p in c]
        out.append(Message(m["role"], parts))
    return out


def _ours(tok, conv, **kw):
    from vlft.data.image import process_image

    msgs = _to_ours(conv)
    grids = [process_image(p.source, *LIMITS)[1] for m in msgs for p in m.parts if isinstance(p, Media)]
    return encode_conversation(msgs, tok, [int(g.prod()) // 4 for g in grids], **kw)


IMG = [rand_image(60, 90, seed=1), rand_image(100, 50, seed=2)]
CONVS = {
    "single_turn": [{"role": "user", "content": [{"type": "image", "image": IMG[0]},
                                                  {"type": "text", "text": "What is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
    "multi_turn_with_system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": IMG[0]}]},
        {"role": "assistant", "content": "A dog, I think."},
        {"role": "user", "content": "Sure?\n\n  Really?"},
        {"role": "assistant", "content": "Yes  it is.\n"}],
    "multi_image": [{"role": "user", "content": [{"type": "image", "image": IMG[0]},
                                                 {"type": "image", "image": IMG[1]},
                                                 {"type": "text", "text": "Compare ünïcode 123."}]},
                    {"role": "assistant", "content": "The first is wider."}],
    "text_only": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
}


@pytest.mark.parametrize("name", list(CONVS))
def test_ids_equal_transformers_processor(tok, name):
    conv = CONVS[name]
    proc = hf_processor(tok, *LIMITS)
    theirs = proc.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    ids, labels = _ours(tok, conv)
    assert ids == theirs["input_ids"][0].tolist()
    assert len(labels) == len(ids)


def test_ids_with_video_equal_template_plus_expansion(tok, tmp_path):
    """transformers' video processor needs torchvision; the processor's rule is: render the template,
    replace the k-th pad by t*h*w/4 copies, tokenise. We check against exactly that."""
    from vlft.data.image import process_image
    from vlft.data.video import process_video

    video = make_video(tmp_path / "v.mp4", 20, 10)
    conv = [{"role": "user", "content": [{"type": "image", "image": IMG[0]}, {"type": "video", "video": video},
                                         {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": "A grey fade."}]
    text = tok.apply_chat_template(conv, tokenize=False)
    ig = process_image(IMG[0], *LIMITS)[1]
    vg = process_video(video, min_pixels=3136, max_pixels=3136 * 2)[1]
    n_img, n_vid = int(ig.prod()) // 4, int(vg.prod()) // 4
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_img).replace("<|video_pad|>", "<|video_pad|>" * n_vid)
    msgs = _to_ours(conv)
    ids, _ = encode_conversation(msgs, tok, [n_img, n_vid])
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def _supervised_text(tok, ids, labels):
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_labels_cover_assistant_replies_and_im_end(tok):
    ids, labels = _ours(tok, CONVS["multi_turn_with_system"])
    assert _supervised_text(tok, ids, labels) == ["A dog, I think.<|im_end|>", "Yes  it is.\n<|im_end|>"]
    ids, labels = _ours(tok, CONVS["multi_turn_with_system"], last_turn_only=True)
    assert _supervised_text(tok, ids, labels) == ["Yes  it is.\n<|im_end|>"]
    ids, labels = _ours(tok, CONVS["single_turn"], last_turn_only=True)  # default system prompt inserted
    assert _supervised_text(tok, ids, labels) == ["A cat.<|im_end|>"]
    assert tok.decode(ids[:3]) == "<|im_start|>sy"


def test_llava_and_messages_formats_give_the_same_sample(tok, tmp_path):
    IMG[0].save(tmp_path / "a.png")
    cfg = DataConfig(min_pixels=LIMITS[0], max_pixels=LIMITS[1], max_length=10_000)
    proc = SampleProcessor(cfg, tok)
    llava = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>What is it?"},
                                                  {"from": "gpt", "value": "A cat."}]}
    messages = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                          {"type": "text", "text": "What is it?"}]},
                             {"role": "assistant", "content": "A cat."}]}
    dc = DatasetConfig(path=str(tmp_path / "x.jsonl"))
    a, b = proc(llava, dc, 0), proc(messages, dc, 0)
    assert a.keys() == b.keys() == {"input_ids", "labels", "pixel_values", "image_grid_thw"}
    for k in a:
        assert torch.equal(a[k], b[k])
    theirs = hf_processor(tok, *LIMITS).apply_chat_template(CONVS["single_turn"], tokenize=True, return_dict=True,
                                                             return_tensors="pt")
    assert a["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert (a["pixel_values"] - theirs["pixel_values"]).abs().max() <= 1e-6
    assert torch.equal(a["image_grid_thw"], theirs["image_grid_thw"])


def test_whole_word_tokens(tok):
    ids = tok("a cat and a dog", add_special_tokens=False)["input_ids"]
    assert 278 in ids and 279 in ids
    assert tok("concatenate", add_special_tokens=False)["input_ids"].count(278) == 0
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 268 and tok.convert_tokens_to_ids("<|file_sep|>") == 277


@pytest.mark.parametrize("name", ["single_turn", "multi_image", "text_only"])
def test_generation_prompt_equals_transformers(tok, name):
    """Inference prompts: the conversation without its last reply, then `<|im_start|>assistant\\n`."""
    conv = CONVS[name][:-1]
    proc = hf_processor(tok, *LIMITS)
    theirs = proc.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt",
                                      add_generation_prompt=True)
    ids, labels = _ours(tok, conv, add_generation_prompt=True)
    assert ids == theirs["input_ids"][0].tolist()
    assert set(labels) == {IGNORE_INDEX}
