"""One-step DMD sampling gives the official DMD app's image, with one transformer pass per image.

The reference is the official app's recipe (PixArt-sigma ``app/app_pixart_dmd.py`` with its patched
PixArtAlphaPipeline call) written out with diffusers' own classes: the model's scheduler config as a
DDPMScheduler, the single timestep 400 from pure noise, guidance 1, and the step's ``pred_original_sample``
decoded by the VAE, x̂0 unclipped as the official DMD training computes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, PixArtAlphaPipeline
from tests.tiny import scheduler, tiny_text_encoder, tiny_transformer, tiny_vae

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.diffusers import DIFFUSERS_PICKLE
from pixart.errors import PixArtError
from pixart.inference.options import GenerationOptions, read_png_metadata, save_image
from pixart.inference.pipeline import PixArtPipeline
from pixart.sampling.samplers import SAMPLERS, default_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

DMD_ID = "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512"
PROMPT = "a small cactus with a happy face in the sahara desert"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny α pipeline shaped like the 512-px release DMD was distilled from (sample_size 64, no micro-conditions)."""
    path = tmp_path_factory.mktemp("dmd") / "alpha-512"
    tokenizer, text_encoder = tiny_text_encoder()
    transformer = tiny_transformer("alpha", seed=3, sample_size=64, interpolation_scale=1, micro_conditions=False)
    PixArtAlphaPipeline(tokenizer, text_encoder, tiny_vae(), transformer, scheduler()).save_pretrained(path)
    return path


def dmd_release(root: Path) -> Path:
    """A folder laid out as the DMD release is, under its name: model_index.json, scheduler/ and transformer/ with
    pickled weights only (diffusion_pytorch_model.bin); no T5, no VAE."""
    release = root / DMD_ID.split("/")[1]
    model = tiny_transformer("alpha", seed=3, sample_size=64, interpolation_scale=1, micro_conditions=False)
    model.save_pretrained(release / "transformer", safe_serialization=False)
    DDPMScheduler.from_config(scheduler().config).save_pretrained(release / "scheduler")
    (release / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    return release


@torch.no_grad()
def official_dmd_image(folder: Path, prompt: str, seed: int, width: int, height: int) -> np.ndarray:
    """The official DMD app's image, step by step with diffusers' classes (uint8, H × W × 3)."""
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)  # the app: DDPMScheduler.from_pretrained(model)
    text, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=120)
    ddpm.set_timesteps(timesteps=[400])
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = pipe.prepare_latents(1, 4, height, width, text.dtype, "cpu", generator, None)
    (t,) = ddpm.timesteps
    out = pipe.transformer(
        latents,
        encoder_hidden_states=text,
        encoder_attention_mask=mask,
        timestep=t.reshape(1),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    eps = out.chunk(2, dim=1)[0]  # learned sigma: the ε half
    # The official DMD training's x̂0 (scripts/DMD/transformer_train/generate.py eps_to_mu): unclipped.
    alpha = ddpm.alphas_cumprod[t]
    x0 = (latents - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    pixels = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="np")[0].__mul__(255).round().astype(np.uint8)


def test_dmd_matches_the_official_recipe(folder):
    # fp32 as the reference runs it: the default on a CPU with bf16 units would decode in bf16 (a few levels off).
    ours = PixArtPipeline.from_pretrained(folder, device="cpu", dtype="fp32")(
        PROMPT, sampler="dmd", seed=7, width=96, height=64, binning=False
    )[0]
    ref = official_dmd_image(folder, PROMPT, seed=7, width=96, height=64)
    got = np.asarray(ours, dtype=np.int16)
    assert got.shape == ref.shape and got.std() > 5  # a real image, not a flat one that would match anything
    assert np.abs(got - ref).max() <= 1  # float rounding only


def test_dmd_runs_one_unguided_forward_per_image(folder):
    pipe = PixArtPipeline.from_pretrained(folder, device="cpu")
    rows: list[int] = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        images = pipe(PROMPT, sampler="dmd", seed=1, num_images=3, batch_size=2, width=64, height=64, binning=False)
    finally:
        hook.remove()
    assert len(images) == 3
    assert rows == [2, 1]  # one call per batch, one row per image: no unconditional rows
    assert pipe.last_run.steps == 2  # one denoising step per batch


def test_dmd_checkpoint_picks_dmd_and_the_png_reproduces_it(folder, tmp_path):
    transformer = dmd_release(tmp_path) / "transformer"
    pipe = PixArtPipeline.from_pretrained(folder, transformer=transformer, device="cpu")
    resolved = pipe.resolve()
    assert (resolved.sampler, resolved.steps, resolved.guidance) == ("dmd", 1, 1.0)
    assert PixArtPipeline.from_pretrained(folder, device="cpu").resolve().sampler == "dpm++"  # the base is not DMD

    image = pipe(PROMPT, seed=5, width=64, height=64, binning=False)[0]
    info = read_png_metadata(save_image(image, tmp_path / "out"))
    assert (info["sampler"], info["steps"], info["guidance"]) == ("dmd", "1", "1.0")
    prompt, options, load = GenerationOptions.from_metadata(info)
    assert load.transformer == str(transformer)
    again = pipe(prompt, options)[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))


