"""`vlft eval --model BASE` scores a base model without a checkpoint; predictions keep the input order and the
record's own fields; the default output sits beside the checkpoint (never inside it) and is never replaced
without --overwrite."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from export_fixtures import make_checkpoint
from vlft.cli import main as vlft

KINDS = ["colour", "count", "colour", "shape", "count", "shape"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An experiment folder (relative paths) with a base, a checkpoint and an eval set whose third record is bad."""
    root = tmp_path_factory.mktemp("eval")
    base, ckpt, _, _ = make_checkpoint(root / "run", steps=1)
    rng = np.random.default_rng(0)
    rows = []
    for i, kind in enumerate(KINDS):
        image = "gone.png" if i == 2 else f"img{i}.png"
        if i != 2:
            Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(root / image)
        rows.append({"id": f"q{i}", "kind": kind, "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": f"q{i}?"}]},
            {"role": "assistant", "content": ["red", "two", "x", "round", "three cats", "a " + "very " * 30][i]}]})
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": {"path": "run/base", "dtype": "float32", "attn_implementation": "eager"},
              "lora": {"vision": ["attn.qkv"], "train_fully": ["visual.merger"]},
              "freeze": {"vision": False, "merger": False},
              "data": {"datasets": [{"path": "eval.jsonl"}], "eval_datasets": [{"path": "eval.jsonl"}],
                       "tokenizer": "run/checkpoint-0000002", "min_pixels": 3136, "max_pixels": 3136,
                       "num_workers": 0},
              "train": {"output_dir": "run"}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    return root, base, ckpt


def predictions(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def checksums(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_base_model_scored_in_input_order_with_record_fields(setup, tmp_path, monkeypatch, capsys):
    root, base, _ = setup
    monkeypatch.chdir(tmp_path)  # the YAML's relative paths resolve from its own folder
    out = tmp_path / "before"
    assert vlft(["eval", str(root / "cfg.yaml"), "--model", str(base), "--out", str(out), "--batch-size", "2",
                 "--max-new-tokens", "12"]) == 0, capsys.readouterr().err
    preds, summary = predictions(out), json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"] is None and summary["model"] == str(base)
    assert summary["samples"] == 5 and summary["skipped"] == 1 and summary["not_generated_long_answers"] == 1
    assert [p["row"] for p in preds] == list(range(6))
    assert [p["where"] for p in preds] == [f"{root / 'eval.jsonl'} line {i + 1}" for i in range(6)]
    assert [p["record"] for p in preds] == [{"id": f"q{i}", "kind": k} for i, k in enumerate(KINDS)]
    assert "image file not found" in preds[2]["skipped"] and "prompt" not in preds[2]
    assert [p["prompt"] for i, p in enumerate(preds) if i != 2] == [f"<image>q{i}?" for i in (0, 1, 3, 4, 5)]

    # the order really was changed by the eval set's shuffle, so the test above can fail
    from transformers import AutoTokenizer

    from vlft.config import load_experiment
    from vlft.data import Collator, Skipped, build_datasets
    from vlft.model import load_pretrained

    cfg = load_experiment(root / "cfg.yaml")
    tok = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    _, ev = build_datasets(cfg.data, tok)
    assert [row for _, row in ev.order] != sorted(row for _, row in ev.order)

    # the loss is the base model's token-weighted mean, computed here in one batch
    model = load_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()
    batch = Collator(model.config, tok.pad_token_id)([s for s in (ev[i] for i in range(len(ev)))
                                                      if not isinstance(s, Skipped)])
    with torch.no_grad():
        ref = model(**{k: v for k, v in batch.items() if torch.is_tensor(v)})
    assert summary["loss"] == pytest.approx(float(ref.loss_sum) / float(ref.num_label_tokens), abs=1e-5)


def test_default_output_beside_the_checkpoint_never_replaced_silently(setup, capsys):
    root, _, ckpt = setup
    args = ["eval", str(root / "cfg.yaml"), "--checkpoint", str(root / "run"), "--no-generate"]
    assert vlft(args) == 0
    out = root / "run" / f"eval-{ckpt.name}"  # beside the checkpoint: pruning it does not delete the evaluation
    assert json.loads((out / "summary.json").read_text())["checkpoint"] == str(ckpt)
    assert not (ckpt / "eval").exists() and not any(p.name.startswith("eval") for p in ckpt.iterdir())
    (out / "notes.txt").write_text("mine")
    before = checksums(out)
    capsys.readouterr()
    assert vlft(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"vlft eval: error: --out {out} already holds predictions.jsonl and "
                                          "summary.json")
    assert "--overwrite" in err and checksums(out) == before
    assert vlft(args + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and sorted(checksums(out)) == sorted(before)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_base_default_output_and_a_model_is_required(setup, capsys):
    root, base, _ = setup
    assert vlft(["eval", str(root / "cfg.yaml"), "--model", str(base), "--no-generate", "--limit", "2"]) == 0
    assert (root / "run" / "eval-base" / "summary.json").is_file()
    capsys.readouterr()
    assert vlft(["eval", str(root / "cfg.yaml")]) == 2
    assert "pass --checkpoint CKPT, or --model BASE to score a base model" in capsys.readouterr().err


def test_help_documents_max_new_tokens(capsys):
    with pytest.raises(SystemExit):
        vlft(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "longest reference answer (in tokens) that is generated and scored" in out and "default 32" in out
    assert "--model BASE" in out and "predictions.jsonl, one line per eval sample in input order" in out
