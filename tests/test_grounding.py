"""Grounding boxes and points (vlft/data/grounding.py, docs/grounding.md): golden rewrites computed by hand from
smart_resize, the round trip through generate's back-mapping, bad boxes named and counted, multi-image records, the
training labels, the settings, and `vlft generate --boxes original`."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from data_fixtures import header_only_png, save_image, tiny_tokenizer, write_jsonl

from vlft.data import (DataConfig, DatasetConfig, ImageScale, MixedDataset, SampleError, SampleProcessor, SkipCounter,
                       Skipped, to_original, to_resized)
from vlft.data.errors import BadInput
from vlft.data.grounding import rescale_messages
from vlft.data.template import Media, Message
from vlft.errors import ConfigError

DEFAULT = (3136, 602112)  # DataConfig's min_pixels, max_pixels

# Hand computations of smart_resize (height, width -> height', width'), factor 28:
# shrink: 1000x800 (W x H) at the defaults: round(800/28)*28 = 812, round(1000/28)*28 = 1008, 812*1008 = 818496 >
#   602112 -> beta = sqrt(800000/602112) = 1.152674; h = floor(800/1.152674/28)*28 = floor(24.787)*28 = 672,
#   w = floor(1000/1.152674/28)*28 = floor(30.984)*28 = 840. Both factors 0.84.
# grow: 50x40 at min_pixels 12544: round(40/28)*28 = 28, round(50/28)*28 = 56, 28*56 = 1568 < 12544 ->
#   beta = sqrt(12544/2000) = 2.504396; h = ceil(40*2.504396/28)*28 = ceil(3.578)*28 = 112,
#   w = ceil(50*2.504396/28)*28 = ceil(4.472)*28 = 140. Both factors 2.8.
# aspect: 100x60 at the defaults: round(60/28)*28 = 56, round(100/28)*28 = 112, 6272 within the limits:
#   W'/W = 1.12, H'/H = 56/60 = 0.9333 (the aspect ratio changes from 1.667 to 2).
# halves: 2240x1120 at max_pixels 627200: 1120*2240 = 2508800 > 627200 -> beta = sqrt(4) = 2;
#   h = floor(1120/2/28)*28 = 560, w = floor(2240/2/28)*28 = 1120. Both factors 1/2, so odd coordinates land on .5.
SCALES = {
    "shrink": ((800, 1000, *DEFAULT), ImageScale(800, 1000, 672, 840)),
    "grow": ((40, 50, 12544, 602112), ImageScale(40, 50, 112, 140)),
    "aspect": ((60, 100, *DEFAULT), ImageScale(60, 100, 56, 112)),
    "halves": ((1120, 2240, 3136, 627200), ImageScale(1120, 2240, 560, 1120)),
}

GOLDEN = [
    # 0.84: 100 200 500 700 -> 84 168 420 588; 333.0*0.84 = 279.72 -> 280, 401.4*0.84 = 337.176 -> 337.
    # Spacing, the tab, the code fence and the label stay as written; the decimals become integers.
    ("shrink", '```json\n[\n\t{"bbox_2d": [100, 200, 500, 700], "label": "car"},\n\t{"point_2d":[333.0,401.4]}\n]\n```',
     '```json\n[\n\t{"bbox_2d": [84, 168, 420, 588], "label": "car"},\n\t{"point_2d":[280,337]}\n]\n```'),
    # 2.8: the whole image 0 0 50 40 -> 0 0 140 112 (borders are inside); 12.5*2.8 = 35, 20*2.8 = 56.
    ("grow", 'All: {"bbox_2d": [0, 0, 50, 40], "label": "all"}; eye {"point_2d": [12.5, 20]}.',
     'All: {"bbox_2d": [0, 0, 140, 112], "label": "all"}; eye {"point_2d": [35, 56]}.'),
    # x*1.12, y*56/60: 10 -> 11.2 -> 11, 15 -> 14, 90 -> 100.8 -> 101, 45 -> 42; the corner (100, 60) -> (112, 56).
    ("aspect", '{"bbox_2d": [10, 15, 90, 45], "label": "a"} {"point_2d": [100, 60], "label": "corner"}',
     '{"bbox_2d": [11, 14, 101, 42], "label": "a"} {"point_2d": [112, 56], "label": "corner"}'),
    # 1/2: 3 5 7 9 -> 1.5 2.5 3.5 4.5 -> 2 2 4 4 (exact halves go to the even neighbour, computed exactly).
    ("halves", '{"bbox_2d": [3, 5, 7, 9]}', '{"bbox_2d": [2, 2, 4, 4]}'),
]


@pytest.mark.parametrize("name", list(SCALES))
def test_scales_equal_hand_computation(name):
    args, want = SCALES[name]
    assert ImageScale.of(*args) == want


@pytest.mark.parametrize("name,text,want", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_rewrites(name, text, want):
    assert to_resized(text, [SCALES[name][1]]) == want


def test_text_without_boxes_and_format_descriptions_left_alone():
    scale = SCALES["shrink"][1]
    for text in ['Output {"bbox_2d": [x1, y1, x2, y2], "label": "car"} for each car.',  # a prompt's format description
                 "<|box_start|>(100,200),(500,700)<|box_end|>",  # Qwen2-VL's 0-1000 boxes: another convention
                 "bbox_2d: [100, 200, 500, 700]", "no boxes [1, 2, 3, 4] {}"]:
        assert to_resized(text, [scale]) == text
    system = Message("system", ['Example: {"bbox_2d": [100, 200, 5000, 7000]}'])  # not an image's box: untouched
    image = Media("image", "street.png")
    user = Message("user", [image, 'Where is {"point_2d": [500, 400]}?'])
    out = rescale_messages([system, user], lambda m: scale)
    assert out[0] is system and out[1].parts == [image, 'Where is {"point_2d": [420, 336]}?']


BAD = [
    ('{"bbox_2d": [1, 2, 3]}', 1, '"bbox_2d": [1, 2, 3] must be a list of 4 numbers'),
    ('{"point_2d": [1, 2, 3]}', 1, '"point_2d": [1, 2, 3] must be a list of 2 numbers'),
    ('{"bbox_2d": [1, "2", 3, 4]}', 1, "must be a list of 4 numbers"),
    ('{"bbox_2d": [1, true, 3, 4]}', 1, "must be a list of 4 numbers"),
    ('{"bbox_2d": null}', 1, '"bbox_2d": null} must be a list of 4 numbers'),
    ('{"bbox_2d": [500, 2, 100, 4]}', 1, '"bbox_2d": [500, 2, 100, 4] is inverted: x2 < x1 or y2 < y1'),
    ('{"bbox_2d": [0, 0, 1001, 800]}', 1, "is outside its image: x2=1001 but image 1 is 1000 px wide and 800 px high"),
    ('{"point_2d": [-0.5, 3]}', 1, "is outside its image: x=-0.5"),
    ('{"point_2d": [3, 800.5]}', 1, "is outside its image: y=800.5"),
    ('{"bbox_2d": [1, 2, 3, 4], "label": "car"', 1, '"bbox_2d": [1, 2, 3, 4] is not part of valid JSON'),
    ('{"bbox_2d": [1, 2, 3, 4], "bbox_2d": [1, 2, 3, 5]}', 1, "repeated key"),
    ('{"bbox_2d": [1, 2, 3, 4], "image": 2}', 1, '"image": 2, not an image number from 1 to 1'),
    ('{"bbox_2d": [1, 2, 3, 4], "image": "a.png"}', 2, '"image": "a.png", not an image number from 1 to 2'),
    ('{"bbox_2d": [1, 2, 3, 4]}', 0, "refers to an image but the sample has none"),
    ('{"bbox_2d": [1, 2, 3, 4]}', 2, 'is ambiguous: the sample has 2 images; add "image": k'),
]


@pytest.mark.parametrize("text,n_images,reason", BAD)
def test_bad_boxes_are_named(text, n_images, reason):
    from vlft.data import BadInput

    scales = [SCALES["shrink"][1]] * n_images
    with pytest.raises(BadInput) as e:
        to_resized(text, scales)
    assert str(e.value).startswith("grounding: ") and reason in str(e.value)
    if "outside" not in reason and "inverted" not in reason:  # a malformed prediction is printed as written
        assert to_original(text, scales) == text


@pytest.mark.parametrize("name", list(SCALES))
def test_round_trip_through_back_mapping_within_one_pixel(name):
    """Original -> resized -> original (generate's --boxes original) moves an integer coordinate by at most
    (W/W' + 1)/2 pixels (docs/grounding.md): 0 when the image grows, 1 for the shrinks here (factors 1.19 and 2)."""
    scale = SCALES[name][1]
    rng = random.Random(0)
    worst = 0
    for _ in range(200):
        x1, x2 = sorted(rng.randint(0, scale.width) for _ in range(2))
        y1, y2 = sorted(rng.randint(0, scale.height) for _ in range(2))
        box = [x1, y1, x2, y2]
        text = to_resized(json.dumps({"bbox_2d": box, "label": "t"}), [scale])
        back = json.loads(to_original(text, [scale]))
        assert back["label"] == "t"
        worst = max(worst, *(abs(a - b) for a, b in zip(back["bbox_2d"], box)))
    grows = scale.resized_width >= scale.width and scale.resized_height >= scale.height
    assert worst == 0 if grows else worst <= 1


def test_round_trip_of_a_large_photo_stays_within_one_resized_pixel():
    # 4032x3024 at the defaults: beta = sqrt(4032*3024/602112) = 4.5 exactly; h = floor(3024/4.5/28)*28 = 24*28 = 672,
    # w = floor(4032/4.5/28)*28 = 32*28 = 896. One resized pixel is 4.5 original pixels: the bound is (4.5+1)/2 = 2.75.
    scale = ImageScale.of(3024, 4032, *DEFAULT)
    assert scale == ImageScale(3024, 4032, 672, 896)
    moved = []
    for x in range(0, 4033, 7):
        resized = json.loads(to_resized(json.dumps({"point_2d": [x, 0]}), [scale]))
        moved.append(abs(json.loads(to_original(json.dumps(resized), [scale]))["point_2d"][0] - x))
    assert max(moved) == 2  # the bound is reached: precision is the resized image's, not the photo's


def test_back_mapping_names_the_image_and_does_not_clamp():
    a, b = SCALES["shrink"][1], SCALES["grow"][1]
    text = '[{"bbox_2d": [84, 168, 420, 588], "image": 1}, {"point_2d": [35, 56], "image": 2}, {"point_2d": [900, 5]}]'
    # image 1: /0.84 -> 100 200 500 700; image 2: /2.8 -> 12.5 -> 12 (half to even), 20; no image named: as written
    assert to_original(text, [a, b]) == ('[{"bbox_2d": [100, 200, 500, 700], "image": 1}, '
                                         '{"point_2d": [12, 20], "image": 2}, {"point_2d": [900, 5]}]')
    assert to_original('{"point_2d": [900, 5]}', [a]) == '{"point_2d": [1071, 6]}'  # 900/0.84 = 1071.4: outside


# ------------------------------------------------------------------------------------------ through the pipeline
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def llava(images, answer: str, question: str = "Find it.") -> dict:
    return {"image": images, "conversations": [
        {"from": "human", "value": "<image>" * len(images) + question}, {"from": "gpt", "value": answer}]}


def processed(tok, tmp_path, record, **data) -> tuple[dict, DatasetConfig]:
    dc = DatasetConfig(path=str(tmp_path / "d.jsonl"), **data.pop("dataset", {}))
    sample = SampleProcessor(DataConfig(datasets=[dc], **data), tok)(record, dc, 0, where="d.jsonl line 1")
    return sample, dc


def supervised_text(tok, sample) -> str:
    labels = sample["labels"]
    return tok.decode(labels[labels != -100])


def test_training_labels_hold_the_rewritten_numbers(tok, tmp_path):
    save_image(tmp_path / "a.png", 60, 100)  # the "aspect" case: 100x60 -> 112x56
    question = 'What is at {"bbox_2d": [10, 15, 90, 45]}?'  # a referring question: rewritten in the prompt too
    sample, _ = processed(tok, tmp_path, llava(["a.png"], '{"bbox_2d": [10, 15, 90, 45], "label": "a"}', question))
    assert supervised_text(tok, sample) == '{"bbox_2d": [11, 14, 101, 42], "label": "a"}<|im_end|>'
    prompt = tok.decode(sample["input_ids"][sample["labels"] == -100])
    assert 'What is at {"bbox_2d": [11, 14, 101, 42]}?' in prompt and "[10, 15" not in prompt
    # the same record with grounding: keep trains the numbers as written
    kept, _ = processed(tok, tmp_path, llava(["a.png"], '{"bbox_2d": [10, 15, 90, 45]}'), grounding="keep")
    assert supervised_text(tok, kept) == '{"bbox_2d": [10, 15, 90, 45]}<|im_end|>'


def test_multi_image_record(tok, tmp_path):
    save_image(tmp_path / "a.png", 60, 100)  # 100x60 -> 112x56
    save_image(tmp_path / "b.png", 800, 1000, seed=1)  # 1000x800 -> 840x672
    answer = '[{"bbox_2d": [10, 15, 90, 45], "image": 1}, {"bbox_2d": [100, 200, 500, 700], "image": 2}]'
    sample, _ = processed(tok, tmp_path, llava(["a.png", "b.png"], answer))
    assert sample["image_grid_thw"].tolist() == [[1, 4, 8], [1, 48, 60]]
    assert supervised_text(tok, sample) == ('[{"bbox_2d": [11, 14, 101, 42], "image": 1}, '
                                            '{"bbox_2d": [84, 168, 420, 588], "image": 2}]<|im_end|>')
    # image 1 is 100x60: x1=100 is its right edge (allowed), y1=200 is below it
    with pytest.raises(SampleError, match=r'"bbox_2d": \[100, 200, 500, 700\] is outside its image: y1=200 but '
                                          r"image 1 is 100 px wide and 60 px high"):
        processed(tok, tmp_path, llava(["a.png", "b.png"], '{"bbox_2d": [100, 200, 500, 700], "image": 1}'))
    with pytest.raises(SampleError, match="d.jsonl line 1.*assistant text: grounding: .* is ambiguous"):
        processed(tok, tmp_path, llava(["a.png", "b.png"], '{"bbox_2d": [1, 2, 3, 4]}'))


def test_per_image_pixel_limits_decide_the_scale(tok, tmp_path):
    save_image(tmp_path / "g.png", 40, 50)  # the "grow" case needs min_pixels 12544 on this item
    record = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "g.png", "min_pixels": 12544}, "Where?"]},
        {"role": "assistant", "content": '{"point_2d": [12.5, 20]}'}]}
    sample, _ = processed(tok, tmp_path, record)
    assert supervised_text(tok, sample) == '{"point_2d": [35, 56]}<|im_end|>'
    # the dataset's own setting overrides the data section's
    sample, _ = processed(tok, tmp_path, record, grounding="keep", dataset={"grounding": "rescale"})
    assert supervised_text(tok, sample) == '{"point_2d": [35, 56]}<|im_end|>'
    sample, _ = processed(tok, tmp_path, record, dataset={"grounding": "keep"})
    assert supervised_text(tok, sample) == '{"point_2d": [12.5, 20]}<|im_end|>'


