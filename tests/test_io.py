"""Atomic writes (normquant.io): all or nothing, normal file modes, no temporaries left behind."""
import os
import stat

import pytest

from normquant.io import atomic_directory, atomic_file, atomic_write_bytes, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_replaces_with_normal_mode(tmp_path):
    path = tmp_path / "sub" / "result.json"  # parents are created
    atomic_write_text(path, "old\n")
    assert atomic_write_bytes(path, b"new\n") == path
    assert path.read_bytes() == b"new\n"
    assert _mode(path) == 0o666 & ~_umask()  # 0644 with the usual umask, not tempfile's 0600
    assert os.listdir(path.parent) == ["result.json"]


def test_failure_in_the_middle_keeps_the_old_file(tmp_path):
    path = tmp_path / "cache.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["cache.pt"]


def test_private_files_get_plain_modes(tmp_path):
    """safetensors' save_file writes 0600 files; what the helpers move into place has a plain write's modes."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    plain = 0o666 & ~_umask()
    with atomic_directory(tmp_path / "export") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x").write_text("x")
        os.chmod(tmp / "sub" / "x", 0o600)
    assert _mode(tmp_path / "export" / "model.safetensors") == plain and _mode(tmp_path / "export" / "sub" / "x") == plain
    assert _mode(tmp_path / "export") == _mode(tmp_path / "export" / "sub") == 0o777 & ~_umask()
    with atomic_file(tmp_path / "cache.pt") as tmp:
        os.unlink(tmp)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))  # a writer that replaces the file
    assert _mode(tmp_path / "cache.pt") == plain


def test_directory_appears_complete_or_not_at_all(tmp_path):
    dest = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(dest) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with atomic_directory(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".export.partial-")
        (tmp / "config.json").write_text("{}")
    assert os.listdir(dest) == ["config.json"] and os.listdir(tmp_path) == ["export"]
    assert _mode(dest / "config.json") == 0o666 & ~_umask()


def test_existing_directory_needs_force_and_survives_a_failed_replacement(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_directory(dest):
            pytest.fail("the body must not run")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(dest, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise OSError("disk full")
    assert os.listdir(dest) == ["old.txt"] and os.listdir(tmp_path) == ["export"]
    with atomic_directory(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(dest) == ["new.txt"] and os.listdir(tmp_path) == ["export"]


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "export").write_text("not a directory")
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_directory(tmp_path / "export", force=True):
            pass


def test_destination_appearing_meanwhile_is_not_overwritten(tmp_path):
    dest = tmp_path / "cache"
    with pytest.raises(FileExistsError):
        with atomic_directory(dest) as tmp:
            (tmp / "a").write_text("mine")
            dest.mkdir()
            (dest / "b").write_text("theirs")  # another process finished first
    assert os.listdir(dest) == ["b"] and os.listdir(tmp_path) == ["cache"]
