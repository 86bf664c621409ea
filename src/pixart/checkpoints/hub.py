"""The Hugging Face hub: where a hub id becomes a local folder, for every loader, with one-line errors.

Generation, the feature cache, export's base pipeline and checkpoint conversion all accept a local path
or a hub id. Each names the files it needs (``allow_patterns``), so a 20 GB release costs only the parts
used; a cached copy serves offline (``HF_HUB_OFFLINE=1``), and a missing one is a :class:`PixArtError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pixart.errors import PixArtError, first_line

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A hub repository, ``owner/name``."""

HUB_FILE = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)/([\w./-]+\.(?:pth|pt|safetensors))")
"""One checkpoint file in a hub repository, ``owner/name/path.pth``: groups (repository, file)."""

EXAMPLE_ID = "PixArt-alpha/PixArt-XL-2-1024-MS"

# fmt: off
RELEASES: dict[str, str] = {
    "PixArt-alpha/PixArt-XL-2-256x256": "α 256 px",
    "PixArt-alpha/PixArt-XL-2-SAM-256x256": "α 256 px trained on SAM only",
    "PixArt-alpha/PixArt-alpha/PixArt-XL-2-256x256-MSCOCO-FID732.pth": "α 256 px, the MSCOCO FID 7.32 weights",
    "PixArt-alpha/PixArt-XL-2-512x512": "α 512 px",
    "PixArt-alpha/PixArt-XL-2-1024-MS": "α 1024 px, multi-scale",
    "PixArt-alpha/PixArt-LCM-XL-2-1024-MS": "α 1024 px distilled for 4-step LCM sampling",
    "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512": "α 512 px distilled for one-step DMD sampling; transformer only",
    "PixArt-alpha/PixArt-ControlNet/PixArt-XL-2-512-ControlNet.pth": "α 512 px with an HED-edge ControlNet",
    "PixArt-alpha/PixArt-ControlNet/PixArt-XL-2-1024-ControlNet.pth": "α 1024 px with an HED-edge ControlNet",
    "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers": "Σ's T5 and SDXL VAE, the base for Σ transformers",
    "PixArt-alpha/PixArt-Sigma-XL-2-256x256": "Σ 256 px",
    "PixArt-alpha/PixArt-Sigma-XL-2-512-MS": "Σ 512 px, multi-scale",
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": "Σ 1024 px, multi-scale",
    "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS": "Σ 2048 px, multi-scale",
}
"""Every released PixArt checkpoint by hub id (a repository, or a file in one) and what it is; README's table of
checkpoints gives the command that runs each (the official .pth twins of the diffusers releases load alike)."""
# fmt: on


def fetch(repo_id: str, allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None) -> Path:
    """The local snapshot of a hub repository's files matching ``allow_patterns``: downloaded, or from the cache."""
    from huggingface_hub import snapshot_download

    log.info("fetching %s (%s) from the Hugging Face hub", repo_id, ", ".join(allow_patterns or ["everything"]))
    with _one_line_errors(repo_id):
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))


def fetch_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repository, downloaded or from the cache."""
    from huggingface_hub import hf_hub_download

    log.info("fetching %s from %s on the Hugging Face hub", filename, repo_id)
    with _one_line_errors(f"{repo_id}/{filename}"):
        return Path(hf_hub_download(repo_id, filename))


def resolve_pipeline(
    source: str | os.PathLike,
    allow_patterns: list[str],
    ignore_patterns: list[str] | None = None,
    *,
    what: str = "model",
) -> Path:
    """A diffusers pipeline folder for a local path or a hub id, fetching only ``allow_patterns`` from the hub.

    ``what`` names the argument in errors ("model", "base").
    """
    from pixart.demo import resolve_demo

    source = resolve_demo(source)
    path = Path(source).expanduser()
    if path.exists():
        # Folders without model_index.json but with their parts (e.g. an exported OpenVINO model) count too.
        if not ((path / "model_index.json").is_file() or (path / "text_encoder").is_dir()):
            raise PixArtError(
                f"{what} {str(source)!r} is not a diffusers pipeline folder (no model_index.json or text_encoder/)"
            )
        return path
    if not HUB_ID.fullmatch(str(source)):
        raise PixArtError(f"{what} {str(source)!r} is neither an existing folder nor a hub id such as {EXAMPLE_ID}")
    return fetch(str(source), allow_patterns, ignore_patterns)


@contextlib.contextmanager
def _one_line_errors(source: str) -> Iterator[None]:
    """Turn the hub's failures into one-line PixArtErrors naming ``source``; other errors pass through."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError:
        raise PixArtError(
            f"cannot fetch {source!r}: the hub is unreachable (offline?) and it is not cached; "
            "connect and retry, or pass a local path"
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as err:  # unknown repository or file, malformed id, disk full…
        reason = first_line(err)
        raise PixArtError(f"cannot fetch {source!r} from the hub: {reason}; pass a local path") from None