def test_boxes_follow_the_configured_decode_ceiling(tok, tmp_path):
    """The scale of a boxed image is read under data.max_decode_pixels, not the default ceiling: a user who raised it
    for a 144-Mpx scan gets the boxes rescaled, and the default still refuses it, naming the setting."""
    header_only_png(tmp_path / "scan.png", 12000, 12000)  # 144,000,000 px; the default ceiling is 134,217,728
    dc = DatasetConfig(path=str(tmp_path / "d.jsonl"))
    record = llava(["scan.png"], '{"bbox_2d": [0, 0, 6000, 6000]}')
    raised = SampleProcessor(DataConfig(datasets=[dc], max_decode_pixels=200_000_000), tok)
    (answer,) = [m for m in raised.ground(raised.messages(record, dc), dc) if m.role == "assistant"]
    assert "[0, 0, 6000, 6000]" not in str(answer.parts) and "bbox_2d" in str(answer.parts)  # rescaled
    default = SampleProcessor(DataConfig(datasets=[dc]), tok)
    with pytest.raises(BadInput, match=r"over the decode ceiling data.max_decode_pixels=134,217,728"):
        default.ground(default.messages(record, dc), dc)


def test_bad_boxes_are_skipped_counted_and_reported(tok, tmp_path, capsys):
    from vlft.cli import main as vlft

    save_image(tmp_path / "img.png", 60, 100)
    answers = ['{"bbox_2d": [10, 15, 90, 45]}', '{"bbox_2d": [10, 15, 101, 45]}', '{"bbox_2d": [90, 15, 10, 45]}',
               '{"point_2d": [50, 30]}', '{"bbox_2d": [10, 15, 90]}']
    path = write_jsonl(tmp_path / "train.jsonl", [llava(["img.png"], a) for a in answers]
                       + [{"conversations": [{"from": "human", "value": "Q"},
                                             {"from": "gpt", "value": '{"point_2d": [1, 2]}'}]}])
    ds = MixedDataset(DataConfig(datasets=[DatasetConfig(path=path, name="tr")]), tok)
    items = [ds[i] for i in range(len(ds))]
    skipped = sorted((s for s in items if isinstance(s, Skipped)), key=lambda s: s.index)
    assert [s.index for s in skipped] == [1, 2, 4, 5]
    assert str(skipped[0]) == (f'tr sample 1 ({path} line 2): assistant text: grounding: "bbox_2d": [10, 15, 101, 45] '
                               "is outside its image: x2=101 but image 1 is 100 px wide and 60 px high")
    assert "refers to an image but the sample has none" in skipped[3].reason
    counter = SkipCounter(max_fraction=1.0)
    counter.add(len(items) - len(skipped), skipped)
    assert (counter.seen, counter.bad, counter.overlength) == (6, 4, 0)

    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"datasets": [{"path": "train.jsonl", "name": "tr"}],
                                                        "tokenizer": tok.name_or_path}))
    capsys.readouterr()
    assert vlft(["data", "check", str(tmp_path / "data.yaml")]) == 1
    out = capsys.readouterr().out
    assert "samples: 6 (2 ok, 4 bad)" in out
    assert f'tr sample 2 ({path} line 3): assistant text: grounding: "bbox_2d": [90, 15, 10, 45] is inverted' in out
    assert f'tr sample 4 ({path} line 5): assistant text: grounding: "bbox_2d": [10, 15, 90] must be a list' in out


