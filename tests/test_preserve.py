"""lora.preserve_data on tiny real models: the base's outputs as the target on a second stream of images.

The tiny pipeline and images come from the ``setup`` fixture (conftest.py): blue and red squares. The LoRA learns
the red ones; the blue ones are the images whose outputs it should keep.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.lora import add_lora, lora_layers
from pixart.checkpoints.ours import save_pixart
from pixart.cli import main as cli_main
from pixart.inference.pipeline import PixArtPipeline
from pixart.train.config import load_config
from pixart.train.loop import train
from pixart.train.preserve import adapters_off
from test_train import torchrun, weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split(setup, tmp_path_factory):
    """(base transformer file, red images, blue images): a non-trivial model to adapt and two folders."""
    _, pipe, images, _ = setup
    root = tmp_path_factory.mktemp("preserve")
    base = save_pixart(load_transformer(pipe), root / "base.safetensors")
    for colour in ("red", "blue"):
        (root / colour).mkdir()
        for txt in images.glob("*.txt"):
            if colour in txt.read_text():
                shutil.copy(txt, root / colour / txt.name)
                shutil.copy(txt.with_suffix(".png"), root / colour / f"{txt.stem}.png")
    return base, root / "red", root / "blue"


def options(setup, split, out: Path) -> list[str]:
    """A rank-4 LoRA on the tiny transformer, learning the red squares, into ``out``."""
    base, red, _ = split
    return [f"--model.pipeline={setup[1]}", f"--model.source={base}", "--model.preset=", f"--data.dataset={red}",
            "--data.image_size=256", "--data.batch_size=2", "--lora.rank=4", "--lora.targets=attn,cross_attn,mlp",
            f"--run.output_dir={out}", "--logging.progress=false", "--checkpoint.every=0"]  # fmt: skip


def run(setup, split, out: Path, *extra: str) -> Path:
    return train(load_config("debug", [*options(setup, split, out), *extra]))


def preserve(split, weight: float = 1.0) -> list[str]:
    return [f"--lora.preserve_data={split[2]}", f"--lora.preserve_weight={weight}"]


def test_adapters_off_is_the_base_network_and_leaves_the_adapters_trainable(setup):
    base = load_transformer(setup[1]).eval()
    model = copy.deepcopy(base)
    add_lora(model, 4, targets=("attn", "cross_attn", "mlp"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, base.config.in_channels, 32, 32, generator=g)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 5, base.config.caption_channels, generator=g)
    inputs = (x, t, text, torch.ones(2, 5, dtype=torch.long), torch.tensor([[256.0, 256]] * 2), torch.ones(2))
    with torch.no_grad():
        expected, adapted = base(*inputs), model(*inputs)
        assert not torch.allclose(expected, adapted, atol=1e-3)
        with adapters_off(model):
            assert torch.equal(model(*inputs), expected)
        assert torch.equal(model(*inputs), adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(lora_layers(model))


def test_the_first_step_matches_plain_training_and_later_steps_pull_back_to_the_base(setup, split, tmp_path):
    # peft starts B at zero, so at step 0 the adapted model is the base and the preservation term adds nothing ...
    plain = weights(run(setup, split, tmp_path / "plain1", "--schedule.max_steps=1") / "final-lora" /
                    "adapter_model.safetensors")  # fmt: skip
    kept = weights(run(setup, split, tmp_path / "kept1", "--schedule.max_steps=1", *preserve(split, 5)) /
                   "final-lora" / "adapter_model.safetensors")  # fmt: skip
    assert plain.keys() == kept.keys() and all(torch.equal(plain[k], kept[k]) for k in plain)
    # ... and from then on it pays for any change of the outputs on the blue images.
    plain = weights(run(setup, split, tmp_path / "plain3", "--schedule.max_steps=3") / "final-lora" /
                    "adapter_model.safetensors")  # fmt: skip
    kept = weights(run(setup, split, tmp_path / "kept3", "--schedule.max_steps=3", *preserve(split, 5)) /
                   "final-lora" / "adapter_model.safetensors")  # fmt: skip
    assert any(not torch.allclose(plain[k], kept[k], rtol=1e-4, atol=1e-6) for k in plain)


def test_preserved_images_keep_the_base_models_pictures(setup, split, tmp_path):
    """Adapted hard on the red squares, the blue prompts' images stay near the base's with preservation."""
    common = ["--schedule.max_steps=24", "--optim.lr=3e-3", "--validation.prompts=[]"]
    plain = run(setup, split, tmp_path / "plain", *common)
    kept = run(setup, split, tmp_path / "kept", *common, *preserve(split, 10))
    prompts = [f"a blue square, shade {s}" for s in range(4)]

    def images(transformer) -> np.ndarray:
        pipe = PixArtPipeline.from_pretrained(setup[1], transformer=transformer, device="cpu", dtype="fp32")
        return np.stack([np.asarray(i, np.float32) for i in pipe(prompts, seed=0, steps=3, show_progress=False)])

    base = images(split[0])
    plain, kept = (float(np.abs(images(r / "final.safetensors") - base).mean()) for r in (plain, kept))
    assert plain > 2.0  # the LoRA changes the blue images too when nothing holds them
    assert kept < 0.5 * plain, (plain, kept)


def test_resume_with_preservation_is_bit_identical(setup, split, tmp_path):
    extra = ["--schedule.max_steps=5", "--checkpoint.every=3", *preserve(split)]
    straight = run(setup, split, tmp_path / "straight", *extra)
    checkpoint = straight / "checkpoints" / "step-00000003"
    resumed = run(setup, split, tmp_path / "resumed", *extra, f"--run.resume={checkpoint}")
    a, b = (weights(r / "final-lora" / "adapter_model.safetensors") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two real processes
def test_two_processes_match_one_process_with_preservation(setup, split, tmp_path):
    common = ["--schedule.max_steps=3", "--optim.grad_accum=2", *preserve(split)]
    one = run(setup, split, tmp_path / "one", *common)
    result = torchrun("-m", "pixart", "train", "debug", *options(setup, split, tmp_path / "two"), *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    a, b = (weights(r / "final-lora" / "adapter_model.safetensors") for r in (one, tmp_path / "two"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_demo_renders_the_demos_scenes_once_into_the_run_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    from PIL import Image

    for i in range(8):
        Image.new("RGB", (64, 64), (236, 234, 226)).save(mine / f"{i}.png")
        (mine / f"{i}.txt").write_text("a small pink square on the left")
    out = tmp_path / "run"
    options = [f"--data.dataset={mine}", f"--run.output_dir={out}", "--schedule.max_steps=1", "--validation.prompts=[]",
               "--logging.progress=false", "--checkpoint.every=0", "--lora.preserve_data=demo"]  # fmt: skip
    train(load_config("demo-finetune", options))
    scenes = sorted((out / "preserve-demo").glob("*.png"))
    assert len(scenes) == 200
    stamp = [p.stat().st_mtime_ns for p in scenes]
    train(load_config("demo-finetune", options))
    assert [p.stat().st_mtime_ns for p in scenes] == stamp  # the same scenes, not rendered again


def test_a_missing_preserve_dataset_is_refused_before_the_model_loads(setup, split, tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code = cli_main(["train", "debug", *options(setup, split, tmp_path / "run"), f"--lora.preserve_data={missing}"])
    err = capsys.readouterr().err
    assert code == 2 and f"dataset {str(missing)!r} not found" in err
    assert "loading" not in err and "LoRA rank" not in err  # one line, before the transformer is read


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora.preserve_data=x"], "lora.preserve_data keeps the base model's outputs by switching the adapters off"),
        (["--lora.rank=4", "--lora.preserve_data=x", "--lora.preserve_weight=-1"],
         "lora.preserve_weight=-1.0: expected a number >= 0.0"),
        (["--lora.rank=4", "--lora.preserve_data=x", "--data.dataset=", "--data.cache=c"],
         "lora.preserve_data needs data.dataset, not data.cache"),
        (["--lora.rank=4", "--lora.preserve_data=x", "--dreambooth.class_prompt=a", "--dreambooth.class_data=c"],
         "lora.preserve_data does not combine with dreambooth.class_prompt"),
    ],
)  # fmt: skip
def test_bad_preserve_configs_give_one_line(args, message, tmp_path, capsys):
    base = [f"--model.pipeline={tmp_path}", f"--data.dataset={tmp_path}", f"--run.output_dir={tmp_path}"]
    code = cli_main(["train", "debug", *base, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
