"""Step caching: off is exact, on skips the deep blocks it says it skips, at a bounded cost in quality."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.tiny import save_pipeline

from pixart import PixArtTransformer, preset
from pixart.cli import main
from pixart.errors import PixArtError
from pixart.inference.options import GenerationOptions
from pixart.inference.pipeline import PixArtPipeline
from pixart.sampling.step_cache import StepCache, cached_denoiser, check_cache_steps

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
    model = PixArtPipeline.from_pretrained(folder, device="cpu")._loaded["transformer"]
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
    plain = pixels(PixArtPipeline.from_pretrained(folder, device="cpu")("a fox", OPTIONS, show_progress=False))
    for strength in (0, 1):
        pipe = PixArtPipeline.from_pretrained(folder, device="cpu", cache_steps=strength)
        assert np.array_equal(pixels(pipe("a fox", OPTIONS, show_progress=False)), plain)


def test_caching_skips_deep_blocks_at_a_bounded_cost(folder):
    plain_pipe = PixArtPipeline.from_pretrained(folder, device="cpu")
    plain_calls = count_block_calls(plain_pipe._loaded["transformer"])
    plain = pixels(plain_pipe("a fox", OPTIONS, show_progress=False))
    assert plain_calls == [8, 8]  # 8 steps, guided passes batched: one call per block per step

    pipe = PixArtPipeline.from_pretrained(folder, device="cpu", cache_steps=3)
    calls = count_block_calls(pipe._loaded["transformer"])
    cached = pixels(pipe("a fox", OPTIONS, show_progress=False))
    # Depth 2: block 0 always runs; block 1 only on steps 0, 3 and 6.
    assert calls == [8, 3]
    assert not np.array_equal(cached, plain)
    assert psnr(cached, plain) > 30.0


def test_a_cached_call_adds_the_deep_blocks_residual_of_the_last_full_call(folder):
    model = PixArtPipeline.from_pretrained(folder, device="cpu")._loaded["transformer"]  # depth 2: block 0 is fresh
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
