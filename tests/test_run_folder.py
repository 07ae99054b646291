"""A run folder belongs to one run: a new run never deletes or mixes another run's checkpoints and metrics, never
writes into a folder of someone's other files, and `checkpoint.resume=auto` continues the run that is there."""

from __future__ import annotations

import hashlib
import json

import pytest
from test_train_helpers import run_in_process, run_signalled_at, workspace

from vlft.run_folder import MARKER, RunFolderError, check_run_folder, complete_checkpoints, prune


def _tree(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_refuses_the_folder_of_another_run(tmp_path):
    path, _ = workspace(tmp_path, train={"max_steps": 3}, checkpoint={"every": 1, "keep_last": 2})
    run_in_process(path)
    out = tmp_path / "out"
    before = _tree(out)
    with pytest.raises(RunFolderError) as e:
        run_in_process(path, "train.max_steps=1")
    message = str(e.value)
    for option in ("checkpoint.resume=auto", "another train.output_dir", "train.overwrite_output_dir=true"):
        assert option in message
    assert "checkpoint-0000003" in message
    assert _tree(out) == before  # nothing deleted, replaced or appended


def test_the_cli_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    from vlft.cli import main

    path, _ = workspace(tmp_path, train={"max_steps": 1})
    assert main(["train", str(path)]) == 0
    before = _tree(tmp_path / "out")
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlft train: error: train.output_dir:") and "Traceback" not in err
    assert _tree(tmp_path / "out") == before


def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path):
    path, cfg = workspace(tmp_path, train={"max_steps": 1})
    data_dir = tmp_path / "data"  # holds the user's train.jsonl, media and tokenizer
    (data_dir / "config.yaml").write_text("my own notes\n")
    before = _tree(data_dir)
    with pytest.raises(RunFolderError, match="no vlft run wrote"):
        run_in_process(path, f"train.output_dir={data_dir}")
    with pytest.raises(RunFolderError, match="no vlft run wrote"):  # overwriting cannot apply to foreign files
        run_in_process(path, f"train.output_dir={data_dir}", "train.overwrite_output_dir=true")
    assert _tree(data_dir) == before


def test_overwrite_replaces_only_what_the_old_run_wrote(tmp_path):
    path, _ = workspace(tmp_path, train={"max_steps": 2}, checkpoint={"every": 1, "keep_last": 0})
    run_in_process(path)
    out = tmp_path / "out"
    (out / "eval-checkpoint-0000002").mkdir()  # what `vlft eval` writes beside the checkpoints: not the run's
    (out / "eval-checkpoint-0000002" / "summary.json").write_text("{}")
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    run_in_process(path, "train.max_steps=1", "train.overwrite_output_dir=true")
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-0000001"]
    assert json.loads((out / "run.json").read_text())["run_id"] != old_id
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    assert (out / "eval-checkpoint-0000002" / "summary.json").is_file()


def test_resume_continues_the_run_and_metrics_hold_each_step_once(tmp_path):
    path, _ = workspace(tmp_path, train={"max_steps": 4}, checkpoint={"every": 1, "keep_last": 1})
    first = run_signalled_at(path, 5)  # SIGTERM during step 3: the step ends, steps 1-3 are logged and saved
    out = tmp_path / "out"
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    # a crash after a logged but unsaved step leaves a metric the resume will repeat
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": first["state"]["step"] + 1, "split": "train", "loss": 9.9}) + "\n")
        f.write('{"step": 9, "split": "tra')  # and a record cut short by a kill in the middle of its write
    run_in_process(path, "checkpoint.resume=auto")
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-0000004"]


def test_pruning_keeps_other_runs_checkpoints(tmp_path):
    for step, run in ((1, "other"), (2, "mine"), (3, "mine"), (4, "mine")):
        folder = tmp_path / f"checkpoint-{step:07d}"
        folder.mkdir()
        (folder / MARKER).write_text("")
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "run_id": run}))
    prune(tmp_path, keep_last=1, run_id="mine")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-0000001", "checkpoint-0000004"]


def test_folder_verdicts(tmp_path):
    assert check_run_folder(tmp_path / "new", None, False) == "new"
    (tmp_path / "empty").mkdir()
    assert check_run_folder(tmp_path / "empty", None, False) == "new"
    started = tmp_path / "started"  # a run that died before its first metric: nothing to keep
    started.mkdir()
    (started / "run.json").write_text('{"run_id": "x"}')
    (started / "config.yaml").write_text("")
    assert check_run_folder(started, None, False) == "overwrite"
    assert check_run_folder(started, "auto", False) == "continue"
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="not a folder"):
        check_run_folder(tmp_path / "file", None, False)
