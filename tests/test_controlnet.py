"""The PixArt-δ ControlNet: the official block order, the released checkpoint layout, generation and its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.tiny import save_pipeline

from pixart.checkpoints.controlnet import load_controlnet, save_controlnet
from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.official import to_official_state_dict
from pixart.cli import main
from pixart.errors import PixArtError
from pixart.inference.control import control_map
from pixart.inference.options import GenerationOptions
from pixart.inference.pipeline import PixArtPipeline
from pixart.model.config import PRESETS
from pixart.model.controlnet import PixArtControlNet, controlled
from pixart.model.transformer import PixArtTransformer
from test_official_keys import KEYS

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

# α with micro-conditions; Σ with KV compression and qk-norm in the copied blocks (layers 1 and 2).
CONFIGS = {
    "alpha": PRESETS["debug-alpha"].replace(depth=4),
    "sigma": PRESETS["debug-sigma"].replace(depth=4),
}


def randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Every weight moved off its initialisation, projections included, so each one changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def base_model(family: str) -> PixArtTransformer:
    torch.manual_seed(0)
    return randomise(PixArtTransformer(CONFIGS[family]), seed=1).eval()


def inputs(family: str, batch: int = 2) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(2)
    cfg = CONFIGS[family]
    x = torch.randn(batch, 4, 16, 12, generator=g)
    y = torch.randn(batch, 6, cfg.caption_channels, generator=g)
    mask = torch.ones(batch, 6)
    mask[0, 4:] = 0
    kwargs = {}
    if cfg.micro_conditions:
        kwargs = {"resolution": torch.tensor([[128.0, 96.0]]), "aspect_ratio": torch.tensor([128 / 96])}
    return (x, torch.tensor([700, 300]), y, mask), kwargs


def control_latents() -> torch.Tensor:
    return torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(3))


def reference(base: PixArtTransformer, net: PixArtControlNet, latents: torch.Tensor, args, kwargs) -> torch.Tensor:
    """The official ControlPixArtHalf.forward order (PIXART_FACTS.md "ControlNet"), written out on the blocks."""
    x, y, mask, t, t0, hw = base.embed(*args, **kwargs)
    p = base.config.patch_size
    c = base.x_embedder(latents) + base.pos_embed(latents.shape[2] // p, latents.shape[3] // p, latents.device)
    c = c.repeat(x.shape[0], 1, 1)  # the control map of every image in the batch
    x = base.blocks[0](x, y, t0, mask, hw)
    for i, branch in enumerate(net.controlnet):
        c = branch.copied_block(x + branch.before_proj(c) if i == 0 else c, y, t0, mask, hw)
        x = base.blocks[i + 1](x + branch.after_proj(c), y, t0, mask, hw)
    for block in base.blocks[net.num_blocks + 1 :]:
        x = block(x, y, t0, mask, hw)
    return base.head(x, t, hw)


@pytest.mark.parametrize("family", ["alpha", "sigma"])
@torch.no_grad()
def test_a_new_branch_gives_the_base_models_output_exactly(family):
    base = base_model(family)
    net = PixArtControlNet.from_transformer(base, num_blocks=3)
    args, kwargs = inputs(family)
    assert torch.equal(controlled(base, net, control_latents())(*args, **kwargs), base(*args, **kwargs))
    # It is the zero projections that make it so: the copied blocks are the base's own.
    assert torch.equal(net.controlnet[1].copied_block.attn.qkv.weight, base.blocks[1].attn.qkv.weight)


@pytest.mark.parametrize("family", ["alpha", "sigma"])
@torch.no_grad()
def test_the_hook_follows_the_official_block_order(family):
    base = base_model(family)
    net = randomise(PixArtControlNet.from_transformer(base, num_blocks=2), seed=4)
    args, kwargs = inputs(family)
    latents = control_latents()
    ours = controlled(base, net, latents)(*args, **kwargs)
    assert torch.equal(ours, reference(base, net, latents, args, kwargs))
    assert not torch.allclose(ours, base(*args, **kwargs), atol=1e-3)  # the branch does steer
    # Scale 0 removes the branch's residuals and with them every trace of the control.
    assert torch.equal(controlled(base, net, latents, scale=0.0)(*args, **kwargs), base(*args, **kwargs))


def test_a_branch_copies_from_one_block_to_all_but_the_last():
    for bad in (0, 4, 2.0):
        with pytest.raises(PixArtError, match="a ControlNet copies from 1 to 3 blocks of this 4-block model"):
            PixArtControlNet(CONFIGS["alpha"], bad)


@pytest.mark.parametrize(
    "name, preset", [("PixArt-XL-2-512-ControlNet", "alpha-512"), ("PixArt-XL-2-1024-ControlNet", "alpha-1024-ms")]
)
def test_parameter_names_and_shapes_are_the_released_checkpoints(name, preset):
    listed = {key: tuple(shape) for key, shape in json.loads((KEYS / f"{name}.json").read_text())["keys"].items()}
    with torch.device("meta"):
        base = PixArtTransformer(PRESETS[preset])
        net = PixArtControlNet(base.config)
    ours = {f"base_model.{k}": tuple(v.shape) for k, v in to_official_state_dict(base).items()}
    ours |= {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == listed


def official_file(path: Path, base: PixArtTransformer, net: PixArtControlNet, **more) -> Path:
    """A .pth in the released layout: the base model under base_model.*, the branch under its own names."""
    state_dict = {f"base_model.{k}": v for k, v in to_official_state_dict(base).items()}
    state_dict |= dict(net.state_dict()) | more
    torch.save({"state_dict": state_dict}, path)
    return path


@pytest.mark.parametrize("family", ["alpha", "sigma"])
@torch.no_grad()
def test_released_layout_and_our_format_load_the_same_branch(family, tmp_path):
    base = base_model(family)
    net = randomise(PixArtControlNet.from_transformer(base, num_blocks=2), seed=5)
    args, kwargs = inputs(family)
    latents = control_latents()
    expected = controlled(base, net, latents)(*args, **kwargs)
    official = load_controlnet(official_file(tmp_path / "cn.pth", base, net), base.config)
    assert torch.equal(controlled(base, official, latents)(*args, **kwargs), expected)
    ours = load_controlnet(save_controlnet(official, tmp_path / "cn.safetensors"), base.config)
    assert torch.equal(controlled(base, ours, latents)(*args, **kwargs), expected)
    assert ours.num_blocks == 2 and ours.config == base.config


@torch.no_grad()
def test_a_released_controlnet_loads_by_its_hub_path(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The hub cache's own layout (refs/main names the snapshot); offline, hf_hub_download serves the file from it.
    repo = tmp_path / "hub" / "models--PixArt-alpha--PixArt-ControlNet"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    base = base_model("alpha")
    net = randomise(PixArtControlNet.from_transformer(base, num_blocks=2), seed=6)
    official_file(repo / "snapshots" / commit / "PixArt-XL-2-512-ControlNet.pth", base, net)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_controlnet("PixArt-alpha/PixArt-ControlNet/PixArt-XL-2-512-ControlNet.pth", base.config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    with pytest.raises(PixArtError, match=r"^cannot fetch 'PixArt-alpha/PixArt-ControlNet/other\.pth': .*offline"):
        load_controlnet("PixArt-alpha/PixArt-ControlNet/other.pth", base.config)


def test_pixart_convert_writes_the_released_branch_in_our_format(tmp_path, capsys):
    base = base_model("sigma")
    net = randomise(PixArtControlNet.from_transformer(base, num_blocks=3), seed=7)
    source = official_file(tmp_path / "cn.pth", base, net)
    # A width no release has: the head count, which weights do not record, is given as for a base model.
    args = ["convert", str(source), str(tmp_path / "cn.safetensors"), "--controlnet", "--num-heads", "2"]
    assert main([*args, "--to", "pixart"]) == 0
    converted = load_controlnet(tmp_path / "cn.safetensors", base.config)
    assert converted.config == base.config and converted.num_blocks == 3
    for key, value in net.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    assert main([*args, "--to", "official"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: a ControlNet converts to --to pixart (the branch alone), not --to official"), err


def one_line_error(call) -> str:
    with pytest.raises(PixArtError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_controlnet_for_another_model_is_one_line(tmp_path):
    alpha, sigma = base_model("alpha"), base_model("sigma")
    for_sigma = save_controlnet(PixArtControlNet.from_transformer(sigma, 2), tmp_path / "sigma.safetensors")
    message = one_line_error(lambda: load_controlnet(for_sigma, alpha.config))
    assert message.startswith("sigma.safetensors is a ControlNet for PixArt-sigma 64 px (width 48, 4 blocks), but")
    assert message.endswith("the model is PixArt-alpha 64 px (width 48, 4 blocks)")
    # The released layout states its base by its base_model weights: here a 128 px one.
    bigger = PixArtTransformer(CONFIGS["alpha"].replace(sample_size=16))
    file = official_file(tmp_path / "big.pth", bigger, PixArtControlNet.from_transformer(bigger, 2))
    assert "for PixArt-alpha 128 px" in one_line_error(lambda: load_controlnet(file, alpha.config))
    # A branch alone (no base_model weights) can be checked by its width only.
    torch.save({"state_dict": dict(PixArtControlNet(alpha.config, 1).state_dict())}, tmp_path / "branch.pth")
    wider = CONFIGS["alpha"].replace(hidden_size=96)
    assert one_line_error(lambda: load_controlnet(tmp_path / "branch.pth", wider)) == (
        "branch.pth is a ControlNet of width 48, but the model is PixArt-alpha 64 px (width 96, 4 blocks)"
    )
    assert "not a ControlNet checkpoint: unexpected key extra" in one_line_error(
        lambda: load_controlnet(official_file(tmp_path / "x.pth", alpha, PixArtControlNet(alpha.config, 1),
                                              extra=torch.zeros(1)), alpha.config)
    )  # fmt: skip
    torch.save({"state_dict": to_official_state_dict(alpha)}, tmp_path / "base.pth")
    assert "holds no ControlNet branch" in one_line_error(lambda: load_controlnet(tmp_path / "base.pth", alpha.config))
    absent = one_line_error(lambda: load_controlnet(tmp_path / "absent.pth", alpha.config))
    assert "does not exist" in absent and absent.endswith("or a bundled one: demo-layout)")  # a misspelt name, too


# ------------------------------------------------------------------------------------- generation and the CLI


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny α pipeline (2 blocks), a one-block ControlNet for it with random weights, and a control image."""
    root = tmp_path_factory.mktemp("control")
    pipe = save_pipeline(root / "alpha", "alpha")
    base = load_transformer(pipe)
    net = randomise(PixArtControlNet.from_transformer(base, num_blocks=1), seed=6, std=0.2)
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 8:40] = (250, 200, 40)  # a rectangle: four clean edges for Canny
    Image.fromarray(pixels).save(root / "control.png")
    (root / "broken.png").write_bytes(b"not an image")
    return {"pipe": pipe, "controlnet": save_controlnet(net, root / "cn.safetensors"), "root": root}


