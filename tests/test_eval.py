"""`vlft eval`: token-weighted loss equal to a direct computation, greedy answers scored by exact match / contains,
long answers left out of accuracy, predictions jsonl + summary json."""

import json

import numpy as np
import torch
import yaml
from PIL import Image

from export_fixtures import make_checkpoint
from vlft.cli import main as vlft
from vlft.config import load_experiment
from vlft.data import Collator, build_datasets
import vlft.evaluate as evaluate
from vlft.evaluate import main, match, split_last_reply
from vlft.generate import generate, stop_ids

QUESTIONS = [("what colour?", "red"), ("how many?", "three cats"), ("describe it", "a " + "very " * 30 + "long answer")]


def write_set(path, answers, root):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": f"img{i}.png"},
                                                         {"type": "text", "text": q}]},
                          {"role": "assistant", "content": a}]} for i, (q, a) in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_match_rules():
    assert match("Red.", "red") == (True, True)
    assert match("it is  RED", "red") == (False, True)
    assert match("blue", "red") == (False, False)


def test_eval_end_to_end(tmp_path, capsys, monkeypatch):
    base, ckpt, peft_model, _ = make_checkpoint(tmp_path / "run", steps=1)
    rng = np.random.default_rng(0)
    for i in range(len(QUESTIONS)):
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    write_set(tmp_path / "eval.jsonl", QUESTIONS, tmp_path)
    config = {"model": {"path": str(base), "dtype": "float32", "attn_implementation": "eager"},
              "lora": {"vision": ["attn.qkv"], "train_fully": ["visual.merger"]},
              "freeze": {"vision": False, "merger": False},
              "data": {"datasets": [{"path": str(tmp_path / "eval.jsonl")}],
                       "eval_datasets": [{"path": str(tmp_path / "eval.jsonl")}],
                       "tokenizer": str(ckpt), "min_pixels": 3136, "max_pixels": 12544, "num_workers": 0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "eval"
    assert main([str(tmp_path / "cfg.yaml"), "--checkpoint", str(ckpt), "--out", str(out), "--batch-size", "2",
                 "--max-new-tokens", "12"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert summary["samples"] == 3 and summary["generated"] == 2 and summary["not_generated_long_answers"] == 1
    assert sorted(p["reference"] for p in preds) == sorted(a for _, a in QUESTIONS)
    assert {p["prompt"] for p in preds} == {f"<image>{q}" for q, _ in QUESTIONS}

    # the loss is the token-weighted mean over the eval set, as vlft base + adapter computes it in one batch
    cfg = load_experiment(tmp_path / "cfg.yaml")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    _, ev = build_datasets(cfg.data, tok)
    batch = Collator(peft_model.config, tok.pad_token_id)([ev[i] for i in range(len(ev))])
    with torch.no_grad():
        ref = peft_model(**{k: v for k, v in batch.items() if torch.is_tensor(v)}).loss.item()
    assert abs(summary["loss"] - ref) < 1e-5

    # the predictions are the greedy answers to the prompts
    gen = next(i for i, p in enumerate(preds) if "prediction" in p)
    prompt, _ = split_last_reply(ev[gen]["input_ids"], ev[gen]["labels"])
    media = {k: ev[gen][k] for k in ("pixel_values", "image_grid_thw")}
    new = generate(peft_model, prompt[None], **media, max_new_tokens=12, eos_token_id=stop_ids(tok, peft_model))
    kept = new[0].tolist()
    kept = kept[:next((j for j, t in enumerate(kept) if t in stop_ids(tok, peft_model)), len(kept))]
    assert preds[gen]["prediction"] == tok.decode(kept, skip_special_tokens=True)

    # scoring, with answers chosen for it: "Red." is exact for "red", "there are three cats" contains "three cats"
    canned = {"what colour?": "Red.", "how many?": "there are three cats"}

    def canned_generate(model, input_ids, **kw):
        rows = [tok(canned[evaluate.prompt_text(tok, r).split(">")[-1]]).input_ids for r in input_ids]
        n = max(len(r) for r in rows)
        return torch.tensor([r + [tok.pad_token_id] * (n - len(r)) for r in rows])

    monkeypatch.setattr(evaluate, "generate", canned_generate)
    assert main([str(tmp_path / "cfg.yaml"), "--checkpoint", str(ckpt), "--out", str(out), "--max-new-tokens",
                 "12", "--overwrite"]) == 0
    preds = {p["prompt"]: p for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert preds["<image>what colour?"]["exact"] and preds["<image>what colour?"]["contains"]
    assert not preds["<image>how many?"]["exact"] and preds["<image>how many?"]["contains"]
    assert "prediction" not in preds[f"<image>{QUESTIONS[2][0]}"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["exact_match"], summary["contains"], summary["generated"]) == (0.5, 1.0, 2)
    capsys.readouterr()
    assert vlft(["eval", str(tmp_path / "cfg.yaml"), "data.eval_datasets=[]", "--checkpoint", str(ckpt)]) == 2
    assert "no eval set" in capsys.readouterr().err
