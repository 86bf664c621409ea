"""Generation reproduces diffusers' PixArt pipelines pixel for pixel, and `pixart generate` behaves.

The reference is diffusers' own PixArtAlphaPipeline / PixArtSigmaPipeline run on the same tiny
pipeline folder with the same seed, steps, guidance and size.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline
from PIL import Image
from tests.tiny import save_pipeline, scheduler, tiny_text_encoder, tiny_transformer, tiny_vae

from pixart.cli import main
from pixart.errors import PixArtError
from pixart.inference.options import GenerationOptions, LoadSettings, read_png_metadata, save_image
from pixart.inference.pipeline import PixArtPipeline
from pixart.sampling.samplers import make_scheduler
from test_files import umask

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def binned_pipeline(path: Path, family: str, sample_size: int) -> Path:
    """A tiny pipeline whose transformer has a small bin table (256 px: 32, 512 px: 64), so binning is cheap."""
    tokenizer, text_encoder = tiny_text_encoder()
    transformer = tiny_transformer(
        family, seed=1, sample_size=sample_size, interpolation_scale=1, micro_conditions=False
    )
    cls = PixArtAlphaPipeline if family == "alpha" else PixArtSigmaPipeline
    cls(tokenizer, text_encoder, tiny_vae(), transformer, scheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "alpha": save_pipeline(root / "alpha", "alpha"),
        "sigma": save_pipeline(root / "sigma", "sigma"),
        "alpha-512": binned_pipeline(root / "alpha-512", "alpha", 64),
        "sigma-256": binned_pipeline(root / "sigma-256", "sigma", 32),
    }


def diffusers_image(folder: Path, prompt: str, *, sampler: str, seed: int, steps: int, guidance: float, **kwargs):
    cls = PixArtSigmaPipeline if "sigma" in folder.name else PixArtAlphaPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator, **kwargs)
    return out.images[0]


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@pytest.mark.parametrize(
    "name, sampler, width, height, binning, guidance",
    [
        ("alpha", "dpm++", 128, 96, False, 4.5),  # α with micro-conditions (sample_size 128)
        ("sigma", "ddim", 96, 128, False, 4.5),
        ("alpha-512", "euler", 200, 96, True, 4.5),  # → the 512-px bin of ratio ≈ 0.5, resized and cropped back
        ("sigma-256", "dpm++", 96, 160, True, 4.5),
        ("sigma", "sa-solver", 64, 64, False, 3.0),  # stochastic: its noise comes from the same generator
        ("alpha", "lcm", 64, 64, False, 1.0),
    ],
)
def test_matches_diffusers(folders, name, sampler, width, height, binning, guidance):
    folder = folders[name]
    prompt = "A small red fox in the snow, highly detailed"
    settings = {"seed": 11, "steps": 3, "guidance": guidance, "width": width, "height": height}
    ours = PixArtPipeline.from_pretrained(folder, device="cpu", dtype="fp32")
    ours = ours(prompt, sampler=sampler, binning=binning, **settings)
    ref = diffusers_image(folder, prompt, sampler=sampler, use_resolution_binning=binning, **settings)
    assert np.asarray(ours[0]).std() > 5  # a real image, not a flat one that would match anything
    assert mean_abs_diff(ours[0], ref) <= 1.0


def test_sampler_defaults_follow_the_model(folders):
    pipe = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu", low_memory=True)
    assert (pipe.resolve().sampler, pipe.resolve().steps, pipe.resolve().guidance) == ("dpm++", 20, 4.5)
    assert (pipe.resolve().max_tokens, pipe.resolve().width) == (300, 1024)  # Σ; sample_size 128 × VAE factor 8
    pipe.scheduler_config = {"_class_name": "LCMScheduler"}  # as PixArt-LCM-XL-2-1024-MS ships
    assert (pipe.resolve().sampler, pipe.resolve().steps, pipe.resolve().guidance) == ("lcm", 4, 1.0)
    assert pipe.resolve(sampler="sa-solver").steps == 25


def test_half_precision_on_cpu_is_warned(caplog):
    from pixart.inference.devices import resolve_dtype

    with caplog.at_level("WARNING", logger="pixart.inference.devices"):
        assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    assert "very slow" in caplog.text  # bf16, which CPUs may run fast, is tested in test_cpu_precision.py
    with pytest.raises(PixArtError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_no_guidance_runs_conditional_only_and_matches_diffusers(folders):
    pipe = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu")
    ours = pipe("a lighthouse", seed=2, steps=2, guidance=1.0, width=64, height=64, binning=False)[0]
    ref = diffusers_image(
        folders["sigma"],
        "a lighthouse",
        sampler="dpm++",
        seed=2,
        steps=2,
        guidance=1.0,
        width=64,
        height=64,
        use_resolution_binning=False,
    )
    assert mean_abs_diff(ours, ref) <= 1.0


def test_low_memory_gives_the_same_image(folders):
    options = GenerationOptions(seed=4, steps=2, width=32, height=48, binning=False, negative_prompt="blurry")
    normal = PixArtPipeline.from_pretrained(folders["alpha"], device="cpu")("a boat", options)[0]
    low = PixArtPipeline.from_pretrained(folders["alpha"], device="cpu", low_memory=True)
    assert low._loaded == {}  # nothing stays resident between calls
    image = low("a boat", options)[0]
    assert np.array_equal(np.asarray(normal), np.asarray(image))
    assert low._loaded == {}


def test_t5_int8_and_vae_tiling_change_little(folders):
    options = GenerationOptions(seed=1, steps=2, width=32, height=32, binning=False)
    full = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu")
    int8 = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu", t5_quantization="int8-dynamic")
    q_proj = int8._loaded["text_encoder"].model.encoder.block[0].layer[0].SelfAttention.q
    assert type(q_proj).__module__ == "torch.ao.nn.quantized.dynamic.modules.linear"
    a, b = (np.asarray(p("a tree", options)[0]).astype(float) for p in (full, int8))
    assert 0 < np.abs(a - b).mean() < 3  # quantised, yet the same picture
    # The tiny VAE tiles above 64 px: a 256-px decode goes through tiles and blends their seams.
    tiled = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu", vae_tiling=True)
    big = options.replace(width=256, height=256)
    c, d = (np.asarray(p("a tree", big)[0]).astype(float) for p in (full, tiled))
    assert c.shape == d.shape == (256, 256, 3) and 0 < np.abs(c - d).mean() < 20


def test_seeds_per_image_progress_and_prompt_deduplication(folders):
    pipe = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu")
    options = GenerationOptions(seed=20, steps=2, width=32, height=32, binning=False)
    encoded = []
    hook = pipe._loaded["text_encoder"].model.register_forward_hook(lambda m, a, o: encoded.append(a[0].shape[0]))
    calls = []
    try:
        images = pipe(["a cat", "a cat"], options.replace(num_images=2), progress=lambda d, t: calls.append((d, t)))
    finally:
        hook.remove()
    assert encoded == [1, 1]  # "a cat" and the negative "" once each, each read alone at its own length
    assert calls[-1] == (8, 8) and len(calls) == 8
    assert [im.info["seed"] for im in images] == ["20", "21", "22", "23"]
    alone = pipe("a cat", options.replace(seed=21))[0]
    assert np.array_equal(np.asarray(images[1]), np.asarray(alone))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_alpha_learned_null_caption_is_used_without_negative_prompt(folders):
    from diffusers import AutoencoderKL

    from pixart.checkpoints.convert import load_transformer
    from pixart.model.text import TextEncoder

    folder = folders["alpha"]
    text_encoder = TextEncoder.from_pretrained(folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    learned = load_transformer(folder)
    with torch.no_grad():  # what an official checkpoint has and a diffusers folder lacks
        learned.y_embedder.y_embedding.copy_(torch.randn_like(learned.y_embedder.y_embedding))
    flipped = load_transformer(folder)
    with torch.no_grad():
        flipped.y_embedder.y_embedding.copy_(-learned.y_embedder.y_embedding)
    options = GenerationOptions(seed=1, steps=2, width=32, height=32, binning=False)

    def run(transformer, negative):
        pipe = PixArtPipeline(text_encoder, transformer, vae, {}, device=torch.device("cpu"), dtype=torch.float32)
        return np.asarray(pipe("a tree", options.replace(negative_prompt=negative))[0]).astype(float)

    # No negative prompt: the checkpoint's own null caption steers guidance, so changing it changes the image.
    assert np.abs(run(learned, None) - run(flipped, None)).mean() > 1
    # An explicit negative prompt (even "") is T5-encoded, and the null caption plays no part.
    assert np.array_equal(run(learned, ""), run(flipped, ""))
    # A diffusers folder has no null caption: no negative prompt means T5 of "", as in diffusers.
    assert np.array_equal(run(load_transformer(folder), None), run(learned, ""))


def trained_lora(folder: Path, out: Path) -> Path:
    """A LoRA on the folder's transformer as training leaves it: B is no longer zero, so it changes images."""
    from pixart.checkpoints.convert import load_transformer
    from pixart.checkpoints.lora import add_lora, save_lora

    model = load_transformer(folder)
    add_lora(model, rank=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn_like(param) * 0.5)
    return save_lora(model, out)


