"""The shipped demo LCM-LoRA: `--lora demo-lcm` names it, and with it the demo draws in 4 steps what it draws in 20."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pixart.demo import BUNDLED_LORAS
from pixart.demo.eval import evaluate
from pixart.inference.options import read_png_metadata
from pixart.inference.pipeline import PixArtPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

LCM = {"sampler": "lcm", "steps": 4, "guidance": 1.0}


def test_the_shipped_lora_samples_the_demo_in_four_steps():
    with_lora = PixArtPipeline.from_pretrained(loras=[("demo-lcm", 1.0)])
    base = PixArtPipeline.from_pretrained()
    scores = evaluate(with_lora, 40, **LCM).scores
    plain = evaluate(base, 40, **LCM).scores
    # Measured on 200 prompts: one object fully right 95.7%, two objects fully right 92.9% (20-step dpm++ without
    # the LoRA: 100% and 94.8%). On these 40 (7 one-object, 33 two-object): 100 and 93.9% with it, 71.4 and 81.8%
    # without it at the same 4 LCM steps.
    assert scores["single_all"] >= 85 and scores["pair_full"] >= 80, scores
    gain = scores["single_all"] + scores["pair_full"] - plain["single_all"] - plain["pair_full"]
    assert gain >= 25, (scores, plain)


def test_the_name_loads_the_bundled_adapter_and_the_png_records_the_name(tmp_path):
    by_name = PixArtPipeline.from_pretrained(loras=[("demo-lcm", 1.0)])
    by_path = PixArtPipeline.from_pretrained(loras=[(str(BUNDLED_LORAS["demo-lcm"]), 1.0)])
    a = by_name("a red circle", seed=1, show_progress=False, **LCM)[0]
    b = by_path("a red circle", seed=1, show_progress=False, **LCM)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))

    done = subprocess.run(
        [sys.executable, "-m", "pixart", "generate", "a red circle", "--seed", "1", "--sampler", "lcm",
         "--lora", "demo-lcm", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = read_png_metadata(done.stdout.strip())
    assert "demo-lcm" in info["loras"] and str(tmp_path) not in info["loras"]
    assert "/" not in info["loras"]  # a name, not this machine's install path
