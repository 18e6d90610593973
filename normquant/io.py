"""Atomic writes: a file or a directory appears complete under its name, or not at all.

Everything is first written to a temporary sibling (``.<name>.partial-<random>``, same filesystem) and then
renamed into place; on any failure (also ``KeyboardInterrupt``) the temporary is removed and an existing
destination is left as it was.

A process killed outright (``kill -9``, power loss) cannot clean up, so temporaries carry their owner in the name
(``.<name>.partial-<host>-<pid>-<random>``): the next atomic write into the same folder removes those whose
process is gone on this host (:func:`clean_stale`), and restores a destination that a killed ``force`` replacement
had moved aside (``.<name>.old-...``). :func:`check_destination` tells before any long work whether a
destination can be written (not a file, writable, enough free space). What appears has the modes of a plain write: files ``0666`` and directories
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
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class DestinationError(ValueError):
    """A destination that cannot be written (a file in the way, read-only, not enough space); says what to do."""


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}$")


def _sibling(path: Path, kind: str) -> Path:
    """``.<name>.<kind>-<host>-<pid>-<random>`` next to ``path``: the owner is in the name (see :func:`clean_stale`)."""
    return path.parent / f".{path.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that dead processes of this host left in ``folder``; return what was cleaned.

    Only names of the form :func:`_sibling` writes are touched, and only when their process (pid in the name)
    no longer exists: a run still writing keeps its files. A ``.<name>.old-*`` directory (a ``force`` replacement
    killed between its two renames) is renamed back to ``<name>`` when that is missing, else deleted.
    """
    folder = Path(folder)
    cleaned: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return cleaned
    host = _host()
    for entry in entries:
        m = _STALE.match(entry.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        path = folder / entry.name
        try:
            dest = folder / m["name"]
            if m["kind"] == "old" and not dest.exists() and not dest.is_symlink():
                os.replace(path, dest)
                log.warning("restored %s, which an interrupted --force replacement had moved aside", dest)
            else:
                _remove(path)
                log.info("removed %s, left by a normquant process (pid %s) that no longer runs", path, m["pid"])
        except OSError:  # another process cleaned it first, or no permission: leave it
            continue
        cleaned.append(path)
    return cleaned


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def check_destination(path: str | os.PathLike, *, force: bool = False, exist_ok: bool = False, need_bytes: int = 0,
                      what: str = "export directory") -> Path:
    """Check, before any long work, that directory ``path`` can be written; return it.

    Refuses (:class:`DestinationError`, ``FileExistsError`` for an existing directory without ``force`` /
    ``exist_ok``) a path that is a file or sits under one, a folder that cannot be written (tried with a probe
    file, so read-only mounts and ACLs count, also for root), and less free space than ``need_bytes``. Creates
    nothing that stays.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise DestinationError(f"{what} {path} exists and is not a directory; remove it or choose another path")
        if not (force or exist_ok):
            raise FileExistsError(f"{what} {path} exists; pass --force to overwrite")
    base = path if exist_ok and path.is_dir() else _existing_ancestor(path.parent)
    if not base.is_dir():
        raise DestinationError(f"cannot create {what} {path}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".normquant-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DestinationError(f"cannot write {what} {path}: {base} is not writable ({e.strerror or e}); "
                               "choose a writable location") from None
    if need_bytes > 0:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise DestinationError(f"not enough free space for {what} {path}: it needs at least {_size(need_bytes)}, "
                                   f"{base} has {_size(free)} free; free some space or choose another location")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write (e.g. ``torch.save(obj, tmp)``); on success it replaces
    ``path``, on failure it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
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
    clean_stale(dest.parent)
    if dest.exists() and not force:  # clean_stale may have restored it
        raise FileExistsError(f"{dest} exists")
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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoint manifests, cache stamps, resume files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
