"""Image-to-image and inpainting follow diffusers' Stable Diffusion pipelines, and `pixart generate` exposes them.

The reference is a loop written here from diffusers' StableDiffusionImg2ImgPipeline and the 4-channel branch of
StableDiffusionInpaintPipeline: their timestep trimming (``get_timesteps``; LCM's ``set_timesteps(strength=)``),
the posterior sample and noise drawn in that order from the seed's generator, ``add_noise`` at ``timesteps[:1]``,
the blend with the input noised to ``timesteps[i + 1]``. It runs diffusers' T5 prompt encoding, AutoencoderKL and
image processors, and the transformer the pipeline loaded (so a merged LoRA or a step cache is the same model).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from pixart.errors import PixArtError
from pixart.inference.pipeline import PixArtPipeline
from pixart.sampling.samplers import SAMPLERS, make_scheduler
from pixart.sampling.step_cache import StepCache
from tiny import CPU_FP32, random_lora, readme_commands, run_shell, save_pipeline

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a small red fox in the snow"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def alpha(tmp_path_factory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("img2img") / "alpha", "alpha")


@pytest.fixture(scope="module")
def pipe(alpha) -> PixArtPipeline:
    return PixArtPipeline.from_pretrained(alpha, **CPU_FP32)  # diffusers' fp32 steps are the reference


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """An input with structure at every scale: smooth gradients plus a bright block and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = [250, 240, 30]
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def half_mask(width: int, height: int) -> Image.Image:
    """White (repaint) on the right half."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@torch.no_grad()
def reference(folder, model, image, *, sampler, seed, steps, guidance, strength, mask=None) -> Image.Image:
    """SD img2img / inpainting (4-channel branch) in diffusers' steps, at the image's own size."""
    base = PixArtAlphaPipeline.from_pretrained(folder, transformer=None)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    scheduler = make_scheduler(sampler, base.scheduler.config)
    guided = guidance > 1
    text, text_mask, null, null_mask = base.encode_prompt(PROMPT, guided, clean_caption=True, device="cpu")
    if guided:
        text, text_mask = torch.cat([null, text]), torch.cat([null_mask, text_mask])
    if sampler == "lcm":  # LatentConsistencyModelImg2ImgPipeline: the scheduler trims
        scheduler.set_timesteps(steps, strength=strength)
        timesteps = scheduler.timesteps
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps
        scheduler.set_timesteps(steps)
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
    processor = VaeImageProcessor(vae_scale_factor=8)
    generator = torch.Generator().manual_seed(seed)
    pixels = processor.preprocess(image)
    image_latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(image_latents.shape, generator=generator)
    if mask is not None and strength == 1:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1])
    if mask is not None:
        mask_processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        repaint = mask_processor.preprocess(mask.resize(image.size), image.height, image.width)
        latent_mask = torch.nn.functional.interpolate(repaint, size=latents.shape[-2:])
    height, width = image.height, image.width
    size = {"resolution": torch.tensor([[height, width]] * (1 + guided), dtype=torch.float32),
            "aspect_ratio": torch.tensor([height / width] * (1 + guided))}  # fmt: skip
    # prepare_extra_step_kwargs: stochastic solvers (LCM's multistep too) draw from the same generator
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(timesteps):
        x = scheduler.scale_model_input(torch.cat([latents] * (1 + guided)), t)
        out = model(x, t.expand(len(x)), text, text_mask, **size)
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        latents = scheduler.step(out[:, :4], t, latents, **kwargs, return_dict=False)[0]
        if mask is not None:
            kept = image_latents
            if i < len(timesteps) - 1:
                kept = scheduler.add_noise(kept, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - latent_mask) * kept + latent_mask * latents
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return processor.postprocess(decoded, output_type="pil")[0]


@pytest.mark.parametrize(
    "sampler, strength, guidance, steps",
    [
        ("dpm++", 0.6, 4.5, 5),  # multistep: the solver's history starts at the first kept step
        ("ddim", 0.5, 4.5, 6),
        ("euler", 1.0, 4.5, 4),  # full strength still adds the image at sigma_max, as diffusers does
        ("heun", 0.7, 4.5, 3),  # second order: two entries per step in the timesteps it trims
        ("lcm", 0.5, 1.0, 4),  # LCM trims inside set_timesteps (original 50 steps × strength)
    ],
)
def test_image_to_image_matches_the_diffusers_steps(alpha, pipe, sampler, strength, guidance, steps):
    image = photo()
    settings = {"sampler": sampler, "seed": 5, "steps": steps, "guidance": guidance}
    ours = pipe(PROMPT, image=image, strength=strength, binning=False, show_progress=False, **settings)[0]
    ref = reference(alpha, pipe.transformer, image, strength=strength, **settings)
    assert ours.size == image.size
    assert ours.info["strength"] == str(strength)
    assert mean_abs_diff(ours, ref) <= 0.01  # a float's rounding may flip the odd pixel, no more
    # The comparison can fail: another seed draws other noise, and the image itself shows through.
    other = reference(alpha, pipe.transformer, image, strength=strength, **{**settings, "seed": 6})
    assert mean_abs_diff(ours, other) > 3.0
    if strength < 1:
        assert mean_abs_diff(ours, image) < mean_abs_diff(pipe(PROMPT, binning=False, width=64, height=48,
                                                               show_progress=False, **settings)[0], image)  # fmt: skip


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_matches_the_diffusers_steps_and_keeps_the_unmasked_pixels(alpha, pipe, strength):
    image, mask = photo(), half_mask(100, 70)  # the mask is resized to the image
    settings = {"sampler": "dpm++", "seed": 3, "steps": 5, "guidance": 4.5}
    ours = pipe(PROMPT, image=image, mask=mask, strength=strength, mask_blur=0, binning=False,
                show_progress=False, **settings)[0]  # fmt: skip
    ref = reference(alpha, pipe.transformer, image, mask=mask, strength=strength, **settings)
    out, src = np.asarray(ours), np.asarray(image)
    assert np.array_equal(out[:, :32], src[:, :32])  # hard edge: kept pixels are the input's, byte for byte
    assert np.abs(out[:, 32:].astype(int) - src[:, 32:]).mean() > 10
    # Inside the mask, what diffusers' blended loop decodes (outside, diffusers does not paste back).
    assert np.abs(out[:, 32:].astype(float) - np.asarray(ref)[:, 32:]).mean() <= 0.01
    assert ours.info["mask_blur"] == "0" and ours.info["strength"] == str(strength)


@pytest.mark.parametrize("sampler", [name for name, s in SAMPLERS.items() if not s.timesteps])
def test_every_sampler_inpaints_from_a_trimmed_schedule(pipe, sampler):
    image = photo()
    settings = {"sampler": sampler, "seed": 2, "steps": 4, "strength": 0.5, "mask_blur": 0, "binning": False}
    out = np.asarray(pipe(PROMPT, image=image, mask=half_mask(64, 48), show_progress=False, **settings)[0])
    src = np.asarray(image)
    assert np.array_equal(out[:, :32], src[:, :32])
    assert np.abs(out[:, 32:].astype(int) - src[:, 32:]).mean() > 5  # repainted, not the input again


def test_a_fixed_timestep_sampler_cannot_start_from_an_image(pipe):
    with pytest.raises(PixArtError, match=r"^the dmd sampler runs only its distilled timesteps from pure noise"):
        pipe(PROMPT, image=photo(), sampler="dmd", show_progress=False)


def test_inpainting_feathers_the_paste_by_default(pipe):
    image = photo()
    kwargs = {"image": image, "mask": half_mask(64, 48), "seed": 3, "steps": 3, "binning": False}
    feathered = pipe(PROMPT, show_progress=False, **kwargs)[0]
    hard = pipe(PROMPT, mask_blur=0, show_progress=False, **kwargs)[0]
    assert feathered.info["mask_blur"] == "4" and feathered.info["strength"] == "1.0"
    out, sharp, src = (np.asarray(x).astype(int) for x in (feathered, hard, image))
    assert np.array_equal(out[:, :16], src[:, :16])  # far from the edge: still the input
    assert np.array_equal(out[:, 48:], sharp[:, 48:])  # far inside: the generated pixels
    # Either side of the edge, a blend: generated pixels leak out and input pixels leak in.
    assert np.abs(out[:, 29:32] - src[:, 29:32]).mean() > 1 and np.abs(out[:, 32:35] - sharp[:, 32:35]).mean() > 1


@pytest.mark.parametrize("change", ["lora", "cache-steps"])
def test_image_to_image_works_with_a_lora_and_step_caching(alpha, tmp_path, change):
    if change == "lora":
        loaded = PixArtPipeline.from_pretrained(alpha, **CPU_FP32, loras=[(random_lora(alpha, tmp_path / "l"), 1)])
        model = loaded.transformer
    else:
        loaded = PixArtPipeline.from_pretrained(alpha, **CPU_FP32, cache_steps=2)
        model = functools.partial(loaded.transformer, block_hook=StepCache(len(loaded.transformer.blocks), 2))
    image = photo()
    settings = {"sampler": "dpm++", "seed": 8, "steps": 6, "guidance": 4.5, "strength": 0.8}
    ours = loaded(PROMPT, image=image, binning=False, show_progress=False, **settings)[0]
    assert mean_abs_diff(ours, reference(alpha, model, image, **settings)) <= 0.01
    plain = PixArtPipeline.from_pretrained(alpha, **CPU_FP32)
    without = plain(PROMPT, image=image, binning=False, show_progress=False, **settings)[0]
    # The tiny model's one cached block of two changes little; the LoRA changes every weight.
    assert mean_abs_diff(ours, without) > (1.0 if change == "lora" else 0.0)


def test_a_batch_draws_one_noise_per_image_as_each_seed_alone(pipe):
    image = photo()
    settings = {"seed": 4, "steps": 3, "strength": 0.9, "binning": False, "show_progress": False}
    batch = pipe(PROMPT, image=image, num_images=2, batch_size=2, **settings)
    alone = pipe(PROMPT, image=image, **{**settings, "seed": 5})[0]
    assert batch[1].info["seed"] == "5"
    assert mean_abs_diff(batch[1], alone) <= 0.5
    assert mean_abs_diff(batch[0], batch[1]) > 3.0


def test_the_size_defaults_to_the_input_and_an_explicit_one_resizes_it(pipe):
    settings = {"seed": 1, "steps": 2, "binning": False, "show_progress": False}
    # Not a multiple of the 16-px patch grid (the size rule without binning): rounded down.
    assert pipe(PROMPT, image=photo(72, 40), **settings)[0].size == (64, 32)
    image = photo(96, 48)
    assert pipe(PROMPT, image=image, **settings)[0].size == (96, 48)
    assert pipe(PROMPT, image=image, width=64, **settings)[0].size == (64, 32)  # the height keeps the aspect
    assert pipe(PROMPT, image=image, width=32, height=64, **settings)[0].size == (32, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 0.5}, "strength given without an input image"),
        ({"mask": half_mask(8, 8)}, "a mask given without an input image"),
        ({"image": photo(), "mask_blur": 2}, "mask blur applies to inpainting only"),
        ({"image": photo(), "mask": Image.new("L", (64, 48))}, "the mask has no white pixel"),
        ({"image": photo(), "strength": 0.1, "steps": 4}, "strength 0.1 with 4 steps leaves no step to run"),
        ({"image": photo(), "strength": 0.02, "sampler": "lcm", "steps": 4}, "strength 0.02 with 4 steps:"),
    ],
)
def test_the_library_refuses_inputs_it_cannot_use(pipe, kwargs, message):
    with pytest.raises(PixArtError, match=f"^{message}"):
        pipe(PROMPT, binning=False, show_progress=False, **kwargs)


# ------------------------------------------------------------------ the command line, in real processes


def run_cli(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pixart", "generate", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "denoising" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def pixel_hash(path: Path, mode: str) -> str:
    image = Image.open(path).convert(mode)
    return hashlib.sha256(f"{mode} {image.width}x{image.height}\n".encode() + image.tobytes()).hexdigest()


def test_cli_inpaints_records_its_inputs_and_reproduces_from_the_png(tmp_path):
    image, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out"
    photo(64, 64).save(image)
    half_mask(32, 32).save(mask)
    args = ["a blue square", "--steps", "3", "--seed", "9", "--out", out]
    result = run_cli(*args, "--image", image, "--mask", mask, "--strength", "0.8", "--mask-blur", "0")
    assert result.returncode == 0, result.stderr
    made = Path(result.stdout.strip())
    info = Image.open(made).info
    assert (info["strength"], info["mask_blur"]) == ("0.8", "0")
    assert info["image_sha256"] == pixel_hash(image, "RGB") and info["mask_sha256"] == pixel_hash(mask, "L")
    pixels, src = np.asarray(Image.open(made)), np.asarray(Image.open(image))
    assert np.array_equal(pixels[:, :32], src[:, :32]) and not np.array_equal(pixels[:, 32:], src[:, 32:])

    again = run_cli("--from-png", made, "--image", image, "--mask", mask, "--out", out)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(again.stdout.strip())), pixels)

    other = tmp_path / "other.png"
    photo(64, 64, seed=1).save(other)
    line = one_error_line(run_cli("--from-png", made, "--image", other, "--mask", mask, "--out", out))
    assert line.startswith(f"error: --image {other} is not the image {made} was made from")
    line = one_error_line(run_cli("--from-png", made, "--out", out))
    assert line.startswith(f"error: {made} was made from an input image (sha256 {info['image_sha256'][:12]}…)")
    line = one_error_line(run_cli("--from-png", made, "--image", image, "--out", out))
    assert line.startswith(f"error: {made} was made from an input mask")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{missing}"], "error: image {missing} does not exist"),
        (["--image", "{junk}"], "error: cannot read image {junk}: cannot identify image file"),
        (["--image", "{image}", "--mask", "{junk}"], "error: cannot read mask {junk}: cannot identify image file"),
        (["--image", "{image}", "--strength", "0"], "error: strength must be a number above 0 and at most 1, got 0.0"),
        (["--image", "{image}", "--strength", "1.5"], "error: strength must be a number above 0 and at most 1, got"),
        (["--image", "{image}", "--mask", "{black}"], "error: mask {black} has no white pixel"),
        (["--image", "{image}", "--mask-blur", "-1"], "error: mask blur must be a whole number of pixels from 0"),
        (
            ["--image", "{image}", "--runtime", "openvino", "--model", "{missing}"],
            "error: {missing} is not an OpenVINO export (no pixart_openvino.json)",
        ),  # an export without the VAE encoder: tests/test_openvino.py
    ],
)
def test_cli_bad_image_input_is_one_line(tmp_path, args, message):
    files = {"missing": tmp_path / "missing.png", "junk": tmp_path / "junk.png", "image": tmp_path / "in.png",
             "black": tmp_path / "black.png"}  # fmt: skip
    files["junk"].write_bytes(b"not an image")
    photo().save(files["image"])
    Image.new("L", (64, 48)).save(files["black"])
    result = run_cli("a cat", "--steps", "2", "--out", tmp_path / "out", *(a.format(**files) for a in args))
    assert one_error_line(result).startswith(message.format(**files))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_readme_example_runs_on_the_demo_model(tmp_path):
    """The README's image-to-image and inpainting commands, as a user pastes them, in a fresh folder."""
    commands = readme_commands("### Image-to-image and inpainting")
    result = run_shell(commands, tmp_path)
    assert result.returncode == 0, result.stderr
    start, inpainted, again = (np.asarray(Image.open(tmp_path / "demo" / name)) for name in
                               ("00000-1.png", "00002-3.png", "00003-3.png"))  # fmt: skip
    assert np.array_equal(inpainted[:32], start[:32]) and not np.array_equal(inpainted[32:], start[32:])
    assert np.array_equal(again, inpainted)