def test_setting_is_checked(tmp_path):
    from vlft.data.check import load_data_config

    (tmp_path / "d.yaml").write_text("datasets: [{path: d.jsonl, grounding: keep}]\ngrounding: off\n")
    with pytest.raises(ConfigError, match=r"data.grounding: False is not one of \['rescale', 'keep'\]"):
        load_data_config(str(tmp_path / "d.yaml"))  # YAML reads a bare off as false: hence "keep"
    cfg, _ = load_data_config(str(tmp_path / "d.yaml"), ["grounding=rescale"])
    assert cfg.grounding == "rescale" and cfg.datasets[0].grounding == "keep"


def test_generate_maps_boxes_back_to_the_image(tmp_path, monkeypatch, capsys):
    """`vlft generate --boxes original`: the reply's boxes in the --image file's pixels (the checkpoint's limits,
    3136..12544 px, resize the 100x60 image to 112x56); the default prints the reply as the model wrote it."""
    from export_fixtures import make_checkpoint
    from PIL import Image

    import vlft.generate as gen

    _, ckpt, _, _ = make_checkpoint(tmp_path / "run", steps=1)
    Image.new("RGB", (100, 60), (10, 200, 30)).save(tmp_path / "a.png")
    reply = '{"bbox_2d": [11, 14, 101, 42], "label": "a"}'
    tokenizer = tiny_tokenizer(tmp_path)

    def canned(model, input_ids, **kw):  # the model's answer, in resized pixels
        return torch.tensor([tokenizer.encode(reply)] * input_ids.shape[0])

    monkeypatch.setattr(gen, "generate", canned)
    args = ["--adapter", str(ckpt), "--image", str(tmp_path / "a.png"), "--prompt", "where?", "--attn", "eager"]
    capsys.readouterr()
    assert gen.main(args) == 0 and capsys.readouterr().out == reply + "\n"
    # /1.12 and *60/56: 11 -> 9.82 -> 10, 14 -> 15, 101 -> 90.18 -> 90, 42 -> 45
    assert gen.main(args + ["--boxes", "original"]) == 0
    assert capsys.readouterr().out == '{"bbox_2d": [10, 15, 90, 45], "label": "a"}\n'
