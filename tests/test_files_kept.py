"""No command overwrites or deletes a file it did not create: `--make-tiny-data` refuses a user's folder, and an export
cleans only the working folders of exports whose process is gone (and keeps them next to the output, not in /tmp)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import tempfile

import pytest

import vlft.export as export
from export_fixtures import make_checkpoint
from test_train_helpers import run_in_process, workspace
from vlft.cli import main as vlft


def tree(folder) -> dict[str, str]:
    """Every file under `folder` with its checksum (the listing and the contents)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ 2. tiny data
def test_make_tiny_data_refuses_a_users_folder(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "media").mkdir()
    (folder / "train.jsonl").write_text('{"my": "own data"}\n')
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    (folder / "media" / "img1.png").write_bytes(b"my picture")
    before = tree(folder)
    assert vlft(["train", "--make-tiny-data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err == (f"vlft train: error: --make-tiny-data {folder}: the folder is not empty and was not written by "
                   "--make-tiny-data; nothing was written (choose an absent or empty folder)\n")
    assert tree(folder) == before  # same files, same bytes, nothing added


def test_make_tiny_data_writes_an_absent_empty_or_its_own_folder(tmp_path, capsys):
    folder = tmp_path / "tiny"
    assert vlft(["train", "--make-tiny-data", str(folder)]) == 0
    first = tree(folder)
    assert "train.jsonl" in first and ".vlft-tiny-data" in first
    (folder / "notes.txt").write_text("mine")
    assert vlft(["train", "--make-tiny-data", str(folder)]) == 0  # its own folder: written again, same bytes
    assert tree(folder) == {**first, "notes.txt": hashlib.sha256(b"mine").hexdigest()}
    (tmp_path / "empty").mkdir()
    assert vlft(["train", "--make-tiny-data", str(tmp_path / "empty")]) == 0
    assert tree(tmp_path / "empty") == first


# ------------------------------------------------------------------------------------------ 9. export leftovers
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"), steps=0)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_export_removes_working_folders_of_dead_exports_only(run, tmp_path):
    base, ckpt, _, _ = run
    host, dead = socket.gethostname(), dead_pid()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stale = [f".merged.tmp-{host}-{dead}", f".merged.base-{host}-{dead}", f".merged.tmp-{dead}"]
        kept = [f".merged.tmp-otherhost-{dead}",  # another machine sharing the disk: its process cannot be checked
                f".merged.tmp-{host}-{alive.pid}",  # an export still running
                f".other.tmp-{host}-{dead}",  # another output's
                ".merged.tmp-notapid", "merged.tmp-1"]  # not a name exports use
        for name in stale + kept:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"half written")
        export.export_merged(str(ckpt), str(tmp_path / "merged"), base=str(base))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["merged"])
        assert all((tmp_path / name / "model.safetensors").read_bytes() == b"half written" for name in kept)
    finally:
        alive.kill()
        alive.wait()


def test_a_previous_output_moved_aside_is_put_back(tmp_path, capsys):
    out, dead = tmp_path / "merged", dead_pid()
    old = tmp_path / f".merged.old-{socket.gethostname()}-{dead}"
    old.mkdir()
    (old / "config.json").write_text("previous export")
    export.clean_stale(out)  # killed between moving the old output aside and renaming the new one in
    assert (out / "config.json").read_text() == "previous export" and not old.exists()
    assert "restored" in capsys.readouterr().err
    old.mkdir()
    (old / "config.json").write_text("replaced export")
    export.clean_stale(out)  # killed after the new output was in place: the old one goes
    assert (out / "config.json").read_text() == "previous export" and not old.exists()


def test_preset_base_is_rebuilt_next_to_the_output_not_in_tmp(tmp_path, monkeypatch):
    path, _ = workspace(tmp_path, ["text", "image"] * 2, train={"max_steps": 1, "gradient_accumulation": 1})
    run_in_process(path)
    before = set(os.listdir(tempfile.gettempdir()))
    seen = []
    merge_into = export.merge_into

    def watching(base, adapter, out, dtype, *args):
        seen.append(sorted(p.name for p in (tmp_path / "exports").iterdir()))
        return merge_into(base, adapter, out, dtype, *args)

    monkeypatch.setattr(export, "merge_into", watching)
    export.export_merged(str(tmp_path / "out"), str(tmp_path / "exports" / "merged"))
    me = f"{socket.gethostname()}-{os.getpid()}"
    assert seen == [[f".merged.base-{me}", f".merged.tmp-{me}"]]  # the rebuilt base and the output being written
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["merged"]
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("vlft-base-")]