def test_lora_is_merged_at_its_scale(folders, tmp_path):
    adapter = trained_lora(folders["sigma"], tmp_path / "lora")
    options = GenerationOptions(seed=3, steps=2, width=32, height=32, binning=False)

    def run(loras):
        pipe = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu", loras=loras)
        return np.asarray(pipe("a tree", options)[0]).astype(float)

    base = run(None)
    assert np.array_equal(run([(adapter, 0.0)]), base)
    assert np.abs(run([(adapter, 1.0)]) - base).mean() > 1


def test_save_image_never_overwrites(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    image.info.update({"prompt": "x", "seed": "5"})
    (tmp_path / "00000-5.png").write_bytes(b"keep me")
    first, second = save_image(image, tmp_path), save_image(image, tmp_path)
    assert (tmp_path / "00000-5.png").read_bytes() == b"keep me"
    assert {first.name, second.name} == {"00001-5.png", "00002-5.png"}
    assert Image.open(first).info["prompt"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-5.png", "00001-5.png", "00002-5.png"]
    assert stat.S_IMODE(first.stat().st_mode) == 0o666 & ~umask()  # as open() would make it, not mkstemp's 0600


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 7}, "width 7 is not allowed: use a multiple of 8"),
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"steps": -3}, "steps must be a positive integer, got -3"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"sampler": "k_lms"}, "unknown sampler 'k_lms'; choose one of dpm++"),
        ({"seed": -1}, "seed must be an integer from 0"),
    ],
)
def test_options_refuse_bad_values(kwargs, message):
    with pytest.raises(PixArtError, match=message):
        GenerationOptions(**kwargs)


