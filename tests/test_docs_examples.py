"""The worked examples of docs/ recomputed with vlft's code, and the docs/ sections the code cites exist.

Each page's `example:` blocks are read from the page itself (format: docs/README.md), so a page and its test cannot
drift apart. The numbers on the pages were derived by hand from the rules written there; where a page gives
transformers' values too, they are compared with transformers here.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from model_fixtures import make_pair, media_inputs, sequence, tiny_config

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


# ============================================================================= reading the pages
def examples(page: str) -> dict[str, dict]:
    """{name: {key: value}} of a page's example blocks."""
    found = {}
    for block in re.findall(r"```text\n(example: .*?)```", (DOCS / page).read_text(), re.S):
        lines = block.strip().splitlines()
        values: dict = {}
        for line in lines[1:]:
            key, sep, value = line.partition(" = ")
            if sep:
                values[key.strip()] = ast.literal_eval(value.strip())
            else:
                key, _, value = line.partition(":")
                values[key.strip()] = [int(x) for x in value.replace("|", " ").split()]
        found[lines[0].split(":", 1)[1].strip()] = values
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_page_has_a_worked_example():
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    assert pages and all(examples(p) for p in pages), [p for p in pages if not examples(p)]


def test_cited_doc_sections_exist():
    """Every docs/<page>.md#<section> written in the code, tests, configs or docs points at a real heading."""
    cited = []
    for folder in ("vlft", "recipes", "tests", "configs", "launch", "docs"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".sh", ".json") and path.is_file():
                text = path.read_text()
                cited += [(path, m) for m in re.findall(r"docs/([\w-]+\.md(?:#[\w-]+)?)", text)]
                if path.parent == DOCS:  # links between pages: (page.md#section) and page.md#section in prose
                    cited += [(path, m) for m in re.findall(r"(?<![/\w])([a-z]+\.md(?:#[\w-]+)?)", text)]
    assert len(cited) > 20
    bad = []
    for path, ref in cited:
        page, _, anchor = ref.partition("#")
        if not (DOCS / page).is_file() or (anchor and anchor not in anchors(DOCS / page)):
            bad.append(f"{path.relative_to(REPO)}: {ref}")
    assert not bad, bad


# ============================================================================= overview.md
def test_overview_image_through_the_pipeline():
    from PIL import Image

    from vlft.data.image import HUB_MAX_PIXELS, HUB_MIN_PIXELS, MERGE_SIZE, process_image, smart_resize
    from vlft.model.vision_index import merged_tokens

    ex = examples("overview.md")["image-375x500"]
    h, w = ex["height_width"]
    assert smart_resize(h, w, HUB_MIN_PIXELS, HUB_MAX_PIXELS) == ex["resized"]
    pixels, grid = process_image(Image.new("RGB", (w, h), (200, 30, 90)))
    assert grid.tolist() == [ex["grid_thw"]] and list(pixels.shape) == [ex["pixel_rows"], 1176]
    assert merged_tokens(grid, MERGE_SIZE) == ex["tokens"]


