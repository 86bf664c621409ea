"""torch.compile: the compiled transformer makes the eager image, and the compile time is reported."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.tiny import CPU_FP32, needs_int8, save_pipeline

from pixart.checkpoints.convert import load_transformer
from pixart.errors import PixArtError
from pixart.inference.devices import compile_seconds
from pixart.inference.options import GenerationOptions
from pixart.inference.pipeline import PixArtPipeline
from pixart.sampling.step_cache import cached_denoiser, runs_every_block

OPTIONS = GenerationOptions(seed=5, steps=3, width=64, height=64, binning=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_compiled_image_matches_eager(tmp_path):
    folder = save_pipeline(tmp_path / "sigma", "sigma")
    eager_pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32)
    eager = np.asarray(eager_pipe("a fox", OPTIONS, show_progress=False)[0], dtype=np.float64)
    assert eager_pipe.last_run.compile_seconds is None

    pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, compile=True)
    compiled = np.asarray(pipe("a fox", OPTIONS, show_progress=False)[0], dtype=np.float64)
    # Inductor fuses and reorders float ops: equal up to rounding, a pixel level at most.
    assert np.abs(compiled - eager).max() <= 1.0
    assert np.abs(compiled - eager).mean() <= 0.05
    assert pipe.last_run.compile_seconds > 0
    assert "torch.compile" in pipe.last_run.summary()


def test_compiled_step_cache_matches_cached_eager(tmp_path):
    folder = save_pipeline(tmp_path / "sigma", "sigma")
    eager_model = load_transformer(folder).eval()
    model = copy.deepcopy(eager_model)
    model.compile(regional=True)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    eager_cache, compiled_cache = cached_denoiser(eager_model, 2), cached_denoiser(model, 2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 120, 32, generator=gen)
    mask = torch.zeros(2, 120, dtype=torch.long)
    mask[0, :7], mask[1, :12] = 1, 1
    with torch.no_grad():
        for t in (900.0, 700.0, 500.0, 300.0):  # full, cached, full, cached
            x = x + 0.1 * torch.randn(x.shape, generator=gen)
            timestep = torch.tensor([t, t])
            expected, got = eager_cache(x, timestep, y, mask), compiled_cache(x, timestep, y, mask)
            # Inductor reorders float sums; fp32 rounding stays far below the step cache's own change.
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        uncached = eager_model(x, timestep, y, mask)
    assert (expected - uncached).abs().max() > 1e-2  # the last call did reuse a residual
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # the blocks ran compiled

    options = OPTIONS.replace(steps=5)  # full steps 0, 2, 4
    eager_pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, cache_steps=2)
    eager = pixels(eager_pipe("a fox", options, show_progress=False)[0])
    pipe = PixArtPipeline.from_pretrained(folder, **CPU_FP32, compile=True, cache_steps=2)
    compiled = pixels(pipe("a fox", options, show_progress=False)[0])
    assert np.abs(compiled - eager).max() <= 1.0  # as for the uncached compiled run above
    assert np.abs(compiled - eager).mean() <= 0.05
    assert pipe.last_run.compile_seconds > 0
    assert "torch.compile" in pipe.last_run.summary()


def test_cli_compile_with_step_cache(tmp_path):
    folder = save_pipeline(tmp_path / "sigma", "sigma")
    argv = [sys.executable, "-m", "pixart", "generate", "a fox", "--model", str(folder), "--device", "cpu"]
    argv += ["--width", "64", "--height", "64", "--no-binning", "--steps", "3", "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*argv, "--compile", "--cache-steps", "2"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    assert "torch.compile" in done.stderr, done.stderr[-3000:]


def test_compile_seconds_compares_the_first_step_with_later_full_steps():
    # Steps of 10 s (compiling), then full steps of 2 s and step-cached ones of 0.5 s.
    durations = [10.0, 0.5, 2.0, 0.5, 2.0]
    ends = np.cumsum([0.0, *durations]).tolist()
    assert compile_seconds(ends, [runs_every_block(k, 2) for k in range(5)]) == pytest.approx(8.0)
    assert compile_seconds(ends) == pytest.approx(8.75)  # every step taken as full: the median is 1.25 s


def test_compile_without_a_cxx_compiler_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ to find
    with pytest.raises(PixArtError, match=r"^--compile on CPU needs a C\+\+ compiler \(g\+\+ or clang\+\+\) on PATH"):
        PixArtPipeline.from_pretrained(tmp_path / "absent", **CPU_FP32, compile=True)


@needs_int8
def test_compiled_int8_transformer_makes_the_eager_int8_image(tmp_path):
    """--quantize int8 --compile: inductor runs the dynamic int8 linears as eager does."""
    folder = save_pipeline(tmp_path / "sigma", "sigma")
    fp32 = pixels(PixArtPipeline.from_pretrained(folder, **CPU_FP32)("a fox", OPTIONS, show_progress=False)[0])
    eager = pixels(
        PixArtPipeline.from_pretrained(folder, device="cpu", quantize="int8")("a fox", OPTIONS, show_progress=False)[0]
    )
    pipe = PixArtPipeline.from_pretrained(folder, device="cpu", quantize="int8", compile=True)
    compiled = pixels(pipe("a fox", OPTIONS, show_progress=False)[0])
    assert np.abs(eager - fp32).mean() > 0.1  # int8 did run (measured: 0.5 levels on average, 3 at most)
    # Measured: one level at most, 1e-4 on average; the rounding of the fused float ops around the linears.
    assert np.abs(compiled - eager).max() <= 1.0
    assert np.abs(compiled - eager).mean() <= 0.05
    assert pipe.last_run.compile_seconds > 0