def test_the_family_table_says_which_family_has_a_learned_null_caption(folders, monkeypatch):
    import dataclasses

    from pixart.checkpoints.convert import load_transformer
    from pixart.inference.pipeline import learned_null_caption
    from pixart.model.config import FAMILY

    net = load_transformer(folders["sigma"])
    with torch.no_grad():  # a real (non-placeholder) caption, which Σ ignores: it guides against T5 of ""
        net.y_embedder.y_embedding.copy_(torch.randn_like(net.y_embedder.y_embedding))
    assert learned_null_caption(net) is None
    monkeypatch.setitem(FAMILY, "sigma", dataclasses.replace(FAMILY["sigma"], learned_null_caption=True))
    assert torch.equal(learned_null_caption(net), net.y_embedder.y_embedding)


def test_size_rule_without_binning_is_the_patch_grid(folders):
    pipe = PixArtPipeline.from_pretrained(folders["sigma-256"], device="cpu", low_memory=True)
    with pytest.raises(PixArtError, match="width 72 is not allowed without binning: use a multiple of 16"):
        pipe.resolve(width=72, height=64, binning=False)
    # 64 / 72 ≈ 0.89: diffusers' 256-px table maps ratio 0.88 to 240 × 272
    assert pipe.sample_size_for(pipe.resolve(width=72, height=64)) == (240, 272)


