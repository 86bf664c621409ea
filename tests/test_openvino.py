"""OpenVINO export and runtime: images match PyTorch's on the tiny pipelines; INT8 costs little; CLI behaves.

Export uses the tiny diffusers pipeline folders of tests/tiny.py; the reference is our PyTorch
pipeline on the same folder, seed and settings.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tests.tiny import CPU_FP32, needs_bf16, random_lora, save_pipeline

from test_files import assert_plain_modes
from test_img2img import half_mask, photo

ov = pytest.importorskip("openvino")

from pixart.checkpoints.convert import load_transformer  # noqa: E402
from pixart.checkpoints.lora import load_lora  # noqa: E402
from pixart.checkpoints.ours import save_pixart  # noqa: E402
from pixart.cli import main  # noqa: E402
from pixart.errors import PixArtError  # noqa: E402
from pixart.inference.openvino import export_openvino, load_openvino_pipeline, read_manifest  # noqa: E402
from pixart.inference.options import GenerationOptions  # noqa: E402
from pixart.inference.pipeline import DEMO_MODEL, PixArtPipeline  # noqa: E402

PROMPTS = ["a red fox in the snow", "a castle"]
GUIDED = GenerationOptions(seed=2, steps=4, width=64, height=64, binning=False)
PIXART = [sys.executable, "-m", "pixart"]


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # exports: -m "not slow" skips


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def sigma(tmp_path_factory):
    """A tiny Σ pipeline and its OpenVINO export, written by the real `pixart export openvino` process.
    Its tokenizer and scheduler files are private (0600), as in a locked-down cache: the export's copies are not."""
    root = tmp_path_factory.mktemp("ov")
    folder = save_pipeline(root / "sigma", "sigma")
    for path in [*(folder / "tokenizer").iterdir(), *(folder / "scheduler").iterdir()]:
        path.chmod(0o600)
    out = root / "sigma-ov"
    argv = PIXART + ["export", "openvino", str(out), "--model", str(folder), "--width", "64", "--height", "64"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    return folder, out


def test_export_is_self_contained(sigma):
    _, out = sigma
    for name in ("text_encoder", "transformer", "vae_decoder", "vae_encoder"):
        assert (out / f"{name}.xml").is_file() and (out / f"{name}.bin").is_file()
    assert (out / "tokenizer").is_dir() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert not list(out.parent.glob(".sigma-ov.*"))  # the temporary build folder is gone
    assert_plain_modes(out)


@pytest.mark.parametrize("options", [GUIDED, GUIDED.replace(guidance=1.0)], ids=["guided", "unguided"])
def test_openvino_images_match_pytorch(sigma, options):
    folder, out = sigma
    reference = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)(PROMPTS, options, show_progress=False))
    images = load_openvino_pipeline(out, threads=1)(PROMPTS, options, show_progress=False)
    got = pixels(images)
    # Same fp32 math in another kernel library: rounding may flip a pixel level here and there.
    assert np.abs(got - reference).mean() <= 0.05
    assert np.abs(got - reference).max() <= 2
    assert images[0].info["prompt"] == PROMPTS[0] and images[0].info["seed"] == "2"


def test_int8_alpha_costs_little(tmp_path):
    """α with micro-conditions, weights compressed to INT8 by NNCF: close to fp32 PyTorch, but not equal."""
    folder = save_pipeline(tmp_path / "alpha", "alpha")
    out = export_openvino(folder, tmp_path / "alpha-int8", width=64, height=64, int8=True)
    reference = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)(PROMPTS, GUIDED, show_progress=False))
    got = pixels(load_openvino_pipeline(out, threads=1)(PROMPTS, GUIDED, show_progress=False))
    assert not np.array_equal(got, reference)
    assert psnr(got, reference) > 40.0


@pytest.mark.parametrize("family", ["sigma", "alpha"])
def test_one_export_serves_other_sizes(sigma, tmp_path, family):
    """Exported at 64x64, the IR generates non-square sizes and another batch size as PyTorch does
    (α also feeds its size micro-conditions)."""
    folder, out = sigma
    if family == "alpha":
        folder = save_pipeline(tmp_path / "alpha", "alpha")
        out = export_openvino(folder, tmp_path / "alpha-ov", width=64, height=64)
    transformer = ov.Core().read_model(out / "transformer.xml")
    # Latents (batch, height, width), timesteps, caption features and mask (batch, caption length) are dynamic.
    dynamic = [[d.is_dynamic for d in i.get_partial_shape()] for i in transformer.inputs]
    micro = [[True, False], [True]] if family == "alpha" else []  # resolution (B, 2), aspect ratio (B,)
    assert dynamic == [[True, False, True, True], [True], [True, True, False], [True, True], *micro]
    pipe, reference = (
        load_openvino_pipeline(out, threads=1),
        PixArtPipeline.from_pretrained(folder, **CPU_FP32),
    )
    for options in (GUIDED.replace(width=96, height=64), GUIDED.replace(width=64, height=128, batch_size=2)):
        expected = pixels(reference(PROMPTS, options, show_progress=False))
        got = pixels(pipe(PROMPTS, options, show_progress=False))
        assert got.shape == expected.shape == (2, options.height, options.width, 3)
        # The tolerance of test_openvino_images_match_pytorch.
        assert np.abs(got - expected).mean() <= 0.05
        assert np.abs(got - expected).max() <= 2


