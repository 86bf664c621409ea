"""Calm output: a command shows pixart's own lines, bars and summaries; `pixart -v` adds the libraries' chatter.

Real commands in subprocesses (the bundled demo model, a tiny pipeline folder from tests/tiny.py); the markers
below are what transformers, torch's tracer and NNCF print on these very runs when nothing quietens them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pixart.cli import QUIET_ENV
from tiny import save_pipeline

CHATTER = ("Loading weights", "Writing model shards", "TracerWarning", "FutureWarning", "nncf", "Applying Weight")
"""Library output: transformers' loading bar and deprecations, tracing warnings, NNCF's tables and bars."""


def pixart(*args: str | Path) -> subprocess.CompletedProcess:
    # Without the switches a quiet run in this process may have set, so -v runs see what a user's shell sees.
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "pixart", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def chatter(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if any(m in line for m in CHATTER)]


def test_generate_shows_pixarts_output_and_libraries_only_with_v(tmp_path):
    quiet = pixart("generate", "a red circle", "--steps", "2", "--seed", "1", "--out", tmp_path)
    assert chatter(quiet) == []
    assert quiet.stdout == f"{tmp_path / '00000-1.png'}\n"
    assert "denoising: 100%" in quiet.stderr and "1 image(s) in" in quiet.stderr  # our bar and summary stay
    loud = pixart("-v", "generate", "a red circle", "--steps", "2", "--seed", "1", "--out", tmp_path)
    assert "Loading weights" in loud.stderr
    assert "denoising: 100%" in loud.stderr


def test_eval_shows_a_bar_over_its_prompts(tmp_path):
    done = pixart("eval", "--prompts", "3", "--steps", "2", "--batch-size", "2", "--json")
    assert "generating: 100%" in done.stderr and "3/3" in done.stderr, done.stderr
    assert chatter(done) == []
    assert done.stdout.startswith("{")  # the bar is on stderr: --json output stays parseable


@pytest.mark.slow
def test_compile_hides_dynamos_graph_break_warnings_unless_v(tmp_path):
    args = ("generate", "a red circle", "--steps", "2", "--seed", "1", "--compile", "--out", tmp_path)
    quiet = pixart(*args)
    assert "Graph break" not in quiet.stderr and "torch/_dynamo" not in quiet.stderr, quiet.stderr
    assert "torch.compile" in quiet.stderr  # our summary says what compiling cost
    assert "Graph break" in pixart("-v", *args).stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("calm") / "tiny-alpha")


@pytest.mark.slow
def test_export_openvino_shows_pixarts_output_and_libraries_only_with_v(pipeline, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    quiet = pixart("export", "openvino", tmp_path / "quiet", "--model", pipeline, "--int8")
    assert chatter(quiet) == []
    assert quiet.stdout == f"{tmp_path / 'quiet'}\n"  # NNCF's tables went to stdout: nothing but the result now
    loud = pixart("-v", "export", "openvino", tmp_path / "loud", "--model", pipeline, "--int8")
    shown = "\n".join(chatter(loud))
    for marker in ("Loading weights", "TracerWarning", "INFO:nncf:Statistics", "Applying Weight Compression"):
        assert marker in shown, marker


def test_export_diffusers_names_no_temporary_folder(pipeline, tmp_path):
    out = tmp_path / "exported"
    done = pixart("export", "diffusers", out, "--base", pipeline, "--transformer", pipeline)
    assert done.stdout == f"{out}\n"
    assert f"wrote PixArtAlphaPipeline pipeline {out}" in done.stderr
    assert str(tmp_path / f".{out.name}.") not in done.stderr, done.stderr  # the folder it is built in first
    assert chatter(done) == []