def test_missing_default_model_says_what_to_pass(monkeypatch, tmp_path):
    import pixart.inference.pipeline

    monkeypatch.setattr(pixart.inference.pipeline, "DEMO_MODEL", tmp_path / "absent")
    with pytest.raises(PixArtError, match="pass --model with a pipeline folder or a hub id"):
        PixArtPipeline.from_pretrained(None, device="cpu")


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pixart", "generate", *args], capture_output=True, text=True, env=environment, cwd=REPO
    )


def test_cli_matches_diffusers_and_reproduces_from_metadata(folders, tmp_path):
    out = tmp_path / "out"
    args = ["a blue bird on a branch", "--model", str(folders["alpha"]), "--seed", "7", "--steps", "3"]
    result = run_cli(*args, "--width", "128", "--height", "64", "--no-binning", "--dtype", "fp32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = Path(result.stdout.strip())
    assert "steps/s" in result.stderr and "peak memory" in result.stderr
    image = Image.open(saved)
    ref = diffusers_image(
        folders["alpha"], "a blue bird on a branch", sampler="dpm++", seed=7, steps=3, guidance=4.5,
        width=128, height=64, use_resolution_binning=False,
    )  # fmt: skip
    assert mean_abs_diff(image, ref) <= 1.0
    meta = image.info
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["sampler"]) == (
        "a blue bird on a branch",
        "7",
        "3",
        "dpm++",
    )
    assert (meta["guidance"], meta["width"], meta["height"], meta["binning"]) == ("4.5", "128", "64", "false")
    assert meta["model"] == str(folders["alpha"]) and "negative_prompt" not in meta

    # Regenerate from nothing but the PNG's text chunks, once the user accepts the weights it names.
    assert main(["generate", "--from-png", str(saved), "--out", str(out), "--trust-metadata"]) == 0
    again = sorted(out.glob("*.png"))
    assert len(again) == 2
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(again[1])))


@pytest.mark.parametrize("weights", ["lora", "step-cache"])
def test_image_reproduces_from_its_png_through_the_library_and_the_cli(folders, tmp_path, weights):
    adapter = trained_lora(folders["sigma"], tmp_path / "lora")
    load = LoadSettings(str(folders["sigma"]), dtype="fp32")  # the CPU's auto dtype varies between machines
    load = load.replace(loras=((str(adapter), 0.7),)) if weights == "lora" else load.replace(cache_steps=2)
    options = GenerationOptions(seed=5, steps=4, width=32, height=32, binning=False, negative_prompt="blurry")
    made = PixArtPipeline.from_pretrained(load, device="cpu")("a red car", options)[0]
    png = save_image(made, tmp_path / "made")
    plain = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu", dtype="fp32")("a red car", options)[0]
    assert not np.array_equal(np.asarray(made), np.asarray(plain))  # what the PNG must record changes the image

    # The library alone: the PNG's text gives the prompt, the options and the weights back.
    prompt, saved, restored = GenerationOptions.from_metadata(read_png_metadata(png))
    assert (prompt, restored) == ("a red car", load)  # the dtype it ran in, recorded too
    assert saved == options.replace(sampler="dpm++", guidance=4.5, max_tokens=300)  # resolved, as the run used them
    again = PixArtPipeline.from_pretrained(restored, device="cpu")(prompt, saved)[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(png)))

    # The console command, as a user runs it, from nothing but the file.
    result = run_cli("--from-png", str(png), "--out", str(tmp_path / "cli"), "--trust-metadata")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.asarray(Image.open(result.stdout.strip())), np.asarray(Image.open(png)))


