"""ControlNet training on tiny real models: frozen base, trained branch, cached control latents, dropout, the saved
files loading for generation, kill and resume, 1 vs 2 processes, config errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from pixart.checkpoints.controlnet import load_controlnet, save_official_controlnet
from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.official import read_pth, to_official_state_dict
from pixart.cli import main as cli_main
from pixart.demo import BUNDLE
from pixart.inference.pipeline import PixArtPipeline
from pixart.model.controlnet import PixArtControlNet
from pixart.train.cache import build_cache, open_cache
from pixart.train.config import load_config
from pixart.train.controlnet import control_dropped
from pixart.train.data import open_dataset
from pixart.train.loop import setup as setup_run
from pixart.train.loop import train, train_step
from pixart.train.state import batch_stream, complete_checkpoints
from test_train import assert_same_finals, kill_after_first_checkpoint, overrides, torchrun, weights
from tiny import save_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny α pipeline's 2-block transformer is the frozen base; the branch copies its first block.
CONTROL = ["--controlnet.enabled=true", "--controlnet.num_blocks=1", "--model.preset="]


@pytest.fixture(scope="module")
def control_cache(setup):
    """The tiny images' feature cache with the latents of their Canny maps, captions at the tiny α model's 120
    tokens (the debug preset's cache has 16: they would be cut where training from the images does not cut them)."""
    _, pipe, images, _ = setup
    cache = setup[0] / "control-cache"
    build_cache(pipe, open_dataset(images), cache, resolution=256, max_tokens=120, batch_size=8, control="canny")
    return cache


def control_args(setup, cache, *extra: str) -> list[str]:
    return [f"--model.source={setup[1]}", f"--data.cache={cache}", *CONTROL, *extra]


def run(setup, cache, out, *extra: str):
    return train(load_config("debug", overrides(setup, out, *control_args(setup, cache, *extra))))


def test_only_the_branch_trains_and_the_base_stays_bit_identical(setup, control_cache, tmp_path):
    config = load_config("debug", overrides(setup, tmp_path / "run", *control_args(setup, control_cache)))
    r = setup_run(config)
    model = r.accelerator.unwrap_model(r.state.model)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    branch_before = {k: v.clone() for k, v in model.branch.state_dict().items()}
    assert not any(p.requires_grad for p in model.base.parameters())
    optimized = {id(p) for group in r.state.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.branch.parameters()}
    stream = batch_stream(r.loader, 0, 0)
    for _ in range(3):
        train_step(r, stream)
    assert all(torch.equal(base_before[k], v) for k, v in model.base.state_dict().items())
    assert all(p.grad is None for p in model.base.parameters())
    changed = [k for k, v in model.branch.state_dict().items() if not torch.equal(branch_before[k], v)]
    assert "controlnet.0.after_proj.weight" in changed and "controlnet.0.copied_block.attn.qkv.weight" in changed


def test_final_files_hold_the_branch_and_generate(setup, control_cache, tmp_path):
    out = run(setup, control_cache, tmp_path / "run", "--schedule.max_steps=6", "--checkpoint.every=3")
    checkpoint = complete_checkpoints(out)[-1]
    assert {k.split(".")[0] for k in weights(checkpoint / "trainable.safetensors")} == {"branch"}  # no base weights
    base = load_transformer(setup[1])
    ours, official = load_controlnet(out / "final.safetensors"), load_controlnet(out / "final.pth", base.config)
    assert ours.num_blocks == official.num_blocks == 1
    assert all(torch.equal(v, official.state_dict()[k]) for k, v in ours.state_dict().items())
    new = PixArtControlNet.from_transformer(base, 1).state_dict()
    assert not torch.equal(ours.state_dict()["controlnet.0.after_proj.weight"], new["controlnet.0.after_proj.weight"])
    # The released layout carries the frozen base under base_model.*, as the official scripts load the whole model
    # from this one file: exactly the base that was given, pos_embed included.
    state_dict, _ = read_pth(out / "final.pth", ema=False)
    expected = {f"base_model.{k}": v for k, v in to_official_state_dict(base).items()}
    assert {k for k in state_dict if k.startswith("base_model.")} == expected.keys()
    assert all(torch.equal(state_dict[k], v) for k, v in expected.items())

    # controlnet.init continues from a saved branch, either file; a branch of another block count is refused.
    for name in ("final.safetensors", "final.pth"):
        init = control_args(setup, control_cache, f"--controlnet.init={out / name}")
        r = setup_run(load_config("debug", overrides(setup, tmp_path / f"init-{name}", *init)))
        branch = r.accelerator.unwrap_model(r.state.model).branch.state_dict()
        assert all(torch.equal(v, branch[k]) for k, v in ours.state_dict().items())

    pipe = PixArtPipeline.from_pretrained(setup[1], device="cpu")
    control = Image.open(setup[2] / "3.png").convert("RGB")
    options = {"seed": 1, "steps": 2, "width": 256, "height": 256}
    plain = np.asarray(pipe("a red square", **options)[0])
    images = [
        np.asarray(pipe("a red square", control=control, controlnet=out / name, control_type="canny", **options)[0])
        for name in ("final.safetensors", "final.pth")
    ]
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], plain)  # the trained branch steers


