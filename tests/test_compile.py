"""torch.compile: the compiled transformer makes the eager image, and the compile time is reported."""

from __future__ import annotations

import numpy as np
import pytest
from tests.tiny import save_pipeline

from pixart.cli import main
from pixart.pipeline import GenerationOptions, PixArtPipeline

OPTIONS = GenerationOptions(seed=5, steps=3, width=64, height=64, binning=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_image_matches_eager(tmp_path):
    folder = save_pipeline(tmp_path / "sigma", "sigma")
    eager_pipe = PixArtPipeline.from_pretrained(folder, device="cpu")
    eager = np.asarray(eager_pipe("a fox", OPTIONS, show_progress=False)[0], dtype=np.float64)
    assert eager_pipe.last_run.compile_seconds is None

    pipe = PixArtPipeline.from_pretrained(folder, device="cpu", compile=True)
    compiled = np.asarray(pipe("a fox", OPTIONS, show_progress=False)[0], dtype=np.float64)
    # Inductor fuses and reorders float ops: equal up to rounding, a pixel level at most.
    assert np.abs(compiled - eager).max() <= 1.0
    assert np.abs(compiled - eager).mean() <= 0.05
    assert pipe.last_run.compile_seconds > 0
    assert "torch.compile" in pipe.last_run.summary()


def test_cli_refuses_compile_with_step_cache(tmp_path, capsys):
    argv = ["generate", "a fox", "--model", str(tmp_path), "--out", str(tmp_path), "--compile", "--cache-steps", "2"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: --cache-steps cannot be combined with --compile yet; choose one"