# ============================================================================= vision.md
@pytest.mark.parametrize("name", list(examples("vision.md")))
def test_vision_windows(name):
    from vlft.model import preset
    from vlft.model.vision_index import full_cu_seqlens, window_index

    ex = examples("vision.md")[name]
    v = preset("7B").vision
    index, cu_window = window_index(ex["grids"], v.spatial_merge_size, v.window_size // v.spatial_merge_size
                                    // v.patch_size)
    assert cu_window == ex["cu_window_seqlens"]
    assert full_cu_seqlens(ex["grids"]) == ex["cu_seqlens"]
    if "window_index" in ex:
        assert index.tolist() == ex["window_index"]
    for position, cell in ex.get("window_index_from", {}).items():
        assert index[position].item() == cell


# ============================================================================= rotary.md
def test_rotary_vision_ids():
    from vlft.model.vision_index import rotary_pos_ids

    ex = examples("rotary.md")["vision-ids-1x4x4"]
    assert [tuple(r) for r in rotary_pos_ids(ex["grids"], 2).tolist()] == ex["ids"]


def test_rotary_mrope_angles():
    from vlft.model.text import mrope_cos_sin

    ex = examples("rotary.md")["mrope-4-2-3"]
    pos = torch.tensor(ex["position_thw"]).view(3, 1, 1)
    cos, sin = mrope_cos_sin(pos, ex["head_dim"], ex["theta"], ex["mrope_section"], torch.float32)
    half = ex["head_dim"] // 2
    for j, angle in ex["angles"].items():
        assert cos[0, 0, j].item() == pytest.approx(math.cos(angle), abs=1e-6), j
        assert sin[0, 0, j].item() == pytest.approx(math.sin(angle), abs=1e-6), j
        assert sin[0, 0, j + half].item() == sin[0, 0, j].item()  # the second half repeats the first


# ============================================================================= positions.md
def _rope_inputs(cfg, ex: dict) -> dict:
    inp = media_inputs(cfg, ex["parts"], pad_side=ex.get("padding", "right"))
    if "second_per_grid_ts" in ex:
        inp["second_per_grid_ts"] = torch.tensor(ex["second_per_grid_ts"])
    return inp


@pytest.mark.parametrize("name", ["A", "B", "B2", "C"])
def test_positions(name):
    from vlft.model import get_rope_index

    cfg = tiny_config()
    ex = examples("positions.md")[name]
    inp = _rope_inputs(cfg, ex)
    pos, deltas = get_rope_index(cfg, inp["input_ids"], inp.get("image_grid_thw"), inp.get("video_grid_thw"),
                                 inp.get("second_per_grid_ts"), inp["attention_mask"])
    rows = {k: v for k, v in ex.items() if re.fullmatch(r"[thw]\d?", k)}
    assert rows
    for key, want in rows.items():
        sample = int(key[1:] or 0)
        assert pos["thw".index(key[0]), sample].tolist() == want, key
    assert deltas.tolist() == ex["rope_deltas"]


def test_positions_where_transformers_differs():
    ex = examples("positions.md")["B"]
    model, hf = make_pair()
    inp = _rope_inputs(model.config, ex)
    ref, ref_deltas = hf.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], None, inp["video_grid_thw"],
                                              inp["second_per_grid_ts"], inp["attention_mask"])
    tail = ex["transformers_5_24_tail"]
    for row in range(3):
        assert ref[row, 0, :-len(tail)].tolist() == ex["thw"[row]][:-len(tail)]  # equal up to the video's end
        assert ref[row, 0, -len(tail):].tolist() == tail
    assert ref_deltas.tolist() == ex["transformers_5_24_deltas"]


def test_positions_during_generation():
    from types import SimpleNamespace

    from vlft.generate import generate

    cfg = tiny_config()
    ex = examples("positions.md")["generation"]
    inp = _rope_inputs(cfg, ex)
    seen = []

    def fake_model(ids, position_ids=None, **_):
        if ids.shape[1] == 1:  # a decoding step (the prefill feeds the whole prompt): record the token's position
            assert (position_ids == position_ids[0]).all()  # the same id in the three rows
            seen.append(int(position_ids[0, 0, 0]))
        logits = torch.zeros(ids.shape[0], 1, cfg.text.vocab_size)
        return SimpleNamespace(logits=logits)

    fake_model.config = cfg
    fake_model.lm_head = SimpleNamespace(weight=torch.zeros(1))  # generate allocates its cache in the head's dtype
    generate(fake_model, inp["input_ids"], inp["attention_mask"], pixel_values=inp["pixel_values"],
             image_grid_thw=inp["image_grid_thw"], max_new_tokens=len(ex["decode_positions"]) + 1, pad_token_id=0)
    assert seen == ex["decode_positions"]


