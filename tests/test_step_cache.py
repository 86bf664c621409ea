"""Step caching: off is exact, on skips the deep blocks it says it skips, at a bounded cost in quality."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tests.tiny import CPU_FP32, save_pipeline

from pixart import PixArtTransformer, preset
from pixart.cli import main
from pixart.errors import PixArtError
from pixart.inference.options import GenerationOptions
from pixart.inference.pipeline import PixArtPipeline
from pixart.sampling.step_cache import StepCache, cached_denoiser, check_cache_steps, check_cache_threshold

OPTIONS = GenerationOptions(seed=3, steps=8, width=64, height=64, binning=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("tiny") / "sigma", "sigma")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def count_block_calls(model) -> list[int]:
    """Forward hooks on the model's own blocks, independent of the cache's bookkeeping."""
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_every_step_fresh_is_the_model_exactly(folder):
    model = PixArtPipeline.from_pretrained(folder, **CPU_FP32)._loaded["transformer"]
    torch.manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 120, 32)
    mask = torch.zeros(2, 120, dtype=torch.long)
    mask[0, :7], mask[1, :12] = 1, 1
    with torch.no_grad():
        for t in (900.0, 300.0):
            expected = model(x, torch.tensor([t, t]), y, mask)
            cache = StepCache(len(model.blocks), every=1)
            assert torch.equal(model(x, torch.tensor([t, t]), y, mask, block_hook=cache), expected)


def test_strength_0_and_1_give_the_uncached_image(folder):
    plain = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)("a fox", OPTIONS, show_progress=False))
    for strength in (0, 1):
        pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, cache_steps=strength)
        assert np.array_equal(pixels(pipe("a fox", OPTIONS, show_progress=False)), plain)


def test_caching_skips_deep_blocks_at_a_bounded_cost(folder):
    plain_pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32)
    plain_calls = count_block_calls(plain_pipe._loaded["transformer"])
    plain = pixels(plain_pipe("a fox", OPTIONS, show_progress=False))
    assert plain_calls == [8, 8]  # 8 steps, guided passes batched: one call per block per step

    pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, cache_steps=3)
    calls = count_block_calls(pipe._loaded["transformer"])
    cached = pixels(pipe("a fox", OPTIONS, show_progress=False))
    # Depth 2: block 0 always runs; block 1 only on steps 0, 3 and 6.
    assert calls == [8, 3]
    assert not np.array_equal(cached, plain)
    assert psnr(cached, plain) > 30.0


def test_a_cached_call_adds_the_deep_blocks_residual_of_the_last_full_call(folder):
    model = PixArtPipeline.from_pretrained(folder, **CPU_FP32)._loaded["transformer"]  # depth 2: block 0 is fresh
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 120, 32, generator=gen)
    mask = torch.ones(2, 120, dtype=torch.long)
    denoiser = cached_denoiser(model, 3)
    with torch.no_grad():
        for k, t in enumerate((900.0, 800.0, 700.0, 600.0)):  # full, cached, cached, full
            x = x + 0.1 * torch.randn(x.shape, generator=gen)
            tokens, cy, cmask, temb, t0, hw = model.embed(x, torch.tensor([t, t]), y, mask)
            fresh = model.blocks[0](tokens, cy, t0, cmask, hw)
            if k % 3 == 0:
                deep = model.blocks[1](fresh, cy, t0, cmask, hw)
                residual, out = deep - fresh, deep
            else:
                out = fresh + residual
                assert not torch.allclose(out, model.blocks[1](fresh, cy, t0, cmask, hw), atol=1e-3)  # stale
            expected = model.head(out, temb, hw)
            assert torch.equal(denoiser(x, torch.tensor([t, t]), y, mask), expected)


def test_cache_is_off_for_0_and_1_and_refuses_a_foreign_model():
    model = PixArtTransformer(preset("debug-sigma"))
    assert cached_denoiser(model, 0) is model and cached_denoiser(model, 1) is model
    with pytest.raises(PixArtError, match="step caching needs the PyTorch transformer"):
        cached_denoiser(torch.nn.Linear(2, 2), 2)
    with pytest.raises(PixArtError, match="fresh blocks must be from 0 to 2 for this model, got 3"):
        StepCache(3, every=2, fresh_blocks=3)


@pytest.mark.parametrize("bad", [-1, 11, 2.5, True])
def test_bad_strength_is_refused(bad):
    with pytest.raises(PixArtError, match="cache steps must be an integer from 0 to 10"):
        check_cache_steps(bad)


def test_cli_cache_steps(folder, tmp_path):
    base = [sys.executable, "-m", "pixart", "generate", "a fox", "--model", str(folder), "--device", "cpu"]
    base += ["--width", "64", "--height", "64", "--no-binning", "--steps", "4", "--seed", "1"]
    done = subprocess.run(base + ["--cache-steps", "2", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_cli_bad_cache_steps(folder, tmp_path, capsys):
    assert main(["generate", "a fox", "--model", str(folder), "--cache-steps", "50", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: cache steps must be an integer from 0 to 10 (0 or 1: off; N: every block runs on one step in N), got 50"
    )


# ---------------------------------------------------------------- adaptive caching (cache_threshold)


def test_threshold_0_is_the_uncached_image_and_every_step_runs(folder):
    plain = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)("a fox", OPTIONS, show_progress=False))
    model = PixArtPipeline.from_pretrained(folder, **CPU_FP32)._loaded["transformer"]
    decisions: list[bool] = []
    denoiser = cached_denoiser(model, 0, 0.0, decisions)
    assert denoiser is model  # off: the model itself, nothing in between
    hook = StepCache(len(model.blocks), threshold=0.0, decisions=decisions)
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 120, 32)
    mask = torch.ones(2, 120, dtype=torch.long)
    with torch.no_grad():
        for t in (900.0, 899.0):  # nearly the same input twice: a positive threshold would reuse the second
            expected = model(x, torch.tensor([t, t]), y, mask)
            assert torch.equal(model(x, torch.tensor([t, t]), y, mask, block_hook=hook), expected)
    assert decisions == [True, True]
    pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, cache_threshold=0.0)
    assert np.array_equal(pixels(pipe("a fox", OPTIONS, show_progress=False)), plain)
    assert pipe.last_run.full_steps is None


def test_the_largest_threshold_runs_only_the_first_step_fully(folder):
    plain = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)("a fox", OPTIONS, show_progress=False))
    pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, cache_threshold=1.0)
    calls = count_block_calls(pipe._loaded["transformer"])
    cached = pixels(pipe("a fox", OPTIONS.replace(num_images=2, batch_size=2), show_progress=False))
    assert calls == [8, 1]  # the first block every step, the deep block once; cond and uncond decided together
    assert (pipe.last_run.full_steps, pipe.last_run.steps) == (1, 8)
    assert "1 of 8 steps ran every block" in pipe.last_run.summary()
    assert not np.array_equal(cached[:1], plain)


def first_block_change(model, x, t, y, mask, before):
    """The first block's residual and its relative L1 change from ``before``, computed from the model's parts."""
    tokens, cy, cmask, _, t0, hw = model.embed(x, torch.tensor([t, t]), y, mask)
    residual = model.blocks[0](tokens, cy, t0, cmask, hw) - tokens
    change = float("inf") if before is None else float((residual - before).abs().sum() / before.abs().sum())
    return residual, change


def test_each_step_is_decided_by_the_first_blocks_change_since_the_last_full_step(folder):
    model = PixArtPipeline.from_pretrained(folder, **CPU_FP32)._loaded["transformer"]  # depth 2: block 0 is fresh
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 120, 32, generator=gen)
    mask = torch.ones(2, 120, dtype=torch.long)
    threshold = 0.05
    decisions: list[bool] = []
    denoiser = cached_denoiser(model, 0, threshold, decisions)
    # Small nudges add up from the last full step until they cross the threshold; a jump crosses it at once.
    nudges = (0.0, 0.01, 0.01, 0.01, 0.01, 0.01, 1.0, 0.0, 0.01)
    reference, expected_decisions, changes = None, [], []
    with torch.no_grad():
        for k, nudge in enumerate(nudges):
            x = x + nudge * torch.randn(x.shape, generator=gen)
            t = 900.0 - k
            residual, change = first_block_change(model, x, t, y, mask, reference)
            full = change >= threshold
            if full:
                reference = residual
            expected_decisions.append(full)
            changes.append(change)
            out = denoiser(x, torch.tensor([t, t]), y, mask)
            if full:
                assert torch.equal(out, model(x, torch.tensor([t, t]), y, mask))
    assert decisions == expected_decisions
    # The case exercises both sides: steps reused below the threshold, and full steps above it after the first.
    assert expected_decisions[0] and not all(expected_decisions) and sum(expected_decisions[1:]) >= 2
    assert any(threshold * 0.2 < c < threshold for c in changes)  # a near miss was reused, not just zeros


def test_adaptive_caching_composes_with_a_lora(folder, tmp_path):
    from tests.tiny import random_lora

    adapter = random_lora(folder / "transformer", tmp_path / "lora", std=0.2)
    plain = PixArtPipeline.from_pretrained(folder, **CPU_FP32, loras=[(adapter, 1.0)])
    plain = pixels(plain("a fox", OPTIONS, show_progress=False))
    without = PixArtPipeline.from_pretrained(folder, **CPU_FP32, cache_threshold=0.3)
    without = pixels(without("a fox", OPTIONS, show_progress=False))
    pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, loras=[(adapter, 1.0)], cache_threshold=0.3)
    cached = pixels(pipe("a fox", OPTIONS, show_progress=False))
    assert 1 < pipe.last_run.full_steps < 8
    # The merged LoRA acts in the cached steps as in the full ones: near the LoRA's own image, far from the base's.
    assert psnr(cached, plain) > psnr(cached, without) + 3
    assert psnr(cached, plain) > 25.0


def test_threshold_with_a_controlnet_or_cache_steps_is_refused(folder):
    from PIL import Image

    from pixart.model.controlnet import PixArtControlNet

    with pytest.raises(PixArtError, match=r"choose one of cache steps \(3\) and cache threshold \(0.1\)"):
        PixArtPipeline.from_pretrained(folder, **CPU_FP32, cache_steps=3, cache_threshold=0.1)
    pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, cache_threshold=0.1)
    net = PixArtControlNet.from_transformer(pipe._loaded["transformer"], num_blocks=1)
    control = Image.new("RGB", (64, 64))
    with pytest.raises(PixArtError, match=r"step caching \(--cache-threshold\) does not combine with a ControlNet"):
        pipe("a fox", OPTIONS, control=control, controlnet=net, show_progress=False)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.1", True])
def test_bad_threshold_is_refused(bad):
    with pytest.raises(PixArtError, match="cache threshold must be a number from 0 to 1.0"):
        check_cache_threshold(bad)


def test_cli_cache_threshold_reports_full_steps_and_round_trips_through_the_png(folder, tmp_path):
    base = [sys.executable, "-m", "pixart", "generate", "--model", str(folder), "--device", "cpu", "--dtype", "fp32"]
    size = ["--width", "64", "--height", "64", "--no-binning", "--steps", "6", "--seed", "1"]
    done = subprocess.run(base + ["a fox", *size, "--cache-threshold", "0.3", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"\b[1-5] of 6 steps ran every block", done.stderr), done.stderr
    (png,) = (tmp_path / "a").glob("*.png")
    assert Image.open(png).info["cache_threshold"] == "0.3"
    again = subprocess.run(
        base + ["--from-png", str(png), "--out", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    (copy,) = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(png)))


def test_cli_cache_threshold_beside_cache_steps_is_one_line(folder, tmp_path, capsys):
    flags = ["--cache-steps", "2", "--cache-threshold", "0.1", "--out", str(tmp_path)]
    assert main(["generate", "a fox", "--model", str(folder), *flags]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: choose one of cache steps (2) and cache threshold (0.1): a fixed schedule or an adaptive one"
    )
