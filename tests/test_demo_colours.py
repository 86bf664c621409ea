"""The demo's colours: the fixed colour tests the VAE is measured on, the VAE retraining script, and the
`demo-finetune` recipe's documented example (run at a few steps, as written in docs/demo.md)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image

from pixart.demo import BUNDLE, colours, components
from pixart.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "demo.md").read_text()


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_colour_tests_are_fixed_and_span_the_cube():
    flat = colours.flat_images()
    assert flat.shape == (32, 3, 64, 64) and len(set(colours.flat_colours())) == 32
    assert {(0, 0, 0), (255, 255, 255), (0, 128, 0)} <= set(colours.flat_colours())
    assert torch.equal(flat[0], torch.full((3, 64, 64), -1.0))  # black, exactly
    chart = colours.colour_chart()
    patches = {tuple(chart[0, :, y, x].tolist()) for y in range(4, 64, 8) for x in range(4, 64, 8)}
    assert chart.shape == (1, 3, 64, 64) and len(patches) == 64  # 8 × 8 patches, all different
    assert torch.equal(colours.natural_like(6, seed=3), colours.natural_like(6, seed=3))
    assert not torch.equal(colours.natural_like(6, seed=3), colours.natural_like(6, seed=4))
    scenes = colours.natural_like(50, seed=0)
    dark, bright = scenes.amax(1) < -0.8, scenes.amin(1) > 0.8  # near-black and near-white pixels both occur
    assert dark.any() and bright.any()


def test_the_bundled_vae_draws_every_flat_colour_and_black_as_black():
    # The first bundled VAE drew black as bright green (0, 225, 0)-ish and flat colours at 9.6 dB; issue #23 asked
    # for >= 30 dB. Measured for the bundled one (docs/demo.md): 32.0 dB, every channel within 23 levels.
    vae = AutoencoderKL.from_pretrained(BUNDLE / "vae").eval()
    flat = colours.flat_images()
    recon = components.roundtrip(vae, flat)
    black = (recon[0].mean((1, 2)) + 1) * 127.5
    assert (black < 10).all(), black
    assert components.psnr(recon, flat) >= 30
    assert ((recon - flat).abs().mean((2, 3)) * 127.5).max() < 30  # the worst colour's worst channel, in levels


def test_vae_script_keeps_the_latent_scale_and_names_no_folder(tmp_path):
    done = run("scripts/train_demo_vae.py", "--workdir", str(tmp_path), "--steps", "3", "--images", "16",
               "--check", "8", "--batch", "4", "--shapes-batch", "2", "--groups", "1", cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["today"]["flat colours (32)"] >= 30  # --start defaults to the bundled VAE
    assert 0 < report["new"]["shapes latents: RMS change / latent std"] < 1
    assert 0 < report["new"]["layout maps latents: RMS change / latent std"] < 1  # held too, for demo-layout
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    bundled = json.loads((BUNDLE / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == bundled["scaling_factor"]  # the transformer learnt latents at this scale
    assert config["norm_num_groups"] == 1 and "_name_or_path" not in config


def test_a_recipe_names_the_bundled_demo_wherever_it_is_installed():
    config = load_config("demo-finetune", ["--data.dataset=pictures"])
    assert config.model.source == str(BUNDLE) and config.lora.rank > 0 and config.data.image_size == 64
    assert load_config("debug", ["--model.pipeline=demo", "--data.dataset=x"]).model.pipeline == str(BUNDLE)


def test_documented_demo_finetune_runs_as_written(tmp_path):
    """docs/demo.md's example at two training steps: its image script (ten pink squares), `pixart train` (which
    renders the demo's scenes whose outputs it keeps), then generate with the LoRA and with the merged
    transformer."""
    script = re.search(r"```python\n(# make_images\.py.*?)```", DOCS, re.S).group(1)
    (tmp_path / "make_images.py").write_text(script)
    assert run("make_images.py", cwd=tmp_path).returncode == 0
    captions = sorted(p.read_text() for p in (tmp_path / "my-images").glob("*.txt"))
    assert len(captions) == 10 and all("pink square" in c for c in captions)
    assert Image.open(tmp_path / "my-images" / "0.png").size == (64, 64)

    train = "pixart train demo-finetune --data.dataset=my-images/"
    assert train in DOCS
    smoke = ["--schedule.max_steps=2", "--validation.prompts=[]", "--logging.progress=false", "--checkpoint.every=0"]
    done = run("-m", *train.split(), *smoke, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "runs" / "demo-finetune" / "preserve-demo").glob("*.png"))) == 200
    assert "reading image sizes" not in done.stderr and "it/s" not in done.stderr  # progress=false: no bar at all
    generate = 'pixart generate "a pink square on the left"'
    for command in (f"{generate} --lora runs/demo-finetune/final-lora",
                    f"{generate} --transformer runs/demo-finetune/final.safetensors"):  # fmt: skip
        assert command in DOCS
        out = tmp_path / command.split()[-1].replace("/", "-")
        argv = ["generate", "a pink square on the left", *command.split()[-2:], "--steps", "2", "--out", str(out)]
        done = run("-m", "pixart", *argv, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert Image.open(next(out.glob("*.png"))).size == (64, 64)
