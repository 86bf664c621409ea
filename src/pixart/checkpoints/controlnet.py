"""ControlNet checkpoints: the released α ControlNet ``.pth`` layout and ours (the branch alone, as safetensors).

The released ``PixArt-XL-2-{512,1024}-ControlNet.pth`` hold ``{"state_dict": …}`` with the frozen base model under
``base_model.*`` and the branch under ``controlnet.i.copied_block.*``, ``controlnet.0.before_proj.*`` and
``controlnet.i.after_proj.*``: the names :class:`pixart.model.controlnet.PixArtControlNet` uses, so the branch loads
as it stands. The base weights are not used (the base is loaded on its own), only read to check that the branch was
made for this base. Ours is one .safetensors with the branch's tensors and the base config and block count in its
metadata, which :func:`save_controlnet` writes. :func:`save_official_controlnet` writes the released layout, base
included: the official demo and inference scripts build the whole model from that one file. A bundled ControlNet's
name (``demo-layout``) reads the shipped file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from pixart.checkpoints.common import file_size, load_safetensors, safetensors_metadata, save_with_config
from pixart.checkpoints.hub import HUB_FILE, fetch_file
from pixart.checkpoints.official import config_from_state_dict, read_pth, to_official_state_dict, write_pth
from pixart.demo import BUNDLED_CONTROLNETS
from pixart.errors import PixArtError
from pixart.files import disk_full_is_one_line
from pixart.model.config import PixArtConfig
from pixart.model.controlnet import PixArtControlNet
from pixart.model.transformer import PixArtTransformer

log = logging.getLogger(__name__)

CONTROLNET_FORMAT = "pixart-controlnet"
BASE_PREFIX, BRANCH_PREFIX = "base_model.", "controlnet."


def describe(config: PixArtConfig) -> str:
    """What a ControlNet must match of its base, in words: family, training size, width and depth."""
    return f"PixArt-{config.family} {config.sample_size * 8} px (width {config.hidden_size}, {config.depth} blocks)"


def check_base(stated: PixArtConfig, base: PixArtConfig, what: str) -> None:
    """Refuse a ControlNet made for another family, size, width or depth than the base it would steer."""
    fields = ("family", "sample_size", "hidden_size", "depth")
    if any(getattr(stated, name) != getattr(base, name) for name in fields):
        raise PixArtError(f"{what} is a ControlNet for {describe(stated)}, but the model is {describe(base)}")


def load_controlnet(
    path: str | os.PathLike,
    base: PixArtConfig | None = None,
    *,
    num_heads: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PixArtControlNet:
    """A ControlNet branch from a released-layout .pth or our .safetensors, checked against the base config.

    ``base`` is the config of the model it will steer; None takes the config the file states (ours) or
    infers from its ``base_model.*`` weights (official, with ``num_heads``, which weights do not record, for a width
    no release has), as conversion does. dtype defaults to float32.
    """
    given = str(path)
    path = controlnet_file(path)
    if not path.is_file():
        raise PixArtError(
            f"ControlNet {path} does not exist (expected an official .pth or a pixart .safetensors, "
            f"or a bundled one: {', '.join(BUNDLED_CONTROLNETS)})"
        )
    if path.suffix in (".pth", ".pt"):
        branch, stated = _read_official(path, base.num_heads if base is not None else num_heads)
    elif path.suffix == ".safetensors":
        branch, stated = _read_ours(path)
    else:
        raise PixArtError(f"cannot load ControlNet {path}: expected an official .pth/.pt or a pixart .safetensors")
    if stated is not None and base is not None:
        check_base(stated, base, given if given in BUNDLED_CONTROLNETS else path.name)
    config = base or stated
    if config is None:
        raise PixArtError(f"{path} holds no base_model weights to tell its model from; load it with a base config")
    width = branch.get(f"{BRANCH_PREFIX}0.after_proj.weight", torch.empty(0, 0)).shape[-1]
    if width != config.hidden_size:
        raise PixArtError(f"{path.name} is a ControlNet of width {width}, but the model is {describe(config)}")
    num_blocks = len({key.split(".")[1] for key in branch})
    with torch.device("meta"):  # shapes only: the file's tensors are assigned below
        net = PixArtControlNet(config, num_blocks)
    expected = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(branch)), sorted(set(branch) - set(expected))
    wrong = [key for key in expected.keys() & branch.keys() if tuple(branch[key].shape) != expected[key]]
    if missing or unexpected or wrong:
        first = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}")
        first = first or f"{wrong[0]} of shape {tuple(branch[wrong[0]].shape)}, expected {expected[wrong[0]]}"
        raise PixArtError(f"{path.name} does not fit a {num_blocks}-block ControlNet of {describe(config)}: {first}")
    net.load_state_dict(branch, strict=True, assign=True)
    log.info("loaded ControlNet %s (%d copied blocks, %s)", path, num_blocks, file_size(path))
    return net.to(device=device, dtype=dtype or torch.float32).eval()


def controlnet_file(path: str | os.PathLike) -> Path:
    """The file a ControlNet argument names: a bundled ControlNet's name, ``owner/name/file.pth`` on the hub
    (downloaded) or a path, as given."""
    path = Path(path).expanduser()
    if not path.exists() and str(path) in BUNDLED_CONTROLNETS:
        return BUNDLED_CONTROLNETS[str(path)]
    if not path.is_file() and (file := HUB_FILE.fullmatch(str(path))):  # owner/name/file.pth on the hub
        return fetch_file(file.group(1), file.group(2))
    return path


def _read_official(path: Path, num_heads: int | None) -> tuple[dict[str, torch.Tensor], PixArtConfig | None]:
    """The branch tensors of a released-layout .pth and the base config its ``base_model.*`` weights show
    (with num_heads, which weights do not record, from the base it will steer)."""
    state_dict, saved = read_pth(path, ema=False)
    branch = {key: value for key, value in state_dict.items() if key.startswith(BRANCH_PREFIX)}
    if not branch:
        raise PixArtError(f"{path} holds no ControlNet branch (controlnet.N.* keys); is it a base model checkpoint?")
    base = {key.removeprefix(BASE_PREFIX): value for key, value in state_dict.items() if key.startswith(BASE_PREFIX)}
    other = [key for key in state_dict if not key.startswith((BASE_PREFIX, BRANCH_PREFIX))]
    if other:
        raise PixArtError(f"{path} is not a ControlNet checkpoint: unexpected key {other[0]}")
    if not base:
        log.info("%s holds the branch alone: its family and size cannot be checked, only its width", path.name)
        return branch, None
    # Files save_official_controlnet wrote state their family, which a model without micro-conditions, KV
    # compression or a released caption length does not show; the released files need none of this.
    family = saved.get("family")
    return branch, config_from_state_dict(base, name=path.name, num_heads=num_heads, saved=saved, family=family)


def _read_ours(path: Path) -> tuple[dict[str, torch.Tensor], PixArtConfig]:
    metadata = safetensors_metadata(path)
    if metadata.get("format") != CONTROLNET_FORMAT:
        raise PixArtError(f"{path} is not a pixart ControlNet (written by save_controlnet or `pixart convert`)")
    try:
        stated = PixArtConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError):
        raise PixArtError(f"{path} has a broken config in its metadata") from None
    return load_safetensors(path), stated


def save_controlnet(net: PixArtControlNet, path: str | os.PathLike) -> Path:
    """Save in our format: one .safetensors with the branch's tensors and its base config in the metadata."""
    return save_with_config(net, path, CONTROLNET_FORMAT)


