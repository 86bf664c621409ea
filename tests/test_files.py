"""pixart.files: atomic writes and the modes of what pixart writes, against the umask read independently here."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from pixart.errors import PixArtError
from pixart.files import atomic_write, new_folder, plain_modes, swap_into_place, temporary_folder


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def assert_plain_modes(folder: Path) -> None:
    """``folder`` and everything in it have the modes mkdir() and open() give, not mkdtemp's 0700 or
    mkstemp's and safetensors' 0600."""
    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        expected = 0o777 & ~mask if path.is_dir() else 0o666 & ~mask
        assert mode(path) == expected, f"{path}: {oct(mode(path))}, not {oct(expected)}"


def test_atomic_write_gives_open_s_mode_whatever_the_writer_makes(tmp_path):
    def private(tmp: Path) -> None:
        tmp.write_text("new")
        os.chmod(tmp, 0o600)  # as safetensors and mkstemp leave a file

    path = atomic_write(tmp_path / "out.txt", private)
    assert path == tmp_path / "out.txt" and path.read_text() == "new"
    assert mode(path) == 0o666 & ~umask()
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old")
    seen = []

    def fails_halfway(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, fails_halfway)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".out.txt.")  # hidden, next to the target


def test_plain_modes_covers_the_whole_folder_but_not_link_targets(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    folder = temporary_folder(tmp_path, ".out.", ".tmp")
    (folder / "sub").mkdir(mode=0o700)
    for file in (folder / "weights.safetensors", folder / "sub" / "state.json"):
        file.write_text("{}")
        os.chmod(file, 0o600)
    (folder / "link").symlink_to(outside)
    os.chmod(folder, 0o700)

    plain_modes(folder)
    mask = umask()
    assert mode(folder) == mode(folder / "sub") == 0o777 & ~mask
    assert mode(folder / "weights.safetensors") == mode(folder / "sub" / "state.json") == 0o666 & ~mask
    assert mode(outside) == 0o600


def test_swap_into_place_replaces_a_folder_whole_with_plain_modes(tmp_path):
    out = tmp_path / "pipeline"
    for version in ("old", "new"):
        tmp = temporary_folder(tmp_path, ".pipeline.", ".tmp")
        (tmp / "transformer").mkdir(mode=0o700)
        (tmp / "transformer" / "weights.safetensors").write_text(version)
        os.chmod(tmp / "transformer" / "weights.safetensors", 0o600)  # as safetensors writes it
        if version == "old":
            (tmp / "only-in-old.txt").write_text("stale")
        swap_into_place(tmp, out)
        assert not tmp.exists()
        assert (out / "transformer" / "weights.safetensors").read_text() == version
        assert_plain_modes(out)
        assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]  # nothing moved aside is left behind
    assert not (out / "only-in-old.txt").exists()  # replaced whole, not merged


@pytest.mark.parametrize("error", [OSError("mid-write"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_new_folder_publishes_a_whole_folder_or_nothing(tmp_path, error):
    out = tmp_path / "pipeline"
    with new_folder(out, "the pipeline") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".pipeline.")
        (tmp / "weights.bin").write_text("old")
    assert [p.name for p in out.iterdir()] == ["weights.bin"]
    with pytest.raises(type(error)), new_folder(out, "the pipeline") as tmp:
        (tmp / "weights.bin").write_text("new")
        raise error
    assert (out / "weights.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_new_folder_says_a_full_disk_in_one_line(tmp_path):
    with pytest.raises(PixArtError, match=r"^disk full while writing the pipeline in .* free\); free some space"):
        with new_folder(tmp_path / "pipeline", "the pipeline"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_modes_follow_the_umask_in_force_when_writing_not_at_import(tmp_path):
    from pixart.files import umask as pixart_umask

    before = os.umask(0o027)  # a user who tightens the umask after pixart was imported
    try:
        assert pixart_umask() == 0o027
        path = atomic_write(tmp_path / "tight.txt", lambda tmp: tmp.write_text("x"))
        folder = temporary_folder(tmp_path, ".t.")
        assert mode(path) == 0o640 and mode(folder) == 0o750
    finally:
        os.umask(before)