def test_cli_generate_openvino(sigma, tmp_path):
    _, out = sigma
    argv = PIXART + ["generate", "a fox", "--runtime", "openvino", "--model", str(out), "--steps", "2", "--seed", "1"]
    argv += ["--width", "64", "--height", "64", "--no-binning", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_openvino_starts_from_an_image_as_pytorch_does(sigma, tmp_path, inpaint):
    """The exported VAE encoder gives the posterior PyTorch's does: the same seeded start, the same image."""
    folder, out = sigma
    image, mask = photo(64, 48), half_mask(64, 48) if inpaint else None
    settings = dict(image=image, mask=mask, seed=4, steps=4, binning=False, show_progress=False)
    settings |= {"mask_blur": 0} if inpaint else {"strength": 0.5}
    expected = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)(PROMPTS, **settings))
    got = pixels(load_openvino_pipeline(out, threads=1)(PROMPTS, **settings))
    assert got.shape == expected.shape == (2, 48, 64, 3)
    # The tolerance of test_openvino_images_match_pytorch.
    assert np.abs(got - expected).mean() <= 0.05
    assert np.abs(got - expected).max() <= 2
    if inpaint:  # mask blur 0: the kept half is the input's, pixel for pixel
        assert np.array_equal(got[:, :, :32], np.stack([np.asarray(image)[:, :32]] * 2))


