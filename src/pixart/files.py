"""The permissions of the files and folders pixart writes, and the atomic writes that give them.

Atomic writes go through ``tempfile.mkstemp``, ``tempfile.mkdtemp`` or ``safetensors.torch.save_file``,
which create files with mode 0600 and folders with 0700, so without a fix every exported model,
dataset and generated image would be private to its owner whatever the user's umask. ``file_mode``,
``atomic_write``, ``temporary_folder``, ``plain_modes``, ``swap_into_place`` and ``new_folder`` give what a plain
``open()`` or ``mkdir()`` would instead.

A rename is atomic but not durable by itself: after a power cut the new name can point at blocks that were
never written. ``fsync_path`` and ``fsync_tree`` flush files and folders to the disk before the rename that
publishes them (and the parent folder after it, so the rename itself is kept).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pixart.errors import PixArtError

OUT_OF_SPACE = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit hit"}


def umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (Linux 4.7+)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere it can only be read by setting it; restored at once (another thread creating a file in between
    # would get the usual 022 for that moment).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file under the process's umask (0644 under the usual 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Mode of a new folder under the process's umask (0755 under the usual 022)."""
    return 0o777 & ~umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write`` fill a hidden temporary file next to ``path`` (its folder made if missing), then rename it
    into place with a plain file's mode (:func:`file_mode`).

    A write that fails or is killed never leaves a half-written file at ``path`` nor loses the one there;
    a failure also removes the temporary file (a kill leaves it, hidden, as ``.NAME.XXXXXXXX.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # after writing: safetensors recreates the file with 0600
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's content (a folder's: its names) from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)  # fsync needs no write access, and folders open only read-only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """:func:`fsync_path` every file and folder in ``folder``, ``folder`` itself last (symbolic links skipped)."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(root)


def temporary_folder(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A fresh folder in ``parent`` to be renamed into place once complete, with a plain folder's mode."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(folder, dir_mode())
    return folder


def plain_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it a plain folder's / file's mode before it is renamed into place:
    files that safetensors or mkstemp wrote in it are 0600. Symbolic links are skipped, as chmod would follow them.
    """
    dirs_mode, files_mode = dir_mode(), file_mode()
    os.chmod(folder, dirs_mode)
    for root, dirs, files in os.walk(folder):
        for names, mode in ((dirs, dirs_mode), (files, files_mode)):
            for name in names:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, mode)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` (from ``temporary_folder`` beside ``out``) to ``out``, with plain modes.

    A rename cannot replace a non-empty folder, so an existing ``out`` is moved aside first and deleted last:
    a reader sees the old folder or the new one, never a mix or neither for longer than between two renames.
    Everything in it gets a plain file's or folder's mode first: copied parts keep their source's (a private
    0600 cache stays private) and safetensors writes 0600.
    """
    plain_modes(tmp)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_folder(out: Path, what: str) -> Iterator[Path]:
    """Write the folder ``out`` as a whole: the block fills the temporary sibling it is given, which then replaces
    ``out`` (plain modes, flushed to the disk before the rename).

    Any failure, or an interrupt, removes the temporary folder and leaves ``out`` as it was, so no reader ever
    finds a half-written folder; a full disk is one PixArtError line naming ``what``. A kill leaves the
    temporary folder, hidden, as ``.NAME.XXXXXXXX.tmp``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_is_one_line(what, out.parent):
        tmp = temporary_folder(out.parent, f".{out.name}.", ".tmp")
        try:
            yield tmp
            plain_modes(tmp)
            fsync_tree(tmp)
            swap_into_place(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(out.parent)  # keeps the rename itself across a power cut


def require_writable_folder(path: Path, option: str) -> None:
    """Make the folder ``path`` if missing and check that a file can be created in it, so that a long job that
    writes there is refused at its start rather than at its first save. ``option`` names it in the error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PixArtError(
            f"{option}={str(path)!r} is not a folder this process can write to ({err.strerror or err}); "
            "pass a writable folder"
        ) from None


def out_of_space(err: BaseException) -> str | None:
    """Why a write failed for lack of space ("disk full", "disk quota exceeded", "file size limit hit"), or None.

    The OS error may sit anywhere behind ``err``: torch.save raises a RuntimeError whose context is the OSError of
    the file it wrote to; safetensors keeps only Rust's text "(os error N)"."""
    while err is not None:
        if isinstance(err, OSError) and err.errno is not None:
            return OUT_OF_SPACE.get(err.errno)
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found:
            return OUT_OF_SPACE.get(int(found.group(1)))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def disk_full_is_one_line(
    what: str, folder: str | os.PathLike, advice: Callable[[], str] = lambda: "free some space and run again"
) -> Iterator[None]:
    """Turn a full disk (or quota, or file size limit) while writing ``what`` into ``folder`` into one PixArtError
    line with the space left and ``advice()`` (called once the write failed); other failures keep their traceback."""
    try:
        yield
    except Exception as err:
        reason = out_of_space(err)
        if reason is None:
            raise
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
        left = f" ({size_text(free)} free)" if free is not None else ""
        raise PixArtError(f"{reason} while writing {what} in {folder}{left}; {advice()}") from None


def size_text(n: int) -> str:
    """A byte count for people: 1.2 GB, 340.0 kB, 12 bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