def test_canny_gives_white_edges_on_black_in_three_channels(setup):
    edges = np.asarray(control_map(Image.open(setup["root"] / "control.png"), "canny", 64, 64))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all()
    assert edges[32, 6:11].max() == 255 and edges[32, 20:30].max() == 0  # the left edge, not the inside


def test_generation_with_a_control_scale_of_zero_is_text_to_image(setup):
    pipe = PixArtPipeline.from_pretrained(setup["pipe"], device="cpu")
    options = {"seed": 3, "steps": 2, "width": 64, "height": 64}
    plain = np.asarray(pipe("a box", **options)[0])
    control = Image.open(setup["root"] / "control.png")
    off = pipe("a box", control=control, controlnet=setup["controlnet"], control_scale=0.0, **options)[0]
    steered = pipe("a box", control=control, controlnet=setup["controlnet"], **options)[0]
    assert np.array_equal(np.asarray(off), plain)
    assert not np.array_equal(np.asarray(steered), plain)
    assert steered.info["controlnet"] == str(setup["controlnet"]) and len(steered.info["control_sha256"]) == 64
    # The metadata names the ControlNet, which the pipeline then steers by when given the control image again.
    prompt, again_options, load = GenerationOptions.from_metadata(steered.info)
    again = PixArtPipeline.from_pretrained(load, device="cpu")(prompt, again_options, control=control)[0]
    assert np.array_equal(np.asarray(again), np.asarray(steered))
    with pytest.raises(PixArtError, match="a control image needs a ControlNet to steer the model"):
        pipe("a box", control=control, **options)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pixart", "generate", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)