def test_the_exported_vae_encoder_gives_pytorchs_posterior(sigma):
    """The tiny VAE barely shows its input through the tiny transformer, so its posterior is compared directly."""
    from diffusers import AutoencoderKL

    folder, out = sigma
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    exported = load_openvino_pipeline(out, threads=1)._loaded["vae"]
    for size in ((48, 64), (64, 96)):  # traced at 64 × 64: other sizes too
        pixels = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(size[1])) * 2 - 1
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist
        got = exported.encode(pixels).latent_dist
        assert got.mean.shape == expected.mean.shape == (2, 4, size[0] // 8, size[1] // 8)
        torch.testing.assert_close(got.mean, expected.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.std, expected.std, atol=1e-4, rtol=1e-4)
        assert (expected.mean[0] - expected.mean[1]).abs().mean() > 1e-3  # the two inputs do differ


def test_cli_generate_openvino_inpaints_and_an_old_export_says_to_re_export(sigma, tmp_path, capsys):
    folder, out = sigma
    photo(64, 48).save(tmp_path / "in.png")
    half_mask(64, 48).save(tmp_path / "mask.png")
    argv = ["generate", "a fox", "--runtime", "openvino", "--steps", "2", "--seed", "1", "--no-binning"]
    argv += ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--mask-blur", "0"]
    assert main(argv + ["--model", str(out), "--out", str(tmp_path / "new")]) == 0
    made = Image.open(next((tmp_path / "new").glob("*.png")))
    assert made.size == (64, 48) and made.info["image_sha256"] and made.info["mask_blur"] == "0"
    assert np.array_equal(np.asarray(made)[:, :32], np.asarray(photo(64, 48))[:, :32])
    capsys.readouterr()
    old = tmp_path / "old-export"  # as exports were before the encoder: everything but vae_encoder.*
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("vae_encoder.*"))
    assert main(argv + ["--model", str(old), "--out", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: the OpenVINO export {old} has no VAE encoder") and "\n" not in err
    assert "re-export it with `pixart export openvino`" in err
    assert not (tmp_path / "old").exists() or not list((tmp_path / "old").glob("*.png"))
    # Text-to-image still runs from the old export; image inputs through the library get the same line.
    pipe = load_openvino_pipeline(old, threads=1)
    assert len(pipe("a fox", seed=1, steps=1, width=64, height=64, binning=False, show_progress=False)) == 1
    with pytest.raises(PixArtError, match="has no VAE encoder"):
        pipe("a fox", image=photo(64, 48), steps=2, binning=False, show_progress=False)


def test_cli_generate_openvino_refuses_torch_flags(sigma, tmp_path, capsys):
    argv = ["generate", "a fox", "--runtime", "openvino", "--model", str(sigma[1]), "--out", str(tmp_path)]
    lora = tmp_path / "x.safetensors"  # exists, so the refusal is the runtime's, not the missing file's
    lora.write_bytes(b"")
    assert main(argv + ["--lora", str(lora), "--compile"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: not with --runtime openvino (it runs the exported folder as is, on CPU): --lora, --compile"
    )


def test_cli_export_bad_model(tmp_path, capsys):
    assert main(["export", "openvino", str(tmp_path / "x"), "--model", str(tmp_path / "absent")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(f"error: model {str(tmp_path / 'absent')!r} is neither an existing folder")
    )
    assert not (tmp_path / "x").exists()


def test_export_merges_loras_and_finds_the_transformers_pipeline(sigma, tmp_path):
    """--transformer of a pipeline's transformer/ folder needs no --model; LoRAs are merged before the trace."""
    folder, _ = sigma
    lora = random_lora(folder / "transformer", tmp_path / "lora")
    out = tmp_path / "lora-ov"
    argv = ["export", "openvino", str(out), "--transformer", str(folder / "transformer"), "--lora", f"{lora}:0.7"]
    assert main(argv + ["--width", "64", "--height", "64"]) == 0
    assert read_manifest(out)["source"]["loras"] == [[str(lora), 0.7]]
    loaded = PixArtPipeline.from_pretrained(folder, **CPU_FP32, loras=[(lora, 0.7)])
    reference = pixels(loaded(PROMPTS, GUIDED, show_progress=False))
    got = pixels(load_openvino_pipeline(out, threads=1)(PROMPTS, GUIDED, show_progress=False))
    base = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)(PROMPTS, GUIDED, show_progress=False))
    # The LoRA moves the images by 10x the tolerance, so matching them means it was merged.
    assert np.abs(base - reference).mean() > 0.5
    # The tolerance of test_openvino_images_match_pytorch.
    assert np.abs(got - reference).mean() <= 0.05
    assert np.abs(got - reference).max() <= 2


@pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="the bundled demo model is not installed")
def test_export_of_a_demo_transformer_file_needs_no_model(tmp_path):
    lora = random_lora(DEMO_MODEL / "transformer", tmp_path / "lora")
    tuned = save_pixart(load_lora(load_transformer(DEMO_MODEL), lora, merge=True), tmp_path / "tuned.safetensors")
    out = tmp_path / "demo-ov"
    assert main(["export", "openvino", str(out), "--transformer", str(tuned), "--lora", f"{lora}:-0.5"]) == 0
    options = GenerationOptions(seed=1, steps=3)
    reference = PixArtPipeline.from_pretrained(None, tuned, **CPU_FP32, loras=[(lora, -0.5)])
    expected = pixels(reference(PROMPTS, options, show_progress=False))
    got = pixels(load_openvino_pipeline(out, threads=1)(PROMPTS, options, show_progress=False))
    assert np.abs(got - expected).mean() <= 0.05
    assert np.abs(got - expected).max() <= 2


def op_types(path) -> set[str]:
    return {op.get_type_name() for op in ov.Core().read_model(path).get_ops()}


def quantized_matmuls(path) -> dict[str, bool]:
    """Each MatMul and Convolution of an IR, by name: whether a FakeQuantize (or its INT8 weights' Convert)
    feeds one of its inputs, possibly through a Convert, Multiply or Subtract of dequantization."""

    def quantized(node, depth=0) -> bool:
        kind = node.get_type_name()
        if kind == "FakeQuantize" or (kind == "Constant" and node.get_element_type() in (ov.Type.i8, ov.Type.u8)):
            return True
        if depth < 4 and kind in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose"):
            return any(quantized(i.get_source_output().get_node(), depth + 1) for i in node.inputs())
        return False

    ops = ov.Core().read_model(path).get_ops()
    return {
        op.get_friendly_name(): any(quantized(i.get_source_output().get_node()) for i in op.inputs())
        for op in ops
        if op.get_type_name() in ("MatMul", "Convolution")
    }


def test_full_int8_quantizes_activations_on_calibration_latents(tmp_path):
    """`--int8 full`: FakeQuantize nodes (activations quantized, ranges from generated latents) in the
    transformer only, and the image stays near fp32 PyTorch's (measured 34-35 dB on the tiny pipelines)."""
    folder = save_pipeline(tmp_path / "alpha", "alpha")
    out = tmp_path / "alpha-int8-full"
    argv = PIXART + ["export", "openvino", str(out), "--model", str(folder), "--width", "64", "--height", "64"]
    done = subprocess.run(argv + ["--int8", "full"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "FakeQuantize" in op_types(out / "transformer.xml")
    assert "FakeQuantize" not in op_types(out / "text_encoder.xml")  # T5: weights only
    assert read_manifest(out)["int8_mode"] == "full"
    quantized = quantized_matmuls(out / "transformer.xml")
    # The blocks' linears read INT8; the embeddings, the timestep/size path and the final projection stay float.
    assert quantized["__module.blocks.0.attn.qkv/aten::linear/MatMul"]
    assert quantized["__module.blocks.1.mlp.fc2/aten::linear/MatMul"]
    edges = {name: q for name, q in quantized.items() if not name.startswith("__module.blocks.")}
    assert {"t_block", "t_embedder", "y_embedder", "final_layer", "csize_embedder", "x_embedder"} <= {
        name.split(".")[1] for name in edges
    }
    assert not any(edges.values()), [name for name, q in edges.items() if q]
    reference = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)(PROMPTS, GUIDED, show_progress=False))
    got = pixels(load_openvino_pipeline(out, threads=1)(PROMPTS, GUIDED, show_progress=False))
    assert not np.array_equal(got, reference)
    assert psnr(got, reference) > 28.0


@pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="the bundled demo model is not installed")
def test_full_int8_demo_keeps_following_prompts(tmp_path, capsys):
    """The demo exported with `--int8 full` and scored by `pixart eval --runtime openvino` stays near fp32 PyTorch
    on held-out prompts. With the embeddings, the timestep path and the final layer quantized too (NNCF's
    defaults), about 11 of these 49 two-object scenes broke (71-73 % fully correct on 200 prompts against 95.5 %)."""
    import json

    out = tmp_path / "demo-int8"
    assert main(["export", "openvino", str(out), "--int8", "full"]) == 0
    capsys.readouterr()
    scores = {}
    for name, flags in (("fp32", ["--dtype", "fp32"]), ("int8", ["--runtime", "openvino", "--model", str(out)])):
        assert main(["eval", "--prompts", "64", "--json", *flags]) == 0
        scores[name] = json.loads(capsys.readouterr().out)
    reference, got = scores["fp32"], scores["int8"]
    one, two = 100 / reference["n_single"], 100 / reference["n_pair"]  # one image's worth of each score
    assert got["single_all"] >= reference["single_all"] - 1.5 * one, scores
    assert got["pair_full"] >= reference["pair_full"] - 2.5 * two, scores
    assert main(["eval", "--runtime", "openvino", "--model", str(out), "--cache-threshold", "0.2"]) == 2
    assert capsys.readouterr().err.strip().endswith("on CPU): --cache-threshold")


