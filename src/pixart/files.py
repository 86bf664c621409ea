"""The permissions of the files and folders pixart writes.

Atomic writes go through ``tempfile.mkstemp``, ``tempfile.mkdtemp`` or ``safetensors.torch.save_file``,
which create files with mode 0600 and folders with 0700, so without a fix every exported model,
dataset and generated image would be private to its owner whatever the user's umask. ``FILE_MODE`` and
``temporary_folder`` give what a plain ``open()`` or ``mkdir()`` would instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    # The umask can only be read by setting it; this runs once, at import, before any thread writes files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_MASK = _umask()
FILE_MODE = 0o666 & ~_MASK
"""Mode of a new file under the process's umask (0644 under the usual 022)."""
DIR_MODE = 0o777 & ~_MASK
"""Mode of a new folder under the process's umask (0755 under the usual 022)."""


def temporary_folder(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A fresh folder in ``parent`` to be renamed into place once complete, with a plain folder's mode."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(folder, DIR_MODE)
    return folder