def test_a_sigma_branch_trains_from_images_and_loads(setup, tmp_path):
    """Σ the same way (its T5 null caption, no micro-conditions), the control maps computed during training."""
    pipe = save_pipeline(tmp_path / "sigma", "sigma")
    args = [f"--model.source={pipe}", f"--model.pipeline={pipe}", "--data.cache=", f"--data.dataset={setup[2]}"]
    args += [*CONTROL, "--controlnet.preprocessor=none", "--schedule.max_steps=2", "--checkpoint.every=0"]
    out = train(load_config("debug", overrides(setup, tmp_path / "run", *args)))
    base = load_transformer(pipe)
    assert base.config.family == "sigma"
    key = "controlnet.0.after_proj.weight"
    new = PixArtControlNet.from_transformer(base, 1).state_dict()[key]
    for name in ("final.safetensors", "final.pth"):
        assert not torch.equal(load_controlnet(out / name, base.config).state_dict()[key], new)


def test_cache_holds_control_latents_and_trains_as_the_images_do(setup, control_cache, tmp_path):
    _, pipe, images, plain_cache = setup
    cache = open_cache(control_cache)
    batch, _ = cache.load_batch(1.0, cache.groups[1.0], [False] * len(cache.groups[1.0]))
    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae").eval()
    maps = []
    for key in batch["key"]:  # OpenCV's Canny of each 32-px image scaled to its 256-px bucket
        image = Image.open(images / key).convert("RGB").resize((256, 256), Image.BICUBIC)
        edges = cv2.Canny(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY), 100, 200)
        maps.append(torch.from_numpy(np.repeat(edges[None], 3, axis=0)).float() / 127.5 - 1)
    with torch.no_grad():
        expected = vae.encode(torch.stack(maps)).latent_dist.mean
    torch.testing.assert_close(batch["control_mean"], expected, rtol=1e-4, atol=1e-5)

    common = ["--schedule.max_steps=2", "--data.batch_size=4", "--checkpoint.every=0"]
    cached = run(setup, control_cache, tmp_path / "cached", *common)
    uncached = run(setup, control_cache, tmp_path / "images", *common, "--data.cache=", f"--data.dataset={images}")
    other = run(setup, control_cache, tmp_path / "seed1", *common, "--run.seed=1")
    a, b, c = (weights(path / "final.safetensors") for path in (cached, uncached, other))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any(not torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6) for k in a)  # the comparison can fail


def test_the_released_layout_of_a_demo_branch_loads_without_a_base_config(tmp_path):
    """The bundled demo model shows its family in no weight (no micro-conditions, no released caption length): the
    file states it, so the branch loads on its own, as `pixart generate --controlnet final.pth` needs."""
    base = load_transformer(BUNDLE)
    net = PixArtControlNet.from_transformer(base, 2)
    loaded = load_controlnet(save_official_controlnet(net, base, tmp_path / "demo.pth"))
    assert loaded.config == base.config and loaded.num_blocks == 2


def test_cache_command_caches_control_latents(setup, tmp_path, capsys):
    _, pipe, images, _ = setup
    out = tmp_path / "cache"
    args = ["cache", "--model", str(pipe), "--data", str(images), "--out", str(out), "--resolution", "256"]
    assert cli_main([*args, "--control", "none", "--flip"]) == 0
    cache = open_cache(out, expect={"control": "none", "flip": True})
    batch, _ = cache.load_batch(1.0, cache.groups[1.0][:2], [False, True])
    assert batch["control_mean"].shape == batch["latent_mean"].shape
    # 'none' takes the image as its own control map: its latents are the image's, mirrored ones included.
    torch.testing.assert_close(batch["control_mean"], batch["latent_mean"], rtol=0, atol=0)
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--control", "hed"])
    assert exit_.value.code == 2
    assert "invalid choice: 'hed'" in capsys.readouterr().err


