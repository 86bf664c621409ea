"""DreamBooth in the trainer on tiny real models: class images, prior loss, instance prompt, config errors, resume.

The tiny pipeline and images come from the ``setup`` fixture (conftest.py); runs train from images (DreamBooth
does not read feature caches) on one thread, as in test_train.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.ours import save_pixart
from pixart.cli import main as cli_main
from pixart.errors import PixArtError
from pixart.inference.options import GenerationOptions
from pixart.inference.pipeline import PixArtPipeline
from pixart.train.config import load_config
from pixart.train.loop import train
from test_files import assert_plain_modes
from test_train import torchrun, weights

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of sks square"
CLASS = "a photo of a square"


def run(setup, out: Path, *extra: str, dataset: Path | None = None) -> Path:
    _, pipe, images, _ = setup
    options = [f"--model.pipeline={pipe}", f"--data.dataset={dataset or images}", "--data.image_size=256",
               f"--run.output_dir={out}", "--logging.progress=false", "--checkpoint.every=0", *extra]  # fmt: skip
    return train(load_config("debug", options))


def prior(classes: Path, count: int, *extra: str) -> list[str]:
    return [f"--dreambooth.class_prompt={CLASS}", f"--dreambooth.class_data={classes}",
            f"--dreambooth.num_class_images={count}", "--dreambooth.sample_steps=2", *extra]  # fmt: skip


def state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_missing_class_images_are_generated_by_the_base_model_and_present_ones_kept(setup, tmp_path):
    pipe = setup[1]
    base = tmp_path / "base.safetensors"  # a non-trivial model (the tiny pipeline's transformer) to fine-tune
    save_pixart(load_transformer(pipe), base)
    fine_tune = [f"--model.source={base}", "--model.preset=", "--schedule.max_steps=2", "--data.batch_size=2"]
    classes = tmp_path / "classes"
    classes.mkdir()
    Image.fromarray(np.full((40, 56, 3), 77, np.uint8)).save(classes / "mine.png")  # the user's own, no caption
    before = state(classes)

    run(setup, tmp_path / "first", *fine_tune, *prior(classes, 3, "--dreambooth.sample_batch_size=2"))
    names = [p.name for p in sorted(classes.iterdir())]
    assert names == ["class-00000.png", "class-00000.txt", "class-00001.png", "class-00001.txt", "mine.png"]
    assert state(classes)["mine.png"] == before["mine.png"]
    reference = PixArtPipeline.from_pretrained(pipe, transformer=base, device="cpu", dtype="fp32")
    for k in (0, 1):
        assert (classes / f"class-{k:05d}.txt").read_text() == CLASS
        with Image.open(classes / f"class-{k:05d}.png") as image:
            image.load()
            assert image.size == (256, 256) and image.info["prompt"] == CLASS and image.info["seed"] == str(k)
            prompt, options, _ = GenerationOptions.from_metadata(image.info)
            assert (options.steps, options.guidance, options.width, options.height) == (2, 4.5, 256, 256)
            if k == 0:  # what the base model makes with these settings, denoised two at a time as in the run
                expected = reference([prompt] * 2, options.replace(batch_size=2), show_progress=False)
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected[k]))

    generated = state(classes)
    run(setup, tmp_path / "again", *fine_tune, *prior(classes, 3))
    assert state(classes) == generated  # enough images: nothing written, nothing touched
    run(setup, tmp_path / "more", *fine_tune, *prior(classes, 4))
    after = state(classes)
    assert {k: after[k] for k in generated} == generated and set(after) - set(generated) == {
        "class-00002.png",
        "class-00002.txt",
    }
    with Image.open(classes / "class-00002.png") as image:
        assert image.info["seed"] == "2"
    assert_plain_modes(classes)


def test_prior_weight_zero_matches_plain_training_and_weight_one_does_not(setup, tmp_path):
    common = ["--schedule.max_steps=3", "--data.batch_size=2", "--optim.grad_accum=2"]
    classes = tmp_path / "classes"
    plain = weights(run(setup, tmp_path / "plain", *common) / "final.safetensors")
    zero = run(setup, tmp_path / "zero", *common, *prior(classes, 3, "--dreambooth.prior_loss_weight=0"))
    one = run(setup, tmp_path / "one", *common, *prior(classes, 3, "--dreambooth.prior_loss_weight=1"))
    zero, one = weights(zero / "final.safetensors"), weights(one / "final.safetensors")
    assert len(list(classes.glob("*.png"))) == 3
    assert plain.keys() == zero.keys() == one.keys()
    # The class batches, their noise and backward passes leave everything else as it was ...
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    # ... and with a weight their loss trains the model.
    assert any(not torch.allclose(plain[k], one[k], rtol=1e-4, atol=1e-6) for k in plain)


def test_instance_prompt_captions_every_image_and_caption_files_are_not_needed(setup, tmp_path):
    images = setup[2]
    bare, captioned = tmp_path / "bare", tmp_path / "captioned"
    bare.mkdir()
    captioned.mkdir()
    for png in images.glob("*.png"):
        shutil.copy(png, bare / png.name)
        shutil.copy(png, captioned / png.name)
        (captioned / png.stem).with_suffix(".txt").write_text(PROMPT)
    common = ["--schedule.max_steps=3", "--data.batch_size=2"]
    with pytest.raises(PixArtError, match="has no usable captioned images"):
        run(setup, tmp_path / "none", *common, dataset=bare)
    from_bare = run(setup, tmp_path / "bare-run", *common, f"--dreambooth.instance_prompt={PROMPT}", dataset=bare)
    over_own = run(setup, tmp_path / "own-run", *common, f"--dreambooth.instance_prompt={PROMPT}")  # .txt ignored
    from_files = run(setup, tmp_path / "files-run", *common, dataset=captioned)
    own_captions = run(setup, tmp_path / "plain-run", *common)
    a, b, c, d = (weights(r / "final.safetensors") for r in (from_bare, over_own, from_files, own_captions))
    assert all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in c)
    assert any(not torch.allclose(c[k], d[k], rtol=1e-4, atol=1e-6) for k in c)  # captions do matter


def test_resume_with_prior_preservation_is_bit_identical(setup, tmp_path):
    # 3 class images in global batches of 2: 2 class batches per pass, so step 3 resumes mid-pass.
    extra = ["--schedule.max_steps=5", "--data.batch_size=2", "--checkpoint.every=3", "--optim.ema_decay=0.9",
             *prior(tmp_path / "classes", 3)]  # fmt: skip
    straight = run(setup, tmp_path / "straight", *extra)
    checkpoint = straight / "checkpoints" / "step-00000003"
    resumed = run(setup, tmp_path / "resumed", *extra, f"--run.resume={checkpoint}")
    for name in ("final.safetensors", "final-ema.safetensors"):
        a, b = weights(straight / name), weights(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_processes_match_one_process_with_prior_preservation(setup, tmp_path):
    _, pipe, images, _ = setup
    common = ["--schedule.max_steps=3", "--data.batch_size=4", "--optim.grad_accum=2"]
    one = run(setup, tmp_path / "one", *common, *prior(tmp_path / "classes-one", 3))
    # Two CPU processes (gloo); the main one generates the class images while the other waits.
    options = [f"--model.pipeline={pipe}", f"--data.dataset={images}", "--data.image_size=256",
               f"--run.output_dir={tmp_path / 'two'}", "--logging.progress=false", "--checkpoint.every=0"]  # fmt: skip
    result = torchrun("-m", "pixart", "train", "debug", *options, *common, *prior(tmp_path / "classes-two", 3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "classes-two").iterdir()) == sorted(
        p.name for p in (tmp_path / "classes-one").iterdir()
    )
    a, b = weights(one / "final.safetensors"), weights(tmp_path / "two" / "final.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "args, message",
    [
        ([f"--dreambooth.class_prompt={CLASS}"], "dreambooth.class_prompt needs dreambooth.class_data"),
        (["--dreambooth.class_data=classes"], "dreambooth.class_data needs dreambooth.class_prompt"),
        (["--dreambooth.prior_loss_weight=-1"], "dreambooth.prior_loss_weight=-1.0: expected a number >= 0.0"),
        (["--dreambooth.num_class_images=0"], "dreambooth.num_class_images=0: expected an integer >= 1"),
        (["--dreambooth.sample_steps=0"], "dreambooth.sample_steps=0: expected an integer >= 1"),
        (
            ["--data.dataset=", "--data.cache=cache", f"--dreambooth.instance_prompt={PROMPT}"],
            "dreambooth needs data.dataset, not data.cache",
        ),
        (
            ["--lcm.enabled=true", "--model.source=m.safetensors", "--model.preset=", *prior(Path("c"), 1)],
            "dreambooth.class_prompt (prior preservation) is not supported with lcm.enabled",
        ),
        (prior(Path("{file}"), 1), "is a file; expected a folder of class images"),
    ],
)
def test_bad_dreambooth_configs_give_one_line(args, message, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    base = [f"--model.pipeline={tmp_path}", f"--data.dataset={tmp_path}", f"--run.output_dir={tmp_path}"]
    code = cli_main(["train", "debug", *base, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