def test_transformer_runs_only_the_caption_tokens_in_use(sigma):
    """The IR attends a padded caption through its mask; the pipeline cuts the padding no caption uses first, as
    PyTorch does, so the caption projection and cross-attention run on the used tokens only, to rounding the same."""
    from pixart.inference.openvino import OVTransformer, shared_core, transformer_inputs
    from pixart.model.config import PixArtConfig

    folder, out = sigma
    config = PixArtConfig.from_dict(read_manifest(out)["config"])
    net = OVTransformer(shared_core(), out / "transformer.xml", 1, config, None)
    lengths = []
    run = net.run
    net.run = lambda *inputs: lengths.append(inputs[2].shape[1]) or run(*inputs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g)
    y = torch.randn(2, config.model_max_length, config.caption_channels, generator=g)
    mask = torch.zeros(2, config.model_max_length, dtype=torch.long)
    mask[0, :5], mask[1, :3] = 1, 1
    t = torch.tensor([500.0, 500.0])
    trimmed = net(x, t, y, mask)
    padded = run(*transformer_inputs(config, x, t, y, mask, None, None))
    assert lengths == [5]
    assert torch.allclose(trimmed, padded, atol=1e-4, rtol=1e-4)
    reference = load_transformer(folder).eval()
    with torch.no_grad():
        expected = reference(x, t, y, mask)
    assert torch.allclose(trimmed, expected, atol=1e-4, rtol=1e-4)
    mask[1] = 0  # a caption with no token attends to every position, in PyTorch too: nothing is cut
    net(x, t, y, mask)
    assert lengths == [5, config.model_max_length]


def test_weight_only_int8_has_no_activation_quantizers(tmp_path):
    folder = save_pipeline(tmp_path / "sigma", "sigma")
    out = export_openvino(folder, tmp_path / "sigma-int8", width=64, height=64, int8=True)
    assert "FakeQuantize" not in op_types(out / "transformer.xml")
    assert read_manifest(out)["int8_mode"] == "weights"


