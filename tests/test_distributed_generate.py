"""Many processes: `pixart generate` and `pixart eval` over 2 real CPU processes, and the folder xDiT would load.

The bundled demo model on a few prompts (torchrun, accelerate launch; gloo): the processes share the images out,
and the folder they fill holds the same file names and the same bytes (pixels and PNG metadata) as one process's;
eval gives the same scores. Every process runs one intra-op thread (OMP_NUM_THREADS=1, as torchrun sets by
default), and so does the one-process reference: float reductions split over 2 threads can round a pixel
differently. One huge image over several GPUs is xDiT's job (docs/distributed.md): its PixArt pipelines load a
`pixart export diffusers` folder through diffusers, which the last test checks without xDiT (it needs GPUs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from PIL import Image
from transformers import T5EncoderModel

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.diffusers import to_diffusers_state_dict
from pixart.checkpoints.ours import save_pixart
from pixart.cli import main
from pixart.inference.options import next_free_index, read_png_metadata, save_image
from tiny import save_pipeline

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # real multi-process runs
PROMPTS = ["a red circle", "a blue square on the left", "a green triangle above a yellow star", "a purple star"]


def run(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*launcher, "-m", "pixart", *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def alone(capsys, *args: str) -> list[str]:
    """What ``pixart ARGS`` prints run in this process (on one thread): the reference."""
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out.splitlines()


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]


def accelerate_launch() -> list[str]:
    # --multi_gpu is accelerate's torchrun-style launcher; on a machine without GPUs the processes join with gloo.
    # (--cpu --num_processes 2 starts one process: accelerate runs several CPU processes only through mpirun.)
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    flags += ["--dynamo_backend", "no", "--main_process_port", free_port()]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags]


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def names(lines: list[str]) -> list[str]:
    return [Path(line).name for line in lines]


def test_torchrun_generate_writes_what_one_process_writes(tmp_path, capsys):
    """10 images in batches of 3 (process 0 takes batches 1-2, process 1 batches 3-4, the last one short),
    into a folder that already holds image 00007: both runs number from 00008 and write the same bytes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + ["an orange circle below a blue square"]) + "\n")
    args = ["generate", "--prompts-file", str(prompts), "--num-images", "2", "--batch-size", "3", "--seed", "5"]
    args += ["--steps", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / "00007-1.png").write_bytes(b"an earlier image")

    alone_run = alone(capsys, *args, "--out", str(one))
    launched = run(torchrun(), *args, "--out", str(two))

    expected = [f"{8 + k:05d}-{5 + k}.png" for k in range(10)]
    assert names(alone_run) == expected
    assert (
        names(launched.stdout.splitlines()) == expected
    )  # every path once, in the run's order, from the main process only
    assert files(two) == files(one)
    assert read_png_metadata(two / expected[9])["prompt"] == "an orange circle below a blue square"
    assert "10 image(s)" in launched.stderr and "(2 processes)" in launched.stderr
    assert launched.stderr.count("loading the transformer") == 1  # the other process keeps its info lines


def test_accelerate_launch_draws_one_seed_for_the_whole_run(tmp_path, capsys):
    """Without --seed the main process draws the seed: the images carry seed, seed + 1, … across both
    processes, and one process given that seed writes the same files."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    args = ["generate", "--prompts-file", str(prompts), "--batch-size", "2", "--steps", "4"]

    launched = run(accelerate_launch(), *args, "--out", str(tmp_path / "two"))

    seeds = [int(re.fullmatch(r"\d{5}-(\d+)\.png", name)[1]) for name in names(launched.stdout.splitlines())]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]
    alone(capsys, *args, "--seed", str(seeds[0]), "--out", str(tmp_path / "one"))
    assert files(tmp_path / "two") == files(tmp_path / "one")


def test_a_process_without_images_still_finishes(tmp_path):
    """One prompt makes one batch: process 1 has nothing to do, loads the model for nothing and exits cleanly."""
    result = run(torchrun(), "generate", "a red circle", "--seed", "3", "--steps", "2", "--out", str(tmp_path))
    assert names(result.stdout.splitlines()) == ["00000-3.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["00000-3.png"]


def test_torchrun_eval_scores_what_one_process_scores(tmp_path, capsys):
    """10 held-out prompts in batches of 4: the same scores, and --save writes the same images and verdicts."""
    args = ["eval", "--prompts", "10", "--steps", "6", "--batch-size", "4", "--json"]

    alone_run = alone(capsys, *args, "--save", str(tmp_path / "one"))
    launched = run(torchrun(), *args, "--save", str(tmp_path / "two"))

    scores = json.loads("\n".join(alone_run))
    assert scores["n_single"] + scores["n_pair"] == 10
    assert json.loads(launched.stdout) == scores
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert len(files(tmp_path / "one")) == 11  # 10 images and verdicts.jsonl


def test_save_image_takes_the_number_it_is_given_unless_taken(tmp_path):
    image = Image.new("RGB", (8, 8))
    image.info["seed"] = "4"
    assert next_free_index(tmp_path / "missing") == 0
    assert save_image(image, tmp_path, index=3).name == "00003-4.png"
    assert next_free_index(tmp_path) == 4
    assert save_image(image, tmp_path, index=3).name == "00004-4.png"  # never overwrites
    assert save_image(image, tmp_path).name == "00005-4.png"


# What xDiT (xfuser) wraps: xFuserPixArtAlphaPipeline / xFuserPixArtSigmaPipeline.from_pretrained call diffusers'
# PixArtAlphaPipeline / PixArtSigmaPipeline.from_pretrained on the folder, then wrap the PixArtTransformer2DModel and
# the scheduler by their class; a scheduler class without an xDiT wrapper fails there. Its PixArt examples load
# the T5 encoder on their own from text_encoder/.
XDIT_SCHEDULERS = {"DPMSolverMultistepScheduler", "DDIMScheduler", "DDPMScheduler"}


@pytest.mark.parametrize("family, pipeline", [("alpha", PixArtAlphaPipeline), ("sigma", PixArtSigmaPipeline)])
def test_exported_folder_is_what_xdit_loads(tmp_path, family, pipeline):
    """`pixart export diffusers` writes a folder that diffusers' pipeline class of the family loads, with the
    component classes xDiT wraps and our weights in its transformer (tests/test_export.py runs it)."""
    base = save_pipeline(tmp_path / "base", family)
    model = load_transformer(base, family=family)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # weights of their own, not the base's
    save_pixart(model, tmp_path / "ours.safetensors")
    out = tmp_path / "exported"
    assert (
        main(
            ["export", "diffusers", str(out), "--base", str(base), "--transformer", str(tmp_path / "ours.safetensors")]
        )
        == 0
    )

    pipe = pipeline.from_pretrained(out)
    assert type(pipe.transformer) is PixArtTransformer2DModel
    assert type(pipe.scheduler).__name__ in XDIT_SCHEDULERS
    assert isinstance(T5EncoderModel.from_pretrained(out, subfolder="text_encoder"), T5EncoderModel)
    theirs = pipe.transformer.state_dict()
    ours = to_diffusers_state_dict(model.state_dict(), model.config)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
