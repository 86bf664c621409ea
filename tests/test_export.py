"""`pixart export diffusers`: the written folder loads in diffusers' own pipelines and runs our weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.export import export_pipeline
from pixart.checkpoints.lora import add_lora, load_lora, lora_layers, save_lora
from pixart.checkpoints.ours import save_pixart
from pixart.cli import main
from pixart.errors import PixArtError
from test_files import assert_plain_modes
from tiny import T5_WIDTH, build_pipeline, save_pipeline

PIPELINES = {"alpha": PixArtAlphaPipeline, "sigma": PixArtSigmaPipeline}


def run_cli(*args, home):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "pixart", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def fine_tuned(base, family, seed=5):
    """Our model from the base pipeline with every weight moved, standing in for a trained checkpoint."""
    model = load_transformer(base, family=family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def with_random_lora(model, seed=6):
    add_lora(model, rank=2, targets=("attn", "cross_attn"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def inputs(family):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, T5_WIDTH, generator=g)
    t, mask = torch.tensor([900.0, 30.0]), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    extra = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.ones(2)} if family == "alpha" else {}
    return x, t, y, mask, extra


@torch.no_grad()
def run_ours(model, family):
    x, t, y, mask, extra = inputs(family)
    return model(x, t, y, mask, **extra)


@torch.no_grad()
def run_theirs(model, family):
    """diffusers' PixArtTransformer2DModel on the same inputs as :func:`run_ours`."""
    x, t, y, mask, extra = inputs(family)
    added = extra or {"resolution": None, "aspect_ratio": None}
    return model(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=added).sample


def assert_same_component(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_exports_alpha_pipeline_with_merged_lora(tmp_path):
    base = save_pipeline(tmp_path / "base", "alpha")
    model = fine_tuned(base, "alpha")
    save_pixart(model, tmp_path / "ckpt.safetensors")
    save_lora(with_random_lora(fine_tuned(base, "alpha")), tmp_path / "lora")
    out = tmp_path / "exported"

    done = run_cli(
        "export", "diffusers", out, "--base", base, "--transformer", tmp_path / "ckpt.safetensors",
        "--lora", f"{tmp_path / 'lora'}:0.5", home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")]  # no temp folder left behind
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    expected = load_lora(model, tmp_path / "lora", scale=0.5, merge=True)
    theirs = run_theirs(pipe.transformer.eval(), "alpha")
    assert torch.allclose(run_ours(expected, "alpha"), theirs, atol=1e-5)
    assert not torch.allclose(
        run_ours(fine_tuned(base, "alpha"), "alpha"), theirs, atol=1e-3
    )  # the LoRA really was merged

    reference = build_pipeline("alpha")
    for name in ("text_encoder", "vae"):
        assert_same_component(getattr(pipe, name), getattr(reference, name))
    image = pipe(
        "a red cube", num_inference_steps=2, height=64, width=64, use_resolution_binning=False, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_export_sigma_model_with_live_lora_leaves_caller_model_alone(tmp_path):
    base = save_pipeline(tmp_path / "base", "sigma")
    model = with_random_lora(fine_tuned(base, "sigma"))
    before = run_ours(model, "sigma")

    out = export_pipeline(base, model, tmp_path / "out")

    assert lora_layers(model)  # still live: export merged a copy
    assert_plain_modes(out)  # as mkdir() and open() make them, not mkdtemp's 0700 / safetensors' 0600
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    pipe = PixArtSigmaPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert torch.equal(run_ours(model, "sigma"), before)
    assert torch.allclose(run_theirs(pipe.transformer.eval(), "sigma"), before, atol=1e-5)
    image = pipe(
        "a blue ball", num_inference_steps=2, height=64, width=64, use_resolution_binning=False, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, 64, 64, 3)


def test_existing_output_is_kept_unless_forced(tmp_path):
    base = save_pipeline(tmp_path / "base", "sigma")
    model = fine_tuned(base, "sigma")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(PixArtError, match="not empty"):
        export_pipeline(base, model, out)
    assert (out / "keep.txt").read_text() == "user data"

    export_pipeline(base, model, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "transformer" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # the old folder was cleaned up

    empty = tmp_path / "empty"
    empty.mkdir()
    export_pipeline(base, model, empty)  # an empty folder is fine without force
    assert (empty / "model_index.json").is_file()


def test_mismatched_inputs_fail_before_writing(tmp_path):
    alpha = save_pipeline(tmp_path / "alpha", "alpha")
    sigma_model = fine_tuned(save_pipeline(tmp_path / "sigma", "sigma"), "sigma")
    with pytest.raises(PixArtError, match="PixArt-sigma.*alpha"):
        export_pipeline(alpha, sigma_model, tmp_path / "out")
    with pytest.raises(PixArtError, match="model_index.json"):
        export_pipeline(alpha / "vae", sigma_model, tmp_path / "out")
    alpha_model = fine_tuned(alpha, "alpha")
    encoder_config = alpha / "text_encoder" / "config.json"
    encoder_config.write_text(json.dumps({**json.loads(encoder_config.read_text()), "d_model": 64}))
    with pytest.raises(PixArtError, match="32-wide text features .* 64-wide text encoder"):
        export_pipeline(alpha, alpha_model, tmp_path / "out")
    shutil.rmtree(alpha / "vae")
    with pytest.raises(PixArtError, match="has no vae folder"):
        export_pipeline(alpha, alpha_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: …` line a failed command ends with (info logs may come before it), checked."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def test_cli_bad_inputs_fail_with_one_line(tmp_path, capsys, monkeypatch):
    base = save_pipeline(tmp_path / "base", "alpha")
    out = tmp_path / "out"

    missing = run_cli("export", "diffusers", out, "--base", base, "--transformer", tmp_path / "nope.pth", home=tmp_path)
    assert "nope.pth" in error_line(missing) and not out.exists()

    out.mkdir()
    (out / "old").write_text("x")
    busy = run_cli("export", "diffusers", out, "--base", base, "--transformer", base, home=tmp_path)
    assert "--force" in error_line(busy) and (out / "old").read_text() == "x"

    # In-process (a fresh interpreter costs seconds): offline, with an empty cache, a hub id fails in one line.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_id = "PixArt-alpha/PixArt-XL-2-1024-MS"
    assert main(["export", "diffusers", str(tmp_path / "o2"), "--base", hub_id, "--transformer", str(base)]) == 2
    offline = capsys.readouterr().err.strip().splitlines()[-1]
    assert offline.startswith("error: ") and hub_id in offline and "offline" in offline

    assert main(["export"]) == 2 and "diffusers" in capsys.readouterr().out
    assert main(["export", "diffusers", str(tmp_path / "o3"), "--base", str(base), "--transformer", str(base),
                 "--lora", str(tmp_path / "no-lora")]) == 2  # fmt: skip
    assert "no-lora" in capsys.readouterr().err and not (tmp_path / "o3").exists()