def test_calibration_records_every_model_call_in_the_irs_input_order(tmp_path):
    from pixart.inference.openvino_int8 import calibration_inputs

    pipe = PixArtPipeline.from_pretrained(save_pipeline(tmp_path / "alpha", "alpha"), **CPU_FP32)
    samples = calibration_inputs(pipe, ["a fox", "a castle"], steps=3, width=64, height=64)
    assert len(samples) == 6  # two prompts, three steps each
    x, timestep, y, mask, resolution, aspect = samples[0]  # α: the size micro-conditions come last
    assert x.shape == (2, 4, 8, 8) and y.shape[0] == 2 and mask.shape == y.shape[:2]  # guided: null and prompt
    assert resolution.tolist() == [[64.0, 64.0]] * 2 and aspect.tolist() == [1.0, 1.0]
    assert len({float(s[1][0]) for s in samples[:3]}) == 3  # latents at three different timesteps
    assert not np.array_equal(samples[0][0], samples[1][0])


@pytest.mark.parametrize(
    ("asked", "flags", "expected"),
    [
        ("auto", {"avx512f", "avx512_bf16"}, "bf16"),
        ("auto", {"amx_bf16"}, "bf16"),
        ("auto", {"avx512f", "avx2"}, "f32"),
        ("f32", {"avx512_bf16"}, "f32"),
        ("bf16", {"avx512_bf16"}, "bf16"),
        ("bf16", {"avx2"}, "f32"),  # with a warning: emulated bf16 is far slower than f32
    ],
)
def test_precision_follows_the_cpus_units(asked, flags, expected):
    from pixart.inference.cpu_units import CpuUnits
    from pixart.inference.openvino import resolve_precision

    assert resolve_precision(asked, CpuUnits("a test CPU", frozenset(flags))) == expected


@needs_bf16  # without the units OpenVINO would run f32
def test_bf16_runs_close_to_f32(sigma):
    _, out = sigma
    f32 = load_openvino_pipeline(out, threads=1)
    bf16 = load_openvino_pipeline(out, threads=1, precision="bf16")
    assert bf16.transformer.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    assert f32.transformer.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    with bf16._stage("vae") as vae:  # the VAE too, as PyTorch's bf16 runs it
        assert vae.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
        assert vae.encoder.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    with f32._stage("vae") as vae:
        assert vae.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    a = pixels(f32(PROMPTS, GUIDED, show_progress=False))
    b = pixels(bf16(PROMPTS, GUIDED, show_progress=False))
    assert not np.array_equal(a, b)
    assert psnr(a, b) > 35.0  # measured 41-45 dB on the tiny pipelines


def test_cli_precision_flags(sigma, tmp_path, capsys):
    _, out = sigma
    argv = ["generate", "a fox", "--model", str(out), "--out", str(tmp_path), "--ov-precision", "bf16"]
    assert main(argv) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --ov-precision applies to --runtime openvino; for PyTorch choose --dtype"
    )
    argv += ["--runtime", "openvino", "--steps", "2", "--seed", "1", "--width", "64", "--height", "64", "--no-binning"]
    assert main(argv) == 0
    assert len(list(tmp_path.glob("*.png"))) == 1


# Two pipelines loaded, freed in the order they were made, then signals that run a Python handler: with a Core per
# pipeline OpenVINO's CPU plugin left the main thread on a freed signal stack and the next SIGCHLD or SIGTERM killed
# the process with SIGSEGV (it killed a pytest-xdist worker in CI). Its own process, so a crash fails only this test.
SIGNALS_AFTER_TWO_PIPELINES = """
import gc, os, signal, subprocess, sys, time
from pixart.inference.openvino import load_openvino_pipeline
first = load_openvino_pipeline(sys.argv[1], threads=1)
second = load_openvino_pipeline(sys.argv[1], threads=1)
del first; gc.collect()
del second; gc.collect()
seen = []
signal.signal(signal.SIGCHLD, lambda *_: seen.append("CHLD"))  # as torch's DataLoader installs one
signal.signal(signal.SIGTERM, lambda *_: seen.append("TERM"))  # as pixart serve does
for _ in range(3):
    subprocess.run(["true"])
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.1)
print(sorted(set(seen)))
"""


def test_freeing_pipelines_leaves_signal_handling_intact(sigma):
    _, out = sigma
    done = subprocess.run([sys.executable, "-c", SIGNALS_AFTER_TWO_PIPELINES, str(out)], capture_output=True, text=True)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split("\n")[-2] == "['CHLD', 'TERM']"