def test_from_png_flags_win_over_the_images_weights(folders, tmp_path, capsys):
    adapter = trained_lora(folders["sigma"], tmp_path / "lora")
    options = GenerationOptions(seed=2, steps=2, width=32, height=32, binning=False)
    made = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu", loras=[(adapter, 1.0)])("a tree", options)
    png = save_image(made[0], tmp_path)
    assert json.loads(Image.open(png).info["loras"]) == [[str(adapter), 1.0]]
    # --lora replaces the image's LoRAs (scale 0: none), --cache-steps and --steps add to what it says.
    args = ["--from-png", str(png), "--lora", f"{adapter}:0", "--cache-steps", "2", "--steps", "3", "--trust-metadata"]
    args.append("--out")
    assert main(["generate", *args, str(tmp_path)]) == 0
    info = Image.open(capsys.readouterr().out.strip()).info
    assert (json.loads(info["loras"]), info["cache_steps"], info["steps"]) == ([[str(adapter), 0.0]], "2", "3")
    assert info["model"] == str(folders["sigma"]) and info["seed"] == "2"


def test_from_png_does_not_load_the_weights_an_image_names_unless_told(folders, tmp_path, capsys):
    # A PNG is data anyone can write: its model, transformer and LoRA fields would be read as they stand.
    options = GenerationOptions(seed=2, steps=2, width=32, height=32, binning=False)
    made = PixArtPipeline.from_pretrained(folders["sigma"], device="cpu")("a tree", options)[0]
    made.info.update(transformer="/elsewhere/evil.pth", loras=json.dumps([["/elsewhere/style.safetensors", 0.5]]))
    png = save_image(made, tmp_path / "in")
    capsys.readouterr()  # the loading chatter so far
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"model {folders['sigma']}" in err and "transformer /elsewhere/evil.pth" in err, err
    assert "loras /elsewhere/style.safetensors:0.5" in err and "--model/--transformer/--lora" in err, err
    # Choosing the weights oneself is enough: the image's own names are not touched.
    given = ["--model", str(folders["sigma"]), "--transformer", str(folders["sigma"]), "--lora", "x:0"]
    assert main(["generate", "--from-png", str(png), *given[:4], "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "transformer" not in err and "loras /elsewhere/style.safetensors:0.5" in err and "--lora," in err, err


def test_a_demo_image_reproduces_without_naming_weights(tmp_path, capsys):
    options = GenerationOptions(seed=4, steps=2)
    made = PixArtPipeline.from_pretrained(device="cpu")("a red circle", options)[0]
    assert made.info["model"] == "" and made.info["transformer"] == ""  # no path of this machine's install
    png = save_image(made, tmp_path / "in")
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "out")]) == 0
    again = Image.open(capsys.readouterr().out.strip())
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(png)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"loras": "style.safetensors"}, "error: the image's loras metadata 'style.safetensors' is malformed"),
        ({"loras": '[["a", "x"]]'}, 'error: the image\'s loras metadata \'[["a", "x"]]\' is malformed'),
        ({"cache_steps": "two"}, "error: the image's cache_steps metadata 'two' is not a whole number"),
        ({"cache_threshold": "high"}, "error: the image's cache_threshold metadata 'high' is not a number"),
        ({"steps": "many"}, "error: the image's generation metadata is incomplete or malformed"),
        ({"seed": None}, "error: the image has no pixart generation metadata"),
    ],
)
def test_from_png_bad_metadata_is_one_line(tmp_path, capsys, change, message):
    info = {"prompt": "a", "seed": "1", "steps": "2", "sampler": "dpm++", "guidance": "4.5", "width": "32"}
    info |= {"height": "32", "max_tokens": "8"}
    image = Image.new("RGB", (8, 8))
    image.info.update({k: v for k, v in (info | change).items() if v is not None})
    png = save_image(image, tmp_path)
    assert main(["generate", "--from-png", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_from_png_needs_a_readable_image(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    for path, message in ((tmp_path / "absent.png", "does not exist"), (tmp_path / "notes.png", "cannot read")):
        assert main(["generate", "--from-png", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(path) in err, err


def test_cli_offline_hub_id_is_one_line(tmp_path):
    result = run_cli("a cat", "--model", "PixArt-alpha/PixArt-XL-2-1024-MS", env={"HF_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot fetch 'PixArt-alpha/PixArt-XL-2-1024-MS'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["a", "--model", "/no/such/model"],
            "error: model '/no/such/model' is neither an existing folder nor a hub id",
        ),
        (["a", "--width", "7"], "error: width 7 is not allowed"),
        (["a", "--steps", "0"], "error: steps must be a positive integer, got 0"),
        (["a", "--steps", "-3"], "error: steps must be a positive integer, got -3"),
        (["a", "--guidance", "nan"], "error: guidance must be a finite number"),
        (["a", "--sampler", "plms"], "error: unknown sampler 'plms'"),
        (["--prompts-file", "EMPTY"], "error: prompts file"),
        ([], "error: no prompt given"),
        (["a", "--device", "gpu"], "error: unknown device 'gpu'"),
        (["a", "--device", "cpu", "--t5-bits", "4"], "error: T5 4bit quantization (bitsandbytes) needs CUDA"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, message, tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_cli_long_prompt_is_truncated_with_a_warning(folders, tmp_path, caplog):
    prompt = "a very long prompt " * 527  # 10 013 characters
    code = main(["generate", prompt[:10000], "--model", str(folders["sigma"]), "--steps", "1", "--width", "64",
                 "--height", "64", "--no-binning", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert "caption truncated to 300 tokens" in caplog.text
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_prompts_file_feeds_several_prompts(folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na green tree\n")
    args = ["--prompts-file", str(prompts), "--model", str(folders["sigma"]), "--steps", "1", "--seed", "3"]
    assert main(["generate", *args, "--width", "64", "--height", "64", "--no-binning", "--out", str(tmp_path)]) == 0
    saved = [Path(line) for line in capsys.readouterr().out.split()]
    assert [Image.open(p).info["prompt"] for p in saved] == ["a red car", "a green tree"]
    assert [Image.open(p).info["seed"] for p in saved] == ["3", "4"]


def test_official_checkpoint_flags_reach_the_loader_and_the_png(folders, tmp_path, capsys):
    """--num-heads for an official .pth of unreleased width: refused without it, the folder's image with it."""
    from pixart.checkpoints.convert import load_transformer
    from pixart.checkpoints.official import to_official_state_dict

    state_dict = {k: v.contiguous() for k, v in to_official_state_dict(load_transformer(folders["sigma"])).items()}
    torch.save({"state_dict": state_dict}, tmp_path / "official.pth")  # no pixart_config: heads unknown
    args = ["a red car", "--model", str(folders["sigma"]), "--seed", "3", "--steps", "2", "--width", "32"]
    args += ["--height", "32", "--no-binning"]
    assert main(["generate", *args, "--transformer", str(tmp_path / "official.pth"), "--out", str(tmp_path)]) == 2
    assert "pass num_heads (--num-heads)" in capsys.readouterr().err

    flags = ["--transformer", str(tmp_path / "official.pth"), "--num-heads", "2", "--pe-scale", "2"]
    assert main(["generate", *args, *flags, "--out", str(tmp_path / "official")]) == 0
    assert main(["generate", *args, "--out", str(tmp_path / "folder")]) == 0
    (made,), (reference,) = (tmp_path / "official").glob("*.png"), (tmp_path / "folder").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(reference)))
    assert json.loads(Image.open(made).info["transformer_options"]) == {"num_heads": 2, "pe_scale": 2.0}
    assert main(["generate", "--from-png", str(made), "--out", str(tmp_path / "again"), "--trust-metadata"]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