# ============================================================================= numerics.md
def test_numerics_inv_freq_stays_float32():
    from vlft.model import build_model
    from vlft.model.text import rope_inv_freq

    ex = examples("numerics.md")["inv-freq-bf16"]
    inv = rope_inv_freq(40, 10000.0, torch.device("cpu"))  # the tower's 20 frequencies (head dim 80)
    assert inv.dtype == torch.float32 and inv[1].item() == pytest.approx(ex["inv_freq_1"], abs=1e-7)
    assert inv[1].to(torch.bfloat16).item() == ex["inv_freq_1_bf16"]
    assert ex["row"] * inv[1].item() == pytest.approx(ex["angle"], abs=1e-4)
    assert ex["row"] * ex["inv_freq_1_bf16"] == ex["angle_bf16"]
    # nothing for `.to(bfloat16)` to round: the model holds no floating-point buffers
    model = build_model(tiny_config()).to(torch.bfloat16)
    assert not [n for n, b in model.named_buffers() if b.is_floating_point()]


# ============================================================================= checkpoints.md
def test_checkpoint_key_renames():
    from vlft.export import to_v5_key
    from vlft.model.weights import to_hub_key

    for v5, hub in examples("checkpoints.md")["keys"]["v5_to_hub"].items():
        assert to_hub_key(v5) == hub and to_hub_key(hub) == hub and to_v5_key(hub) == v5


