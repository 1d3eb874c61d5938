"""Outputs a user can share: atomically written files and run folders get the permissions a
plain create gives them, and an output that cannot be written is one clear line."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from attnflow.fileio import OutputError, atomic_dir, write_json, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_are_readable_by_others(tmp_path, umask_022):
    path = write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert _mode(path) == 0o644
    with atomic_dir(tmp_path / "run") as tmp:
        write_text(tmp / "inner.txt", "hi")
        (tmp / "plain.txt").write_text("made by open()")
        (tmp / "weights").mkdir()
        private = tmp / "weights" / "model.safetensors"  # as a library writing through mkstemp leaves it
        private.write_text("w")
        private.chmod(0o600)
    assert _mode(tmp_path / "run") == 0o755
    assert _mode(tmp_path / "run" / "inner.txt") == 0o644
    assert _mode(tmp_path / "run" / "weights" / "model.safetensors") == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_umask_is_honoured(tmp_path):
    old = os.umask(0o077)
    try:
        assert _mode(write_text(tmp_path / "private.txt", "x")) == 0o600
    finally:
        os.umask(old)


def test_a_file_where_a_folder_should_be_is_one_output_error(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(OutputError, match=r"cannot write .*blocker/x\.json"):
        write_json(tmp_path / "blocker" / "x.json", {})
    with pytest.raises(OutputError, match="cannot write"):
        with atomic_dir(tmp_path / "blocker" / "run"):
            pytest.fail("the body must not run")
    assert (tmp_path / "blocker").read_text() == "a file"


def _unprivileged() -> list[str]:
    """A prefix that runs a command without root's override of file permissions."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root needs util-linux's setpriv to test a read-only folder"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("command", [["record", "--model", "toy-llama"], ["run", "--model", "toy-llama"]])
def test_out_into_a_read_only_folder_is_one_line_and_writes_nothing(tmp_path, command):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    attnflow = str(Path(sys.executable).parent / "attnflow")
    env = {**os.environ, "ATTNFLOW_CACHE": str(tmp_path / "cache")}
    try:
        done = subprocess.run([*_unprivileged(), attnflow, *command, "--out", str(folder / "out")],
                              capture_output=True, text=True, env=env, timeout=300)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write") and str(folder) in lines[0], done.stderr
    assert list(folder.iterdir()) == []