def test_a_cache_without_control_latents_is_refused_in_one_line(setup, tmp_path, capsys):
    args = overrides(setup, tmp_path / "run", *control_args(setup, setup[3]))
    assert cli_main(["train", "debug", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'is stale: control is null in the cache but "canny" for this run' in err, err


def test_conditioning_dropout_zeroes_a_seeded_fraction_of_control_latents(setup, control_cache, tmp_path):
    args = control_args(setup, control_cache, "--controlnet.conditioning_dropout=0.3")
    config = load_config("debug", overrides(setup, tmp_path / "run", *args))
    r = setup_run(config)
    batch = next(r.loader.epoch(0))
    latents = r.state.objective.control_latents(batch, 0, 5)
    zero = latents.flatten(1).abs().amax(1) == 0
    assert torch.equal(zero, control_dropped(0, 5, range(len(batch["key"])), 0.3))
    drops = torch.cat([control_dropped(0, step, range(8), 0.3) for step in range(200)])
    assert 0.25 < drops.float().mean() < 0.35  # the probability asked for
    assert torch.equal(drops, torch.cat([control_dropped(0, step, range(8), 0.3) for step in range(200)]))
    assert not torch.equal(drops, torch.cat([control_dropped(1, step, range(8), 0.3) for step in range(200)]))
    assert not control_dropped(0, 5, range(1000), 0.0).any() and control_dropped(0, 5, range(1000), 1.0).all()


def test_killed_run_resumes_bit_identically(setup, control_cache, tmp_path):
    extra = control_args(setup, control_cache, "--schedule.max_steps=24", "--checkpoint.every=4")
    extra += ["--optim.ema_decay=0.9", "--controlnet.conditioning_dropout=0.5"]
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(setup, killed, *extra)
    train(load_config("debug", overrides(setup, killed, *extra, "--run.resume=latest")))
    straight = train(load_config("debug", overrides(setup, tmp_path / "straight", *extra)))
    assert_same_finals(straight, killed)
    for name in ("final.pth", "final-ema.pth"):
        a, b = (read_pth(run_dir / name, ema=False)[0] for run_dir in (straight, killed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_processes_match_one_process(setup, control_cache, tmp_path):
    common = control_args(setup, control_cache, "--schedule.max_steps=3", "--data.batch_size=4", "--optim.grad_accum=2")
    common += ["--checkpoint.every=0", "--controlnet.conditioning_dropout=0.5"]
    one = train(load_config("debug", overrides(setup, tmp_path / "one", *common)))
    result = torchrun("-m", "pixart", "train", "debug", *overrides(setup, tmp_path / "two", *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    a, b = weights(one / "final.safetensors"), weights(tmp_path / "two" / "final.safetensors")
    assert a.keys() == b.keys()
    new = PixArtControlNet.from_transformer(load_transformer(setup[1]), 1).state_dict()
    assert any(not torch.equal(a[k], new[k]) for k in a)  # training moved the branch
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.source="], "controlnet.enabled needs model.source"),
        (["--controlnet.preprocessor=hed"], "controlnet.preprocessor='hed': expected one of none, canny"),
        (["--controlnet.conditioning_dropout=1.5"], "controlnet.conditioning_dropout=1.5: expected a number in"),
        (["--lora.rank=4"], "controlnet.enabled trains the branch alone; it does not combine with lora.rank"),
        (["--validation.prompts=a box"], "validation.prompts is not supported with controlnet.enabled"),
        (["--controlnet.num_blocks=2"], "a ControlNet copies from 1 to 1 blocks of this 2-block model, got 2"),
    ],
)
def test_bad_controlnet_settings_give_one_line(setup, control_cache, tmp_path, capsys, extra, message):
    args = overrides(setup, tmp_path / "run", *control_args(setup, control_cache, *extra))
    if extra == ["--model.source="]:
        args += ["--model.preset=debug-alpha"]
    assert cli_main(["train", "debug", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("recipe", ["controlnet", "demo-controlnet"])
def test_shipped_controlnet_recipes_are_valid(recipe):
    config = load_config(recipe)
    assert config.controlnet.enabled and config.model.source and config.controlnet.num_blocks >= 1