def test_checkpoint_sharding(tmp_path):
    import json

    from vlft.model.weights import write_shards

    ex = examples("checkpoints.md")["shards"]
    write_shards({k: torch.zeros(n, dtype=torch.uint8) for k, n in ex["sizes"].items()}, tmp_path,
                 ex["max_shard_size"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": ex["total_size"]}, "weight_map": ex["weight_map"]}


def test_checkpoint_tied_head(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlft.model import build_model, load_pretrained, save_pretrained

    ex = examples("checkpoints.md")["tied"]
    torch.manual_seed(0)
    save_pretrained(build_model(tiny_config(tie=True)), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert ex["not_written"] not in state
    state[ex["not_written"]] = torch.randn_like(state["model.embed_tokens.weight"])  # a stale stored head
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_pretrained(tmp_path, dtype=torch.float32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == ex["head_is_embedding"]
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_checkpoint_model_sizes():
    from vlft.model import build_model, preset

    ex = examples("checkpoints.md")["sizes"]
    for name, count in ex["parameters"].items():
        model = build_model(preset(name), device="meta")
        assert sum(p.numel() for p in model.parameters()) == count, name
        tower = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
        assert tower == ex["tower_and_merger"][name], name


# ============================================================================= loss.md
def test_loss_normalised_over_the_accumulated_batch():
    ex = examples("loss.md")["accumulation"]
    model, _ = make_pair()
    g = torch.Generator().manual_seed(0)
    L = 8
    ids = torch.randint(0, 250, (len(ex["supervised_per_sample"]), L), generator=g)
    labels = torch.full_like(ids, -100)
    for b, n in enumerate(ex["supervised_per_sample"]):
        if n:
            labels[b, L - n:] = ids[b, L - n:]  # the last n tokens are supervised targets
    N = sum(ex["supervised_per_sample"])
    assert N == ex["N"]
    with torch.no_grad():
        whole = model(ids, labels=labels)  # one micro-batch holding every sample: the mean over its N tokens
        parts = [model(ids[mb], labels=labels[mb], num_items_in_batch=N) for mb in ex["micro_batches"]]
    assert [int(p.num_label_tokens) for p in parts] == ex["supervised_per_sample"]
    assert int(whole.num_label_tokens) == N
    assert sum(p.loss for p in parts).item() == pytest.approx(whole.loss.item(), rel=1e-6)
    mean_of_means = sum(p.loss_sum / p.num_label_tokens for p in parts if p.num_label_tokens) / 3
    assert abs(mean_of_means.item() - whole.loss.item()) > 1e-3  # the other normalisation is really different


# ============================================================================= packing.md
def test_packing_fill():
    from vlft.data.packing import pack_first_fit
    from vlft.data.sampler import PlanSettings, fill, plan_epoch

    ex = examples("packing.md")["fill"]
    assert pack_first_fit(ex["lengths"], ex["capacity"]) == ex["rows"]
    plan = plan_epoch(ex["lengths"], PlanSettings(1, ex["capacity"], packing=True), epoch=0)
    assert sorted(map(sorted, plan)) == sorted(map(sorted, ex["rows"]))  # the same rows, in shuffled order
    assert fill(plan, ex["lengths"], ex["capacity"], 1) == pytest.approx(ex["fill"], abs=1e-4)


def test_packing_row():
    from vlft.data.collator import sample_position_ids
    from vlft.data.packing import cu_seqlens_for_rows

    ex = examples("packing.md")["row"]
    model, _ = make_pair()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    samples = [torch.tensor(sequence(cfg, parts, gen)) for parts in ex["parts"]]
    lengths = [len(s) for s in samples]
    cu = cu_seqlens_for_rows([lengths], ex["row_length"])
    assert cu.dtype == torch.int32 and cu.tolist() == ex["cu_seqlens"]
    grids = [[p[1] for p in parts if not isinstance(p, int)] for parts in ex["parts"]]  # images, per sample
    pos = torch.cat([sample_position_ids(cfg, {"input_ids": s, "image_grid_thw": torch.tensor(g) if g else None})
                     for s, g in zip(samples, grids)], 1)
    for row in range(3):
        assert pos[row].tolist() == ex["thw"[row]]

    pad = ex["row_length"] - sum(lengths)
    ids = torch.cat(samples + [torch.zeros(pad, dtype=torch.long)])[None]
    labels = torch.full_like(ids, -100)
    start = 0
    for s, supervised in zip(samples, ex["supervised"]):
        for i in supervised:
            labels[0, start + i] = s[i]
        start += len(s)
    position_ids = torch.cat([pos, torch.ones(3, pad, dtype=torch.long)], 1)[:, None]
    grids = [g for per_sample in grids for g in per_sample]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=gen)
    with torch.no_grad():
        out = model(ids, labels=labels, position_ids=position_ids, cu_seqlens=cu, pixel_values=pixels,
                    image_grid_thw=torch.tensor(grids))
    assert int(out.num_label_tokens) == ex["num_label_tokens"]


# ============================================================================= grounding.md
@pytest.mark.parametrize("name", list(examples("grounding.md")))
def test_grounding_trained_text(name, tmp_path):
    """The page's records through the data pipeline: the resized sizes, and the assistant labels hold the rewritten
    boxes, byte for byte."""
    from data_fixtures import save_image, tiny_tokenizer

    from vlft.data import DataConfig, DatasetConfig, SampleProcessor, smart_resize

    ex = examples("grounding.md")[name]
    cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path / "d.jsonl"))])
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 602112)  # the defaults the page computes with
    content = []
    for k, ((h, w), lo) in enumerate(zip(ex["image_hw"], ex["min_pixels"])):
        assert smart_resize(h, w, lo, cfg.max_pixels) == ex["resized_hw"][k]
        save_image(tmp_path / f"{k}.png", h, w, seed=k)
        content.append({"type": "image", "image": f"{k}.png", "min_pixels": lo})
    record = {"messages": [{"role": "user", "content": content + [{"type": "text", "text": "Locate them."}]},
                           {"role": "assistant", "content": ex["answer"]}]}
    tok = tiny_tokenizer(tmp_path)
    sample = SampleProcessor(cfg, tok)(record, cfg.datasets[0], 0)
    assert sample["image_grid_thw"].tolist() == [[1, h // 14, w // 14] for h, w in ex["resized_hw"]]
    labels = sample["labels"]
    assert tok.decode(labels[labels != -100]) == ex["trained"] + "<|im_end|>"
