"""Our transformer computes what diffusers' PixArtTransformer2DModel computes, through our converters."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from pixart import PixArtTransformer, preset
from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.diffusers import save_diffusers
from tiny import save_pipeline

TOLERANCE = 1e-5


def perturbed(config) -> PixArtTransformer:
    """Our model with every weight random and non-zero: zero-inits and tables would hide mapping bugs."""
    torch.manual_seed(0)
    model = PixArtTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(config, height: int, width: int, batch: int = 2):
    """Non-square latents, distinct timesteps, captions padded to different lengths."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, height, width, generator=generator)
    t = torch.tensor([7.0, 913.0])[:batch]
    y = torch.randn(batch, config.model_max_length, config.caption_channels, generator=generator)
    mask = torch.zeros(batch, config.model_max_length, dtype=torch.long)
    mask[0, :5] = 1
    mask[1, :11] = 1
    resolution = torch.tensor([[height * 8.0, width * 8.0]] * batch)
    aspect_ratio = torch.tensor([height / width] * batch)
    return x, t, y, mask, resolution, aspect_ratio


def diffusers_output(model: PixArtTransformer2DModel, x, t, y, mask, resolution, aspect_ratio) -> torch.Tensor:
    cond = {"resolution": resolution, "aspect_ratio": aspect_ratio[:, None]}
    with torch.no_grad():
        return model(x, y, t, added_cond_kwargs=cond, encoder_attention_mask=mask).sample


def load_diffusers_cleanly(folder) -> PixArtTransformer2DModel:
    """from_pretrained, failing on any key diffusers reports missing/unexpected or any warning it logs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        model, info = PixArtTransformer2DModel.from_pretrained(folder, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert {k: v for k, v in info.items() if v} == {}
    assert [r.getMessage() for r in records] == []
    return model.eval()


@pytest.mark.parametrize(
    "name, height, width",
    [("debug-alpha", 8, 12), ("debug-alpha", 14, 6), ("debug-sigma", 6, 10), ("debug-sigma", 12, 12)],
)
def test_matches_diffusers_after_save_diffusers(tmp_path, name, height, width):
    config = preset(name)
    if name == "debug-sigma":  # diffusers has neither KV compression nor qk-norm
        config = config.replace(kv_compress={}, qk_norm=False)
    ours = perturbed(config)
    save_diffusers(ours, tmp_path / "transformer")
    reference = load_diffusers_cleanly(tmp_path / "transformer")
    assert reference.config.use_additional_conditions is config.micro_conditions

    args = inputs(config, height, width)
    with torch.no_grad():
        expected = diffusers_output(reference, *args)
        got = ours(*args)
    assert got.shape == expected.shape == (2, 8, height, width)
    assert (got - expected).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module", params=["alpha", "sigma"])
def pipeline_folder(request, tmp_path_factory):
    """A tiny diffusers pipeline folder per family, built once: the test only reads it."""
    return request.param, save_pipeline(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("subfolder", ["", "transformer"])
def test_loaded_pipeline_folder_matches_diffusers_transformer(pipeline_folder, subfolder):
    family, pipeline = pipeline_folder
    reference = PixArtTransformer2DModel.from_pretrained(pipeline / "transformer").eval()
    ours = load_transformer(pipeline / subfolder)
    assert ours.config.family == family
    assert ours.config.micro_conditions is (family == "alpha")
    assert ours.config.model_max_length == {"alpha": 120, "sigma": 300}[family]

    args = inputs(ours.config.replace(model_max_length=20), 16, 24)
    with torch.no_grad():
        expected = diffusers_output(reference, *args)
        got = ours(*args)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_legacy_transformer2dmodel_folder_matches_diffusers(tmp_path):
    """The α hub releases' config.json: class Transformer2DModel, no interpolation_scale, no
    use_additional_conditions; diffusers then derives scale 2 and micro-conditions from sample_size 128."""
    import json

    from diffusers import Transformer2DModel

    config = preset("debug-alpha").replace(sample_size=128, pe_scale=2.0)
    save_diffusers(perturbed(config), tmp_path)
    legacy = json.loads((tmp_path / "config.json").read_text())
    legacy["_class_name"] = "Transformer2DModel"
    del legacy["interpolation_scale"], legacy["use_additional_conditions"]
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    (tmp_path / "y_embedding.safetensors").unlink()  # as in a hub folder

    reference = Transformer2DModel.from_pretrained(tmp_path).eval()
    ours = load_transformer(tmp_path)
    assert (ours.config.family, ours.config.pe_scale, ours.config.micro_conditions) == ("alpha", 2.0, True)
    args = inputs(ours.config.replace(model_max_length=20), 10, 6)
    with torch.no_grad():
        expected = diffusers_output(reference, *args)
        got = ours(*args)
    assert (got - expected).abs().max().item() <= TOLERANCE