def test_cli_generates_with_canny_control_and_reproduces_from_the_png(setup, tmp_path, capsys):
    out = tmp_path / "out"
    control = str(setup["root"] / "control.png")
    args = ["a box", "--model", str(setup["pipe"]), "--seed", "5", "--steps", "2", "--width", "64", "--height", "64"]
    given = ["--control", control, "--controlnet", str(setup["controlnet"]), "--control-type", "canny"]
    result = run_cli(*args, *given, "--control-scale", "0.8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    image = Image.open(result.stdout.strip())
    assert (image.info["control_type"], image.info["control_scale"]) == ("canny", "0.8")

    # The PNG names the ControlNet, scale and type; the control image itself is given again.
    assert main(["generate", "--from-png", str(image.filename), "--control", control, "--out", str(out),
                 "--trust-metadata"]) == 0  # fmt: skip
    again = Image.open(capsys.readouterr().out.strip())
    assert np.array_equal(np.asarray(again), np.asarray(image))
    assert main(["generate", "--from-png", str(image.filename), "--trust-metadata"]) == 2
    assert "was made with a control image (sha256 " in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--control", "{root}/control.png"], "error: --control needs a ControlNet to steer the model: pass --control"),
        (["--controlnet", "{cn}"], "error: --controlnet needs a control image to steer by: pass --control IMAGE"),
        (["--control", "{root}/broken.png", "--controlnet", "{cn}"], "error: cannot read control image {root}/broken"),
        (["--control", "{root}/absent.png", "--controlnet", "{cn}"], "error: control image {root}/absent.png does not"),
        (["--control", "{root}/control.png", "--controlnet", "{root}/sigma.safetensors"], "error: sigma.safetens"),
        (["--control", "{root}/control.png", "--controlnet", "{cn}", "--cache-steps", "2"], "error: step caching"),
        (["--control", "{root}/control.png", "--controlnet", "{cn}", "--cache-threshold", "0.1"], "error: step cach"),
        (["--control", "{root}/control.png", "--controlnet", "{cn}", "--control-scale", "-1"], "error: control scale"),
        (["--control", "{root}/control.png", "--controlnet", "{cn}", "--runtime", "openvino"], "error: not with --run"),
    ],
)  # fmt: skip
def test_bad_control_input_is_one_line(setup, flags, message, capsys):
    root = setup["root"]
    if not (root / "sigma.safetensors").exists():
        save_controlnet(PixArtControlNet(CONFIGS["sigma"], 1), root / "sigma.safetensors")
    fill = {"root": str(root), "cn": str(setup["controlnet"])}
    flags = [flag.format(**fill) for flag in flags]
    assert main(["generate", "a box", "--model", str(setup["pipe"]), "--steps", "1", *flags]) == 2
    err = capsys.readouterr().err.strip()
    # Errors found once the model is loaded follow the loaders' progress bars; the error itself is one line.
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(message.format(**fill)), err
    assert err.endswith(errors[0]) and "Traceback" not in err
