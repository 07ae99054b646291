"""Training on a streamed dataset (vlft/data/streaming.py): on 2 processes every rank runs the same steps, no sample
is seen twice in an epoch, the stream starts again when it ends, and a resume reproduces the per-step losses; packed
windows resume exactly too."""

from __future__ import annotations

import json

import pytest
import yaml
from test_train_helpers import launch, run_in_process, run_signalled_at, tiny_config, workspace

from vlft.train_cli import make_tiny_data

N = 40  # records; 2 ranks x 1 sample per micro-batch: 20 steps per pass over the stream


def _launch(config, out_json, *overrides) -> dict:
    launch("tests/launched_step_checks.py", "stream", config, out_json, *overrides)
    return json.loads(out_json.read_text())


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


@pytest.mark.slow
def test_two_processes_stream_each_sample_once_per_epoch_and_resume_exactly(tmp_path):
    data = make_tiny_data(tmp_path / "data", ["text", "image", "video", "image+video"] * (N // 4))
    cfg = tiny_config(tmp_path, data, train={"output_dir": str(tmp_path / "full"), "max_steps": 25,
                                             "micro_batch_size": 1, "gradient_accumulation": 1},
                      checkpoint={"every": 12, "keep_last": 0}, optim={"schedule": "constant"})
    cfg["data"]["datasets"][0]["streaming"] = True
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full = _launch(path, tmp_path / "full.json")["ranks"]

    assert [r["steps"] for r in full] == [25, 25] and len(full[0]["seen"]) == len(full[1]["seen"]) == 25
    first_epoch = [index for rank in full for epoch, index in rank["seen"] if epoch == 0]
    assert sorted(first_epoch) == list(range(N))  # the whole stream once, split between the ranks
    assert {epoch for rank in full for epoch, _ in rank["seen"]} == {0, 1}  # and read again after it ended

    out = tmp_path / "resumed"
    resumed = _launch(path, tmp_path / "resumed.json", f"checkpoint.resume={tmp_path / 'full' / 'checkpoint-0000012'}",
                      f"train.output_dir={out}")["ranks"]
    assert [r["steps"] for r in resumed] == [13, 13]
    assert [r["seen"] for r in resumed] == [rank["seen"][12:] for rank in full]
    reference = _losses(tmp_path / "full")
    assert _losses(out) == pytest.approx({k: v for k, v in reference.items() if k > 12}, abs=1e-6)


def test_packed_stream_resumes_with_the_same_losses(tmp_path, monkeypatch):
    path, _ = workspace(tmp_path, ["text", "image", "video", "text"] * 6,
                        data={"packing": True, "max_length": 256, "packing_window": 10},
                        train={"micro_batch_size": 1, "gradient_accumulation": 2, "max_steps": 6})
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["datasets"][0]["streaming"] = True
    path.write_text(yaml.safe_dump(cfg))
    full = run_in_process(path, f"train.output_dir={tmp_path / 'full'}", "lora.dropout=0.1")

    out = tmp_path / "cut"
    first = run_signalled_at(path, 5, f"train.output_dir={out}", "lora.dropout=0.1")  # SIGTERM during step 3
    assert first["state"]["step"] == 3
    second = run_in_process(path, f"train.output_dir={out}", "lora.dropout=0.1", "checkpoint.resume=auto")
    assert first["losses"] + second["losses"] == pytest.approx(full["losses"], abs=1e-6)
    assert max(r["supervised_tokens"] for r in full["steps"]) > 0


def test_data_check_reads_a_streamed_set(tmp_path, capsys):
    from vlft.cli import main

    data = make_tiny_data(tmp_path / "data", ["text", "image", "video", "image+video"] * 2)
    cfg = tiny_config(tmp_path, data, train={"max_steps": 2})
    cfg["data"]["datasets"][0]["streaming"] = True
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "samples: 8 (8 ok, 0 bad)" in out and "streamed datasets are planned window by window" in out