def test_dmd_default_follows_the_checkpoint_name_not_the_scheduler():
    dmd = SAMPLERS["dmd"]
    assert default_sampler({}, [DMD_ID]) is dmd
    assert default_sampler({}, ["/models/pixart-alpha-dmd-xl-2-512x512/transformer"]) is dmd  # a local copy
    assert default_sampler({}, ["", "PixArt-alpha/PixArt-XL-2-512x512"]).name == "dpm++"
    # A plain DDPM config (others ship them too) does not make a model a DMD one.
    assert default_sampler({"_class_name": "DDPMScheduler"}).name == "dpm++"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 4}, r"^the dmd sampler runs the 1 step\(s\) its weights were distilled at \(timesteps 400\), not 4"),
        ({"guidance": 4.5}, r"^the dmd sampler runs without guidance.*got guidance 4.5; leave guidance unset or"),
    ],
)
def test_dmd_refuses_other_steps_or_guidance(changes, message):
    with pytest.raises(PixArtError, match=message):
        GenerationOptions(sampler="dmd", **changes)
    GenerationOptions(sampler="dmd", steps=1, guidance=1.0)  # what it runs is accepted
    GenerationOptions(sampler="dmd", guidance=0.0)  # ≤ 1 is "off" everywhere


def test_pickled_diffusers_weights_load_as_the_safetensors_copy(folder, tmp_path):
    release = dmd_release(tmp_path)
    assert [f.name for f in (release / "transformer").iterdir() if f.suffix != ".json"] == [DIFFUSERS_PICKLE]
    pickled = load_transformer(release)
    # The same weights as safetensors, which every other release ships (the seed-3 tiny transformer of `folder`).
    expected = load_transformer(folder)
    assert pickled.config == expected.config
    got, want = pickled.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pickled_weights_that_would_run_code_are_refused(tmp_path):
    release = dmd_release(tmp_path)
    torch.save({"x": torch.zeros(1), "hook": print}, release / "transformer" / DIFFUSERS_PICKLE)
    with pytest.raises(PixArtError, match=r"^refusing to load .*model\.bin: it holds pickled objects"):
        load_transformer(release)


def test_cli_runs_the_dmd_release_from_the_hub_cache_offline(folder, tmp_path):
    # The hub cache's own layout (refs/main names the snapshot), holding the release as the hub does; offline,
    # huggingface_hub's real snapshot_download serves it, first the config, then (no safetensors) the .bin.
    repo = tmp_path / "hf-home" / "hub" / ("models--" + DMD_ID.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots").mkdir(parents=True)
    dmd_release(tmp_path).rename(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    args = [PROMPT, "--model", str(folder), "--transformer", DMD_ID, "--seed", "4", "--width", "64", "--height", "64"]
    done = subprocess.run(
        [sys.executable, "-m", "pixart", "generate", *args, "--no-binning", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = read_png_metadata(done.stdout.strip())
    assert (info["sampler"], info["steps"], info["guidance"], info["transformer"]) == ("dmd", "1", "1.0", DMD_ID)

    refused = subprocess.run(
        [sys.executable, "-m", "pixart", "generate", *args, "--steps", "20", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.strip().splitlines()[-1].startswith("error: the dmd sampler runs the 1 step(s)")


def test_the_server_runs_dmd_for_the_dmd_model_and_refuses_guidance_for_it(folder, tmp_path):
    from pixart.serve.app import ImageService, ServeLimits

    pipe = PixArtPipeline.from_pretrained(folder, transformer=dmd_release(tmp_path) / "transformer", device="cpu")
    service = ImageService(pipe, ServeLimits(), tmp_path / "served")
    (path, info), *rest = service.generate(PROMPT, service.options(PROMPT, width=64, height=64, binning=False))
    assert rest == [] and path.is_file() and (info["sampler"], info["steps"]) == ("dmd", "1")
    with pytest.raises(PixArtError, match=r"^the dmd sampler runs without guidance.*got guidance 3.0"):
        service.options(PROMPT, sampler="dmd", guidance=3.0)
