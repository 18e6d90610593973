"""Atomic writes: a file or a directory appears complete under its name, or not at all.

Everything is first written to a temporary sibling (``.<name>.partial-<random>``, same filesystem) and then
renamed into place; on any failure (also ``KeyboardInterrupt``) the temporary is removed and an existing
destination is left as it was. What appears has the modes of a plain write: files ``0666`` and directories
``0777`` less the umask (``0644`` / ``0755``), also where a writer made them private (``tempfile``, and
safetensors 0.8's ``save_file``, create ``0600`` files). Parent directories are created as needed. The
guarantee is against failures of this process; nothing is fsync'ed.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(d / "result.json", "{}\\n").read_text()
'{}\\n'
>>> with atomic_directory(d / "export") as tmp:
...     _ = (tmp / "config.json").write_text("{}")
>>> sorted(p.name for p in d.iterdir())
['export', 'result.json']
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterator


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write (e.g. ``torch.save(obj, tmp)``); on success it replaces
    ``path``, on failure it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "partial")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # in case the writer replaced the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``dest``; once the body has filled it, rename it to ``dest``.

    An existing ``dest`` raises ``FileExistsError`` (before the body runs, and at the rename if it appeared
    meanwhile) unless ``force``: then it is moved aside only when the new directory is complete, renamed back
    if the rename fails, and deleted after. On any failure the temporary directory is removed.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a directory")
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest, "partial")
    tmp.mkdir()  # 0777 less the umask
    try:
        yield tmp
        _plain_modes(tmp, stat.S_IMODE(os.stat(tmp).st_mode))
        _move_into_place(tmp, dest, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plain_modes(root: Path, dir_mode: int) -> None:
    """Give every directory below ``root`` ``dir_mode`` and every file ``dir_mode & 0o666`` (links untouched)."""
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            if not os.path.islink(os.path.join(parent, d)):
                os.chmod(os.path.join(parent, d), dir_mode)
        for f in files:
            if not os.path.islink(os.path.join(parent, f)):
                os.chmod(os.path.join(parent, f), dir_mode & 0o666)


def _move_into_place(tmp: Path, dest: Path, force: bool) -> None:
    """Rename ``tmp`` to ``dest``; with ``force`` an existing ``dest`` is moved aside first and deleted after."""
    if not (force and dest.exists()):
        try:
            os.rename(tmp, dest)  # POSIX: fails on a non-empty directory
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{dest} exists") from None
            raise
        return
    old = _sibling(dest, "old")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old)
