"""The family table (α vs Σ) against what diffusers' own PixArt pipelines and transformer assume."""

import inspect

import diffusers
import pytest
import torch

from pixart.checkpoints.export import PIPELINE_CLASSES
from pixart.checkpoints.official import config_from_state_dict, save_official
from pixart.model.config import FAMILIES, FAMILY, PRESETS, family_of_pipeline
from pixart.model.text import DEFAULT_MAX_TOKENS
from pixart.model.transformer import PixArtTransformer


def test_text_lengths_and_pipeline_classes_are_diffusers_defaults():
    assert FAMILIES == ("alpha", "sigma")
    for family in FAMILY.values():
        pipeline = getattr(diffusers, family.pipeline_class)
        assert inspect.signature(pipeline.__call__).parameters["max_sequence_length"].default == family.max_tokens
        assert family_of_pipeline(family.pipeline_class) == family.name
    assert family_of_pipeline("PixArtSigmaPAGPipeline") == "sigma"  # a diffusers variant, by its word
    assert family_of_pipeline("StableDiffusionPipeline") is None
    # The older names read the table.
    assert DEFAULT_MAX_TOKENS == {"alpha": 120, "sigma": 300}
    assert PIPELINE_CLASSES == {"alpha": "PixArtAlphaPipeline", "sigma": "PixArtSigmaPipeline"}


def test_pe_scales_follow_diffusers_rule_except_sigma_256():
    # diffusers' PixArtTransformer2DModel falls back to max(sample_size // 64, 1); only Σ-256 departs from it,
    # which its release states in its config (interpolation_scale 0.5).
    for family in FAMILY.values():
        for side, scale in family.pe_scales.items():
            expected = 0.5 if (family.name, side) == ("sigma", 256) else max(side // 8 // 64, 1)
            assert scale == expected, (family.name, side)


def test_release_presets_read_the_table():
    for name, config in PRESETS.items():
        if name.startswith("debug"):
            continue
        family = FAMILY[config.family]
        assert config.model_max_length == family.max_tokens
        assert config.pe_scale == family.pe_scales[config.sample_size * 8], name


@pytest.mark.parametrize("family", FAMILIES)
def test_official_checkpoint_family_is_guessed_from_its_null_caption_length(tmp_path, family):
    config = PRESETS["debug-alpha"].replace(
        family=family, micro_conditions=False, model_max_length=FAMILY[family].max_tokens, hidden_size=72, num_heads=1
    )
    save_official(PixArtTransformer(config), tmp_path / "model.pth")
    state_dict = torch.load(tmp_path / "model.pth", weights_only=True)["state_dict"]
    inferred = config_from_state_dict(state_dict, image_size=512, num_heads=1)
    assert (inferred.family, inferred.model_max_length, inferred.pe_scale) == (
        family,
        FAMILY[family].max_tokens,
        FAMILY[family].pe_scales[512],
    )