def save_official_controlnet(net: PixArtControlNet, base: PixArtTransformer, path: str | os.PathLike) -> Path:
    """Save in the released ``PixArt-XL-2-*-ControlNet.pth`` layout: ``base_model.*`` (the base as the official code
    names it, ``pos_embed`` included) beside ``controlnet.*``, since the official scripts load both from this file."""
    check_base(net.config, base.config, "the branch")
    state_dict = {BASE_PREFIX + key: value for key, value in to_official_state_dict(base).items()}
    state_dict.update(net.state_dict())  # its keys are already the released controlnet.N.* names
    return write_pth(state_dict, base.config, path)


def convert_controlnet(
    source: str | os.PathLike, dest: str | os.PathLike, *, overwrite: bool = False, num_heads: int | None = None
) -> Path:
    """Our .safetensors (the branch alone, its base config inside) of a released-layout ControlNet .pth."""
    dest = Path(dest)
    if dest.suffix != ".safetensors":
        raise PixArtError(f"output {dest} does not fit a pixart ControlNet: expected a .safetensors file")
    if dest.exists() and not overwrite:
        raise PixArtError(f"output {dest} already exists; pass overwrite (--overwrite) to replace it")
    net = load_controlnet(source, num_heads=num_heads)
    with disk_full_is_one_line(f"the ControlNet {dest.name}", dest.parent):
        return save_controlnet(net, dest)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a ControlNet file's bytes (named as :func:`load_controlnet` takes it), read in chunks: a
    released ControlNet is gigabytes."""
    with open(controlnet_file(path), "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
