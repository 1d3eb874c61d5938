"""Atomic file writing shared by every stage: a reader sees the old file or the whole new one.

Everything is written to a temporary sibling and renamed into place; on any error (including
Ctrl-C) the temporary is removed and the target is left as it was. What lands gets the
permissions a plain ``open``/``mkdir`` would give it (the umask's), not the private ones of
a temporary file, so runs can be shared. A target that cannot be written is one
``OutputError`` naming it, raised before anything is computed into it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attnflow.errors import UserError


class OutputError(UserError, OSError):
    """An output path that cannot be written (read-only folder, a file in the way...)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share(path: Path, mode: int) -> None:
    """Give ``path`` the permissions a plain create would have (``mode`` less the umask)."""
    os.chmod(path, mode & ~_umask())


def ensure_writable(path: Path) -> None:
    """Create ``path``'s folder, or raise one OutputError saying why it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: its folder {path.parent} is not writable")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``."""
    path = Path(path)
    ensure_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _share(Path(tmp), 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(source: "str | Path | dict[str, Any]", error: type[Exception], what: str) -> tuple[Any, str]:
    """(data, a name for messages) of a dict (as it is) or a JSON file; a file that cannot be
    read or parsed raises ``error`` naming it as a ``what``."""
    if isinstance(source, dict):
        return source, "<dict>"
    try:
        return json.loads(Path(source).read_text()), str(source)
    except (OSError, json.JSONDecodeError) as exc:
        raise error(f"{str(source)!r} is not a readable {what}: {exc}") from None


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN refused: JSON has none) atomically."""
    return write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it replaces ``out`` whole."""
    out = Path(out)
    ensure_writable(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-new-", dir=out.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):  # libraries that write through mkstemp (safetensors) leave 0600 files
            _share(path, 0o777 if path.is_dir() else 0o666)
        _share(tmp, 0o777)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
