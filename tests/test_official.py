"""Official-layout checkpoints (issue #25): everything is read from the weights, nothing guessed silently.

Each checkpoint here is built the way the official code saves one: ``{"state_dict": …}`` with the
official keys (tests/test_official_keys.py checks our names against the released lists) and a
``pos_embed`` buffer computed by :func:`official_pos_embed`, a NumPy transcription of the official
sin-cos formula (shared/PIXART_FACTS.md), not by our code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixart import PixArtConfig, PixArtError, PixArtTransformer
from pixart.checkpoints.convert import convert_checkpoint, load_transformer
from pixart.cli import main as cli_main
from pixart.model.config import parse_kv_compress

TINY = dict(hidden_size=144, depth=2, num_heads=4, caption_channels=32, patch_size=2)


def official_pos_embed(dim: int, grid: int, scale: float) -> torch.Tensor:
    """(1, grid², dim): the official get_2d_sincos_pos_embed at its training grid (base size = grid)."""
    pos = np.arange(grid, dtype=np.float32) / np.float32(grid / grid) / np.float32(scale)
    rows, cols = np.meshgrid(pos, pos, indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def axis(p: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", p.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([axis(cols), axis(rows)], axis=1)).float()[None]


def official_checkpoint(path, config: PixArtConfig, scale: float | None, seed: int = 0, **extra) -> dict:
    """Write an official .pth of random weights for config, pos_embed at ``scale`` (None: no buffer)."""
    torch.manual_seed(seed)
    state_dict = PixArtTransformer(config).state_dict()
    with torch.no_grad():
        for tensor in state_dict.values():
            tensor.add_(torch.randn_like(tensor) * 0.05)
    if scale is not None:
        state_dict["pos_embed"] = official_pos_embed(config.hidden_size, config.base_size, scale)
    torch.save({"state_dict": state_dict, **extra}, path)
    return state_dict


def alpha(image_size: int, **changes) -> PixArtConfig:
    sample_size = image_size // 8
    return PixArtConfig(family="alpha", sample_size=sample_size, pe_scale=1.0, model_max_length=120, **TINY, **changes)


def sigma(image_size: int, **changes) -> PixArtConfig:
    sample_size = image_size // 8
    return PixArtConfig(family="sigma", sample_size=sample_size, pe_scale=1.0, model_max_length=300, **TINY, **changes)


def round_trip_is_exact(source, tmp_path, **load_kwargs) -> None:
    """convert --to official of source gives back every tensor bit for bit, pos_embed included."""
    out = convert_checkpoint(source, tmp_path / "again.pth", "official", **load_kwargs)
    before = torch.load(source, weights_only=True)["state_dict"]
    after = torch.load(out, weights_only=True)["state_dict"]
    assert sorted(before) == sorted(after)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


# 1. position-embedding scale from the buffer --------------------------------------------------------


@pytest.mark.parametrize(
    "config, scale",
    [
        (alpha(256), 0.5),  # the table says 1.0
        (sigma(1024), 1.0),  # the table says 2.0
        (sigma(512), 0.7),  # no table has it
    ],
)
def test_pe_scale_is_read_from_the_pos_embed_buffer(tmp_path, caplog, config, scale):
    path = tmp_path / "model.pth"
    stored = official_checkpoint(path, config, scale)
    with caplog.at_level("INFO", logger="pixart.checkpoints"):
        model = load_transformer(path, num_heads=4)
    assert model.config.pe_scale == scale
    assert f"position-embedding scale {scale:g} (read from its pos_embed)" in caplog.text
    # the model embeds its training grid exactly as the official code did
    assert torch.equal(model.pos_embed(config.base_size, config.base_size, "cpu"), stored["pos_embed"])
    round_trip_is_exact(path, tmp_path, num_heads=4)


def test_pe_scale_argument_overrides_the_buffer_and_the_table_serves_without_one(tmp_path, caplog):
    path = tmp_path / "model.pth"
    official_checkpoint(path, alpha(256), 0.5)
    with caplog.at_level("WARNING", logger="pixart.checkpoints"):
        assert load_transformer(path, num_heads=4, pe_scale=1.0).config.pe_scale == 1.0
    assert "scale 1 as given, not 0.5 its pos_embed holds" in caplog.text

    official_checkpoint(tmp_path / "bare.pth", sigma(1024), None)
    with caplog.at_level("INFO", logger="pixart.checkpoints"):
        assert load_transformer(tmp_path / "bare.pth", num_heads=4, image_size=1024).config.pe_scale == 2.0
    assert "scale 2 (PixArt-sigma's at 1024 px; pass pe_scale if wrong)" in caplog.text


def test_a_pos_embed_matching_no_scale_is_refused(tmp_path):
    config = alpha(256)
    state_dict = official_checkpoint(tmp_path / "model.pth", config, 1.0)
    state_dict["pos_embed"] = torch.randn_like(state_dict["pos_embed"])
    torch.save({"state_dict": state_dict}, tmp_path / "model.pth")
    with pytest.raises(PixArtError, match=r"pos_embed matches no position-embedding scale.*--pe-scale") as info:
        load_transformer(tmp_path / "model.pth", num_heads=4)
    assert "\n" not in str(info.value)


# 2. head count ----------------------------------------------------------------------------------------


def test_head_count_is_never_guessed_from_an_unreleased_width(tmp_path):
    path = tmp_path / "model.pth"
    official_checkpoint(path, alpha(512), 1.0)  # width 144, 4 heads: width / 72 would say 2
    with pytest.raises(PixArtError, match=r"width 144 is no release's.*pass num_heads \(--num-heads\)") as info:
        load_transformer(path)
    assert "\n" not in str(info.value)
    model = load_transformer(path, num_heads=4)
    assert model.config.num_heads == model.blocks[0].attn.num_heads == 4
    round_trip_is_exact(path, tmp_path, num_heads=4)
    # what we write keeps the count beside the weights, so our own files need no flag
    assert load_transformer(tmp_path / "again.pth").config.num_heads == 4


# 3. masks with fewer rows than the batch -----------------------------------------------------------


@pytest.mark.parametrize("length", [7, 8])
def test_a_one_row_mask_is_repeated_over_the_batch_as_the_official_model_does(length):
    torch.manual_seed(0)
    model = PixArtTransformer(alpha(256, micro_conditions=False)).eval()
    for block in model.blocks:  # zero-initialised projections would hide the text path
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.1)
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, length, 32)
    row = torch.tensor([[1.0] * 5 + [0.0] * (length - 5)])
    with torch.no_grad():
        one_row = model(x, torch.tensor([10.0, 10.0]), y, row)
        per_sample = model(x, torch.tensor([10.0, 10.0]), y, torch.cat([row, row]))
    assert torch.equal(one_row, per_sample)
    with pytest.raises(PixArtError, match=r"text mask of shape \(3, \d\) does not fit captions"):
        model(x, torch.tensor([10.0, 10.0]), y, torch.ones(3, length))


# 4. any base size ----------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [384, 768])
def test_any_base_size_the_pos_embed_shows_loads(tmp_path, image_size):
    path = tmp_path / "model.pth"
    official_checkpoint(path, sigma(image_size), image_size / 512)
    config = load_transformer(path, num_heads=4).config
    assert (config.sample_size, config.pe_scale) == (image_size // 8, image_size / 512)
    round_trip_is_exact(path, tmp_path, num_heads=4)


def test_convert_cli_takes_any_image_size_and_the_new_flags(tmp_path):
    official_checkpoint(tmp_path / "bare.pth", alpha(768), None)
    out = tmp_path / "out.safetensors"
    argv = ["convert", str(tmp_path / "bare.pth"), str(out), "--to", "pixart", "--image-size", "768"]
    assert cli_main([*argv, "--num-heads", "4", "--pe-scale", "1.5", "--kv-compress", "uniform:2:1"]) == 0
    config = load_transformer(out).config
    assert (config.sample_size, config.pe_scale, config.num_heads) == (96, 1.5, 4)
    assert (config.kv_compress, config.kv_compress_sampling) == ({1: 2}, "uniform")


# 5. weightless KV compression and EMA weights -------------------------------------------------------


def reference_self_attention(attn, x: torch.Tensor, hw: tuple[int, int], keep) -> torch.Tensor:
    """Softmax attention written out, with keys and values reduced on the grid by ``keep``."""
    b, n, c = x.shape
    heads = attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
    k, v = (keep(t.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2) for t in (k, v))
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize(
    "sampling, keep",
    [
        ("uniform", lambda t: t[:, :, ::2, ::2]),  # official: every r-th row and column
        ("ave", lambda t: t[:, :, ::2, ::2]),  # official: nearest resize by 1/r, the same tokens on an even grid
    ],
)
def test_weightless_kv_compression_matches_a_written_out_reference(sampling, keep):
    torch.manual_seed(0)
    model = PixArtTransformer(sigma(256, kv_compress={1: 2}, kv_compress_sampling=sampling)).eval()
    attn = model.blocks[1].attn
    assert not hasattr(attn, "sr")  # no weights: nothing in a checkpoint shows it
    x = torch.randn(2, 6 * 4, 144)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (6, 4)), reference_self_attention(attn, x, (6, 4), keep))


def test_nearest_resize_of_an_odd_grid_picks_the_official_rows():
    torch.manual_seed(0)
    model = PixArtTransformer(sigma(256, kv_compress={0: 2}, kv_compress_sampling="ave")).eval()
    attn, x = model.blocks[0].attn, torch.randn(1, 5 * 5, 144)
    with torch.no_grad():
        expected = reference_self_attention(attn, x, (5, 5), lambda t: F.interpolate(t, size=(2, 2), mode="nearest"))
        torch.testing.assert_close(attn(x, (5, 5)), expected)


def test_kv_compression_setting_is_taken_from_the_user_and_kept(tmp_path, caplog):
    path = tmp_path / "model.pth"
    official_checkpoint(path, sigma(512), 1.0)
    plain = load_transformer(path, num_heads=4)
    with caplog.at_level("INFO", logger="pixart.checkpoints"):
        compressed = load_transformer(path, num_heads=4, kv_compress="uniform:2")
    assert (compressed.config.kv_compress, compressed.config.kv_compress_sampling) == ({1: 2}, "uniform")
    assert "KV compression uniform ×2 on layers [1], as given" in caplog.text
    x, y = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(x, torch.tensor([10.0]), y), compressed(x, torch.tensor([10.0]), y))
    round_trip_is_exact(path, tmp_path, num_heads=4, kv_compress="uniform:2")
    caplog.clear()
    with caplog.at_level("INFO", logger="pixart.checkpoints"):
        again = load_transformer(tmp_path / "again.pth")  # our .pth says it beside the weights
    assert again.config == compressed.config
    assert "KV compression uniform on layers [1] (from its pixart_config)" in caplog.text
    with pytest.raises(PixArtError, match="KV compression 'mean:2': expected SAMPLING:FACTOR"):
        load_transformer(path, num_heads=4, kv_compress="mean:2")


def test_kv_compress_spec_names_layers():
    assert parse_kv_compress("ave:2:0,3-4", depth=6) == ({0: 2, 3: 2, 4: 2}, "ave")
    assert parse_kv_compress("uniform:3", depth=4) == ({2: 3, 3: 3}, "uniform")
    with pytest.raises(PixArtError, match="layer 9 is outside 0..5"):
        parse_kv_compress("uniform:2:9", depth=6)


def test_ema_weights_are_mentioned_and_loaded_on_request(tmp_path, caplog):
    path = tmp_path / "epoch_2.pth"
    config = alpha(512)
    ema = official_checkpoint(tmp_path / "ema.pth", config, 1.0, seed=1)
    raw = official_checkpoint(path, config, 1.0, seed=0, state_dict_ema=ema, epoch=2)
    with caplog.at_level("INFO", logger="pixart.checkpoints"):
        model = load_transformer(path, num_heads=4)
    assert "also holds EMA weights (state_dict_ema); load them with ema=True (--ema)" in caplog.text
    assert torch.equal(model.t_block[1].weight, raw["t_block.1.weight"])  # state_dict, as the official scripts
    model = load_transformer(path, num_heads=4, ema=True)
    assert torch.equal(model.t_block[1].weight, ema["t_block.1.weight"])
    out = convert_checkpoint(path, tmp_path / "ema-out.pth", "official", num_heads=4, ema=True)
    written = torch.load(out, weights_only=True)["state_dict"]
    assert sorted(written) == sorted(ema)
    assert [k for k in ema if not torch.equal(ema[k], written[k])] == []  # the EMA weights, pos_embed too
    with pytest.raises(PixArtError, match="has no EMA weights"):
        load_transformer(tmp_path / "ema.pth", num_heads=4, ema=True)
