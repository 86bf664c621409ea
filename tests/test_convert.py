"""Checkpoint interop: official .pth, diffusers folders, hub ids and our .safetensors, and their failures."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pixart import PixArtConfig, PixArtError, PixArtTransformer, preset
from pixart.checkpoints.convert import convert_checkpoint, load_transformer, placeholder_y_embedding
from pixart.checkpoints.diffusers import (
    config_from_diffusers,
    diffusers_config,
    from_diffusers_state_dict,
    save_diffusers,
    to_diffusers_state_dict,
)
from pixart.checkpoints.official import config_from_state_dict, save_official
from pixart.checkpoints.ours import save_pixart
from pixart.cli import main as cli_main
from test_files import umask
from tiny import save_pipeline, tiny_vae

# Shaped like the releases (head dim 72, null caption of 120/300 rows) so nothing needs to be told.
ALPHA_1024_MS = PixArtConfig(
    family="alpha",
    sample_size=128,
    pe_scale=2.0,
    hidden_size=144,
    depth=2,
    num_heads=2,
    caption_channels=32,
    model_max_length=120,
    micro_conditions=True,
)
SIGMA_2K_KV = PixArtConfig(
    family="sigma",
    sample_size=256,
    pe_scale=4.0,
    hidden_size=144,
    depth=3,
    num_heads=2,
    caption_channels=32,
    model_max_length=300,
    kv_compress={1: 2, 2: 2},
    qk_norm=True,
)


def perturbed(config: PixArtConfig, seed: int = 0) -> PixArtTransformer:
    torch.manual_seed(seed)
    model = PixArtTransformer(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():  # buffers too: y_embedding must survive every trip
            tensor.add_(torch.randn_like(tensor) * 0.05)
    return model


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert different == []


def predict(model: PixArtTransformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    cfg = model.config
    x = torch.randn(1, 4, 8, 12, generator=generator)
    y = torch.randn(1, 7, cfg.caption_channels, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), y, torch.ones(1, 7), torch.tensor([[64.0, 96.0]]), torch.tensor([2 / 3]))


# ---------------------------------------------------------------------------------------------- round trips


def test_official_to_diffusers_to_pixart_to_official_is_bit_identical(tmp_path):
    original = perturbed(ALPHA_1024_MS)
    save_official(original, tmp_path / "PixArt-XL-2-1024-MS.pth")

    from_official = load_transformer(tmp_path / "PixArt-XL-2-1024-MS.pth")
    assert from_official.config == ALPHA_1024_MS  # inferred: heads 144/72, α from 120 rows, 1024 from the name
    assert_same_tensors(original, from_official)

    save_diffusers(from_official, tmp_path / "diffusers")
    assert sorted(p.name for p in (tmp_path / "diffusers").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "y_embedding.safetensors",
    ]
    from_diffusers = load_transformer(tmp_path / "diffusers")
    assert from_diffusers.config == ALPHA_1024_MS
    assert_same_tensors(original, from_diffusers)

    save_pixart(from_diffusers, tmp_path / "ours.safetensors")
    from_pixart = load_transformer(tmp_path / "ours.safetensors")
    assert from_pixart.config == ALPHA_1024_MS
    assert_same_tensors(original, from_pixart)

    save_official(from_pixart, tmp_path / "again.pth")
    first = torch.load(tmp_path / "PixArt-XL-2-1024-MS.pth", weights_only=True)["state_dict"]
    again = torch.load(tmp_path / "again.pth", weights_only=True)["state_dict"]
    assert sorted(first) == sorted(again)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert torch.equal(predict(original), predict(from_pixart))


def test_official_pth_has_the_official_pos_embed_buffer(tmp_path):
    save_official(perturbed(ALPHA_1024_MS), tmp_path / "a.pth")
    state_dict = torch.load(tmp_path / "a.pth", weights_only=True)["state_dict"]
    pos_embed = state_dict["pos_embed"]
    assert pos_embed.shape == (1, 64 * 64, 144)  # base size 128 / patch 2 = 64
    # Token 0 sits at (0, 0): sin 0 = 0 in the first quarter of each half, cos 0 = 1 in the second.
    assert torch.equal(pos_embed[0, 0], torch.tensor(([0.0] * 36 + [1.0] * 36) * 2))
    # Token 1 is column 1 / pe scale 2 = 0.5: its width half starts with sin(0.5); the height half stays at 0.
    assert pos_embed[0, 1, 0].item() == pytest.approx(0.479425538604203)
    assert torch.equal(pos_embed[0, 1, 72:], pos_embed[0, 0, 72:])


def test_training_checkpoint_with_optimizer_loads(tmp_path):
    model = perturbed(ALPHA_1024_MS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(
        *[torch.randn(1, 4, 8, 8), torch.tensor([3.0]), torch.randn(1, 5, 32)], None, torch.ones(1, 2), torch.ones(1)
    )[0].sum().backward()
    optimizer.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4, "step": 1000}
    torch.save(checkpoint, tmp_path / "epoch_4_step_1000.pth")
    loaded = load_transformer(tmp_path / "epoch_4_step_1000.pth", image_size=1024, num_heads=2)
    assert_same_tensors(model, loaded)


def test_bare_state_dict_and_hints_for_what_a_pth_cannot_tell(tmp_path, caplog):
    model = perturbed(ALPHA_1024_MS.replace(micro_conditions=False))
    torch.save(model.state_dict(), tmp_path / "finetune.pth")
    with caplog.at_level("INFO", logger="pixart.checkpoints"):
        guessed = load_transformer(tmp_path / "finetune.pth", num_heads=2)
    assert (guessed.config.sample_size, guessed.config.pe_scale) == (128, 2.0)
    assert "assuming 1024 px" in caplog.text
    told = load_transformer(tmp_path / "finetune.pth", image_size=256, family="sigma", num_heads=4)
    assert (told.config.family, told.config.sample_size, told.config.pe_scale, told.config.num_heads) == (
        "sigma",
        32,
        0.5,
        4,
    )
    assert told.config.model_max_length == 120  # the null caption's rows, not Σ's default
    at_256 = load_transformer(tmp_path / "finetune.pth", image_size=256, num_heads=2)
    assert at_256.config.pe_scale == 1.0  # α at 256 px, from the table: a bare state dict has no pos_embed
    assert_same_tensors(model, told)


@pytest.mark.parametrize(
    "name, sample_size, pe_scale",
    [("PixArt-XL-2-512x512.pth", 64, 1.0), ("PixArt-XL-2-256x256.pth", 32, 1.0), ("PixArt-XL-2-1024-MS.pth", 128, 2.0)],
)
def test_image_size_is_read_from_the_file_name(tmp_path, name, sample_size, pe_scale):
    torch.save({"state_dict": perturbed(ALPHA_1024_MS).state_dict()}, tmp_path / name)
    config = load_transformer(tmp_path / name, num_heads=2).config
    assert (config.sample_size, config.pe_scale) == (sample_size, pe_scale)


def test_image_size_is_read_from_the_official_pos_embed_before_the_name(tmp_path, caplog):
    # A fine-tune saved under any name still carries its training grid in pos_embed.
    model = perturbed(ALPHA_1024_MS.replace(sample_size=64, pe_scale=1.0))  # the 512 px layout
    save_official(model, tmp_path / "PixArt-XL-2-1024-MS-finetune.pth")
    with caplog.at_level("INFO", logger="pixart.checkpoints"):
        loaded = load_transformer(tmp_path / "PixArt-XL-2-1024-MS-finetune.pth")
    assert (loaded.config.sample_size, loaded.config.pe_scale) == (64, 1.0)
    assert "a 512 px model (its pos_embed grid)" in caplog.text
    assert_same_tensors(model, loaded)
    assert load_transformer(tmp_path / "PixArt-XL-2-1024-MS-finetune.pth", image_size=1024).config.sample_size == 128


RELEASED_FILES = {
    "alpha-256": "PixArt-XL-2-256x256.pth",
    "alpha-512": "PixArt-XL-2-512x512.pth",
    "alpha-1024-ms": "PixArt-XL-2-1024-MS.pth",
    "sigma-256": "PixArt-Sigma-XL-2-256x256.pth",
    "sigma-512-ms": "PixArt-Sigma-XL-2-512-MS.pth",
    "sigma-1024-ms": "PixArt-Sigma-XL-2-1024-MS.pth",
    "sigma-2k-ms": "PixArt-Sigma-XL-2-2K-MS.pth",
}


@pytest.mark.parametrize("name, file_name", RELEASED_FILES.items())
def test_released_presets_are_inferred_from_their_official_file_names(name, file_name):
    with torch.device("meta"):  # shapes only: a full-size state dict without the memory
        state_dict = PixArtTransformer(preset(name)).state_dict()
    assert config_from_state_dict(state_dict, name=file_name) == preset(name)
    family, length = preset(name).family, preset(name).model_max_length
    assert config_from_diffusers(diffusers_config(preset(name)), family=family, model_max_length=length) == preset(name)


# ---------------------------------------------------------------------------------------------- Σ KV compression


def test_kv_compressed_sigma_config_is_inferred_from_the_official_keys(tmp_path):
    original = perturbed(SIGMA_2K_KV)
    state_dict = original.state_dict()
    assert state_dict["blocks.1.attn.sr.weight"].shape == (144, 1, 2, 2)
    torch.save({"state_dict": state_dict}, tmp_path / "PixArt-Sigma-XL-2-2K-MS.pth")

    loaded = load_transformer(tmp_path / "PixArt-Sigma-XL-2-2K-MS.pth", num_heads=2)
    assert loaded.config == SIGMA_2K_KV
    assert_same_tensors(original, loaded)
    assert torch.equal(predict(original), predict(loaded))


def test_diffusers_cannot_hold_kv_compression_or_qk_norm(tmp_path):
    with pytest.raises(PixArtError, match="KV token compression"):
        save_diffusers(perturbed(SIGMA_2K_KV), tmp_path / "kv")
    with pytest.raises(PixArtError, match="qk-norm"):
        save_diffusers(perturbed(SIGMA_2K_KV.replace(kv_compress={})), tmp_path / "qk")
    assert not (tmp_path / "kv").exists() and not (tmp_path / "qk").exists()


def test_explicit_config_that_disagrees_with_the_file_is_an_error(tmp_path):
    save_official(perturbed(SIGMA_2K_KV), tmp_path / "sigma.pth")
    assert load_transformer(tmp_path / "sigma.pth", config=SIGMA_2K_KV).config == SIGMA_2K_KV

    with pytest.raises(PixArtError, match=r"unexpected blocks\.1\.attn\.sr\.weight, blocks\.1\.attn\.sr\.bias, "):
        load_transformer(tmp_path / "sigma.pth", config=SIGMA_2K_KV.replace(kv_compress={}))
    with pytest.raises(PixArtError, match=r"missing blocks\.0\.attn\.sr\.weight"):
        load_transformer(tmp_path / "sigma.pth", config=SIGMA_2K_KV.replace(kv_compress={0: 2, 1: 2, 2: 2}))
    with pytest.raises(
        PixArtError, match=r"shape mismatch y_embedder\.y_embedding \(300, 32\) in the file vs \(120, 32\)"
    ):
        load_transformer(tmp_path / "sigma.pth", config=SIGMA_2K_KV.replace(model_max_length=120))
    with pytest.raises(PixArtError, match="either config or image_size"):
        load_transformer(tmp_path / "sigma.pth", config=SIGMA_2K_KV, image_size=2048)

    save_pixart(perturbed(ALPHA_1024_MS), tmp_path / "alpha.safetensors")
    with pytest.raises(PixArtError, match=r"has pe_scale=2\.0 but the given config has 1\.0"):
        load_transformer(tmp_path / "alpha.safetensors", config=ALPHA_1024_MS.replace(pe_scale=1.0))
    save_diffusers(perturbed(ALPHA_1024_MS), tmp_path / "diffusers")
    with pytest.raises(PixArtError, match=r"has sample_size=128 but the given config has 64"):
        load_transformer(tmp_path / "diffusers", config=ALPHA_1024_MS.replace(sample_size=64))


# ---------------------------------------------------------------------------------------------- diffusers side


def test_sharded_diffusers_folder_loads(tmp_path):
    from diffusers import PixArtTransformer2DModel

    original = perturbed(ALPHA_1024_MS)
    save_diffusers(original, tmp_path / "single")
    PixArtTransformer2DModel.from_pretrained(tmp_path / "single").save_pretrained(
        tmp_path / "sharded", max_shard_size="100KB"
    )
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors").exists()

    loaded = load_transformer(tmp_path / "sharded")  # α: it has micro-conditions
    assert loaded.config == ALPHA_1024_MS
    state, expected = loaded.state_dict(), original.state_dict()
    # diffusers' own save has no null caption; everything else must come back exactly.
    assert all(torch.equal(state[k], expected[k]) for k in expected if k != "y_embedder.y_embedding")
    # …which is the documented placeholder, so callers can tell it from a real null caption.
    assert torch.equal(loaded.y_embedder.y_embedding, placeholder_y_embedding(ALPHA_1024_MS))
    assert not torch.equal(original.y_embedder.y_embedding, placeholder_y_embedding(ALPHA_1024_MS))

    # Saving over it replaces the shards, so diffusers (which prefers an index) reads the new weights.
    replacement = perturbed(ALPHA_1024_MS, seed=1)
    save_diffusers(replacement, tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "y_embedding.safetensors",
    ]
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path / "sharded")
    expected = to_diffusers_state_dict(replacement.state_dict(), ALPHA_1024_MS)
    assert sorted(reloaded.state_dict()) == sorted(expected)
    assert all(torch.equal(v, expected[k]) for k, v in reloaded.state_dict().items())


def test_state_dict_helpers_are_inverse_and_strict():
    for config in (preset("debug-alpha"), ALPHA_1024_MS.replace(family="sigma", micro_conditions=False)):
        state_dict = perturbed(config).state_dict()
        theirs = to_diffusers_state_dict(state_dict, config)
        assert "transformer_blocks.1.attn1.to_v.weight" in theirs and "y_embedder.y_embedding" not in theirs
        assert theirs["transformer_blocks.0.attn2.to_k.bias"].shape == (config.hidden_size,)
        back = from_diffusers_state_dict(theirs, config)
        assert sorted(back) == sorted(k for k in state_dict if k != "y_embedder.y_embedding")
        assert all(torch.equal(back[k], state_dict[k]) for k in back)

    config = preset("debug-alpha")
    theirs = to_diffusers_state_dict(perturbed(config).state_dict(), config)
    with pytest.raises(PixArtError, match=r"unexpected tensors extra\.weight"):
        from_diffusers_state_dict({**theirs, "extra.weight": torch.zeros(1)}, config)
    with pytest.raises(PixArtError, match=r"unequal parts of blocks\.0\.attn\.qkv\.bias: .*to_k\.bias \(47,\)"):
        from_diffusers_state_dict({**theirs, "transformer_blocks.0.attn1.to_k.bias": torch.zeros(47)}, config)
    del theirs["proj_out.bias"]
    with pytest.raises(PixArtError, match=r"no tensor 'proj_out\.bias'"):
        from_diffusers_state_dict(theirs, config)


def test_diffusers_config_round_trip_and_diffusers_defaults():
    for config in (ALPHA_1024_MS, ALPHA_1024_MS.replace(family="sigma", micro_conditions=False, pe_scale=0.5)):
        written = diffusers_config(config)
        assert written["use_additional_conditions"] is config.micro_conditions
        assert config_from_diffusers(written, family=config.family, model_max_length=config.model_max_length) == config

    # A legacy α config as diffusers 0.22 wrote them: no interpolation_scale, no use_additional_conditions.
    legacy = {k: v for k, v in diffusers_config(ALPHA_1024_MS).items() if k not in ("interpolation_scale",)}
    del legacy["use_additional_conditions"]
    legacy["_class_name"] = "Transformer2DModel"
    at_1024 = config_from_diffusers(legacy)
    assert (at_1024.family, at_1024.pe_scale, at_1024.micro_conditions, at_1024.model_max_length) == (
        "alpha",
        2.0,
        True,
        120,
    )
    at_512 = config_from_diffusers({**legacy, "sample_size": 64}, family="alpha")
    assert (at_512.pe_scale, at_512.micro_conditions) == (1.0, False)
    with pytest.raises(PixArtError, match="pass family"):
        config_from_diffusers({**legacy, "sample_size": 64})
    with pytest.raises(PixArtError, match="'UNet2DConditionModel', not a PixArt transformer"):
        config_from_diffusers({**legacy, "_class_name": "UNet2DConditionModel"})
    with pytest.raises(PixArtError, match="norm_type='layer_norm'"):
        config_from_diffusers({**legacy, "norm_type": "layer_norm"})


def test_sigma_diffusers_folder_keeps_family_and_text_length_in_the_sidecar(tmp_path):
    config = SIGMA_2K_KV.replace(kv_compress={}, qk_norm=False)
    original = perturbed(config)
    save_diffusers(original, tmp_path / "sigma")
    assert json.loads((tmp_path / "sigma" / "config.json").read_text())["use_additional_conditions"] is False
    loaded = load_transformer(tmp_path / "sigma", dtype=torch.bfloat16)
    assert loaded.config == config
    assert loaded.dtype == torch.bfloat16 and loaded.y_embedder.y_embedding.dtype == torch.bfloat16
    assert torch.equal(loaded.y_embedder.y_embedding, original.y_embedder.y_embedding.to(torch.bfloat16))
    (tmp_path / "sigma" / "y_embedding.safetensors").unlink()
    with pytest.raises(PixArtError, match=r"cannot tell whether this diffusers transformer is PixArt-α or Σ"):
        load_transformer(tmp_path / "sigma")
    assert load_transformer(tmp_path / "sigma", family="sigma").config == config


def test_transformer_folder_family_comes_from_its_pipeline(tmp_path):
    pipeline = save_pipeline(tmp_path / "pipe", "sigma")
    assert load_transformer(pipeline / "transformer").config.family == "sigma"
    with pytest.raises(PixArtError, match="holds a PixArt-sigma model, not alpha"):
        load_transformer(pipeline, family="alpha")
    with pytest.raises(PixArtError, match="is a 1024 px model, not 512 px"):
        load_transformer(pipeline, image_size=512)


# ---------------------------------------------------------------------------------------------- bad input


class WouldRunCode:
    """Unpickling this calls open(marker, 'w'): the file appears if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x_embedder.proj.weight": WouldRunCode(marker)}}, tmp_path / "evil.pth")
    with pytest.raises(PixArtError, match=r"refusing to load .*evil\.pth: .*\(\w+\.open\), which could run code"):
        load_transformer(tmp_path / "evil.pth")
    assert not marker.exists()
    # The fixture really is malicious: an unsafe load does run it.
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_corrupt_and_foreign_files_are_one_line_errors(tmp_path):
    model = perturbed(ALPHA_1024_MS)
    save_official(model, tmp_path / "good.pth")
    save_pixart(model, tmp_path / "good.safetensors")
    for name in ("good.pth", "good.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"truncated-{name}").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pth").write_text("these are not weights\n" * 20)
    save_file(tiny_vae().state_dict(), tmp_path / "vae.safetensors")
    torch.save({"model": {"w": torch.zeros(2)}, "note": "hi"}, tmp_path / "other.pth")
    dit_like = {k: v for k, v in model.state_dict().items() if not k.startswith("y_embedder")}
    torch.save(dit_like, tmp_path / "dit.pth")
    tiny_vae().save_pretrained(tmp_path / "vae-folder")
    save_diffusers(model, tmp_path / "diffusers")
    (tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "loose.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)

    cases = {
        "truncated-good.pth": r"cannot read .*truncated-good\.pth: not a PyTorch checkpoint, or truncated/corrupt",
        "truncated-good.safetensors": r"cannot read .*truncated-good\.safetensors: .*truncated/corrupt",
        "notes.pth": r"cannot read .*notes\.pth: not a PyTorch checkpoint",
        "vae.safetensors": r"vae\.safetensors is not a PixArt transformer checkpoint",
        "other.pth": r"other\.pth is not a PixArt checkpoint: expected a dict of tensors",
        "dit.pth": r"dit\.pth is not a PixArt transformer checkpoint \(it holds ar_embedder",
        "vae-folder": r"'AutoencoderKL', not a PixArt transformer",
        "loose.safetensors": r"loose\.safetensors holds diffusers-named weights; load their folder",
        "diffusers": r"diffusers has no diffusion_pytorch_model\.safetensors or .*index\.json",
        "empty": r"empty is neither a diffusers transformer folder .* nor a pipeline folder",
        "weights.bin": r"cannot load .*weights\.bin: expected an official \.pth",
        "missing.pth": r"no such file or directory: .*missing\.pth",
    }
    for name, pattern in cases.items():
        with pytest.raises(PixArtError, match=pattern) as info:
            load_transformer(tmp_path / name)
        assert "\n" not in str(info.value)


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    model = perturbed(ALPHA_1024_MS)
    (tmp_path / "keep.safetensors").write_bytes(b"previous contents")
    with pytest.raises(PixArtError):
        save_diffusers(perturbed(SIGMA_2K_KV), tmp_path / "out")
    save_pixart(model, tmp_path / "keep.safetensors")
    save_official(model, tmp_path / "m.pth")
    save_diffusers(model, tmp_path / "out")
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert names == [
        "keep.safetensors",
        "m.pth",
        "out",
        "out/config.json",
        "out/diffusion_pytorch_model.safetensors",
        "out/y_embedding.safetensors",
    ]
    mask = umask()
    for name in ("keep.safetensors", "out/diffusion_pytorch_model.safetensors", "out/y_embedding.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name  # not safetensors' 0600


# ---------------------------------------------------------------------------------------------- hub and CLI


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pixart", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120
    )


def test_cli_converts_an_official_pth_to_diffusers(tmp_path):
    original = perturbed(ALPHA_1024_MS)
    save_official(original, tmp_path / "alpha.pth")
    done = run_cli(
        "convert", "alpha.pth", "alpha-diffusers", "--to", "diffusers", "--image-size", "512", "--family", "alpha",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote diffusers transformer folder alpha-diffusers" in done.stderr
    converted = load_transformer(tmp_path / "alpha-diffusers")
    assert converted.config == ALPHA_1024_MS.replace(sample_size=64, pe_scale=1.0)  # what --image-size said
    assert_same_tensors(original, converted)


def test_convert_checkpoint_refuses_to_overwrite_and_checks_the_output_name(tmp_path):
    save_pixart(perturbed(ALPHA_1024_MS), tmp_path / "a.safetensors")
    (tmp_path / "out").mkdir()  # an empty folder is fine to write into
    convert_checkpoint(tmp_path / "a.safetensors", tmp_path / "out", "diffusers")
    before = (tmp_path / "out" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(PixArtError, match=r"out already exists and is not empty; pass overwrite \(--overwrite\)"):
        convert_checkpoint(tmp_path / "a.safetensors", tmp_path / "out", "diffusers")
    convert_checkpoint(tmp_path / "a.safetensors", tmp_path / "out", "diffusers", overwrite=True)
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    with pytest.raises(PixArtError, match=r"b\.safetensors does not fit --to official: expected \.pth or \.pt"):
        convert_checkpoint(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "official")
    with pytest.raises(PixArtError, match=r"unknown format 'onnx'; accepted: diffusers, official, pixart"):
        convert_checkpoint(tmp_path / "a.safetensors", tmp_path / "b.onnx", "onnx")


def test_cli_offline_hub_id_is_a_one_line_error(tmp_path):
    done = run_cli(
        "convert", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "out.safetensors", "--to", "pixart", cwd=tmp_path
    )
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot fetch 'PixArt-alpha/PixArt-Sigma-XL-2-1024-MS': the hub is unreachable")
    assert "pass a local path" in error
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_hub_file_id_offline_is_a_one_line_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The library reads HF_HUB_OFFLINE when imported; set it where it looks so nothing reaches the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        PixArtError, match=r"^cannot fetch 'PixArt-alpha/PixArt-Sigma/PixArt-Sigma-XL-2-2K-MS\.pth': .*offline"
    ):
        load_transformer("PixArt-alpha/PixArt-Sigma/PixArt-Sigma-XL-2-2K-MS.pth")
    with pytest.raises(PixArtError, match=r"^cannot fetch 'PixArt-alpha/PixArt-XL-2-512x512': .*pass a local path"):
        load_transformer("PixArt-alpha/PixArt-XL-2-512x512")


# In-process through the same entry point, to keep the suite fast: each `pixart` process imports every command.
def test_cli_missing_source_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "nowhere.pth"), str(tmp_path / "o.safetensors"), "--to", "pixart"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: no such file or directory: {tmp_path / 'nowhere.pth'} (expected a checkpoint path or a hub id)\n"
    )


def test_cli_help_lists_formats_and_options(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["convert", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for text in ("diffusers,official,pixart", "--image-size", "--family", "--num-heads", "hub id", "examples:"):
        assert text in out
