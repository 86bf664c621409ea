"""Our official-layout state dicts against the key names and shapes of the released checkpoints.

The JSON files in ``shared/official-keys`` (beside the repository) list every key and shape that the
official PixArt-α / PixArt-Σ code builds for each released model at full size; they were written from
that code, not from ours. Models are built on the meta device, so XL-2 size costs no memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixart import PixArtConfig, PixArtTransformer, preset
from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.official import config_from_state_dict, to_official_state_dict
from pixart.model.config import sigma_kv_compress

ROOT = Path(__file__).resolve().parents[1]


def _repository(root: Path) -> Path:
    """The checkout shared/ sits beside: a linked git worktree's is its main checkout."""
    git = root / ".git"
    if git.is_file():  # "gitdir: <main checkout>/.git/worktrees/<name>"
        return Path(git.read_text().removeprefix("gitdir:").strip()).parents[2]
    return root


KEYS = _repository(ROOT).parent / "shared" / "official-keys"

RELEASED = {
    "PixArt-XL-2-256x256": preset("alpha-256"),
    "PixArt-XL-2-512x512": preset("alpha-512"),
    "PixArt-XL-2-1024-MS": preset("alpha-1024-ms"),
    "PixArt-Sigma-XL-2-256x256": preset("sigma-256"),
    "PixArt-Sigma-XL-2-512-MS": preset("sigma-512-ms"),
    "PixArt-Sigma-XL-2-1024-MS": preset("sigma-1024-ms"),
    "PixArt-Sigma-XL-2-2K-MS": preset("sigma-2k-ms"),
    # Not released: the Σ code's KV compression (×2 on layers 14-27) with qk-norm, to show those keys.
    "PixArt-Sigma-XL-2-1024-MS-kv-compress-example": preset("sigma-1024-ms").replace(
        kv_compress=sigma_kv_compress(), qk_norm=True
    ),
}
CONTROLNET_BASES = {
    "PixArt-XL-2-512-ControlNet": "PixArt-XL-2-512x512",
    "PixArt-XL-2-1024-ControlNet": "PixArt-XL-2-1024-MS",
}

pytestmark = pytest.mark.skipif(not KEYS.is_dir(), reason=f"no official key lists at {KEYS}")


def official_shapes(model: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, shape in json.loads((KEYS / f"{model}.json").read_text())["keys"].items()}


def our_official_shapes(config: PixArtConfig) -> dict[str, tuple[int, ...]]:
    """Key → shape of what `pixart convert --to official` writes for a model of this config."""
    with torch.device("meta"):
        model = PixArtTransformer(config)
    return {key: tuple(tensor.shape) for key, tensor in to_official_state_dict(model).items()}


def test_every_released_model_has_a_key_list():
    # A new JSON in shared/ must get a preset here (or a ControlNet base), not be skipped silently.
    assert {p.stem for p in KEYS.glob("*.json")} == set(RELEASED) | set(CONTROLNET_BASES)


@pytest.mark.parametrize("model", RELEASED)
def test_our_official_layout_has_the_released_keys_and_shapes(model):
    ours, theirs = our_official_shapes(RELEASED[model]), official_shapes(model)
    assert sorted(set(theirs) - set(ours)) == []  # missing in ours
    assert sorted(set(ours) - set(theirs)) == []  # not in the official model
    assert {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]} == {}


@pytest.mark.parametrize("model", RELEASED)
def test_the_released_keys_load_as_their_preset(model, tmp_path):
    """A released file's layout ({"state_dict": …} of exactly those keys and shapes) loads as its preset."""
    state_dict = {key: torch.empty(shape, device="meta") for key, shape in official_shapes(model).items()}
    assert config_from_state_dict(state_dict) == RELEASED[model]  # from the keys and shapes alone
    # Meta tensors survive torch.save and torch.load: the whole loader runs with no weights in memory.
    torch.save({"state_dict": state_dict}, tmp_path / "released.pth")  # a name that says nothing
    loaded = load_transformer(tmp_path / "released.pth")
    assert loaded.config == RELEASED[model]
    kept = {k: v for k, v in official_shapes(model).items() if k != "pos_embed"}  # ours is recomputed per size
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == kept


@pytest.mark.parametrize("controlnet", CONTROLNET_BASES)
def test_controlnet_base_model_is_the_alpha_model(controlnet):
    keys = official_shapes(controlnet)
    base = {k.removeprefix("base_model."): v for k, v in keys.items() if k.startswith("base_model.")}
    assert base == official_shapes(CONTROLNET_BASES[controlnet])
    assert base == our_official_shapes(RELEASED[CONTROLNET_BASES[controlnet]])
    # the rest is the branch, for the ControlNet loader (a later issue) to map
    assert {k.split(".")[0] for k in keys} == {"base_model", "controlnet"}
