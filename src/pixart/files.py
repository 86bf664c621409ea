"""The permissions of the files pixart writes.

Atomic writes go through ``tempfile.mkstemp`` or ``safetensors.torch.save_file``, and both create files
with mode 0600, so without a fix every exported model and generated image would be private to its
owner whatever the user's umask. ``FILE_MODE`` is what a plain ``open()`` would give instead.
"""

from __future__ import annotations

import os


def _umask() -> int:
    # The umask can only be read by setting it; this runs once, at import, before any thread writes files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""Mode of a new file under the process's umask (0644 under the usual 022)."""
