"""LoRA files in every common format (peft/diffusers, kohya, ComfyUI) merge to the same weights; convert and merge.

The fixtures are written here by the key rules each writer uses for PixArt (OneTrainer's ``lora_transformer_``
+ underscored diffusers names, ComfyUI's ``diffusion_model.`` + official names, …), not by pixart's converter,
so a wrong rule in ``pixart.checkpoints.lora_formats`` cannot agree with itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.lora import add_lora, load_lora, save_lora
from pixart.cli import main
from test_lora import one_line_error, perturb
from tiny import save_pipeline, tiny_transformer

WIDTH = 48  # the tiny transformer's hidden size
# Official module → diffusers modules (row blocks), as in the PixArt repo's convert_pixart_alpha_to_diffusers.py.
OFFICIAL = {
    "blocks.{i}.attn.qkv": ("transformer_blocks.{i}.attn1.to_q", "transformer_blocks.{i}.attn1.to_k",
                            "transformer_blocks.{i}.attn1.to_v"),
    "blocks.{i}.attn.proj": ("transformer_blocks.{i}.attn1.to_out.0",),
    "blocks.{i}.cross_attn.q_linear": ("transformer_blocks.{i}.attn2.to_q",),
    "blocks.{i}.cross_attn.kv_linear": ("transformer_blocks.{i}.attn2.to_k", "transformer_blocks.{i}.attn2.to_v"),
    "blocks.{i}.mlp.fc2": ("transformer_blocks.{i}.ff.net.2",),
    "t_block.1": ("adaln_single.linear",),
}  # fmt: skip
SHAPES = {  # diffusers module → (in, out) in the tiny model
    "attn1.to_q": (WIDTH, WIDTH), "attn1.to_k": (WIDTH, WIDTH), "attn1.to_v": (WIDTH, WIDTH),
    "attn1.to_out.0": (WIDTH, WIDTH), "attn2.to_q": (WIDTH, WIDTH), "attn2.to_k": (WIDTH, WIDTH),
    "attn2.to_v": (WIDTH, WIDTH), "ff.net.2": (4 * WIDTH, WIDTH), "adaln_single.linear": (WIDTH, 6 * WIDTH),
}  # fmt: skip


@pytest.fixture(params=["alpha", "sigma"])
def family(request):
    return request.param


@pytest.fixture
def base_folder(tmp_path, family):
    """The tiny diffusers transformer of ``family`` saved to a folder, which pixart loads afresh for each LoRA."""
    tiny_transformer(family, seed=3).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def shape_of(name):
    return next(shape for tail, shape in SHAPES.items() if name.endswith(tail))


def random_pairs(names, rank, seed):
    """diffusers module → (down (r, in), up (out, r)), random and non-zero."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in names:
        fan_in, fan_out = shape_of(name)
        pairs[name] = (torch.randn(rank, fan_in, generator=g) * 0.2, torch.randn(fan_out, rank, generator=g) * 0.2)
    return pairs


def split_lora(rank=3, seed=5):
    """A LoRA as diffusers trainers make it: separate q/k/v LoRAs, each with its own down."""
    names = [d.format(i=i) for i in range(2) for parts in OFFICIAL.values() for d in parts]
    return random_pairs(sorted(set(names)), rank, seed)


def fused_lora(rank=3, seed=6):
    """A LoRA on official modules, fused qkv and kv included: official module → (down, up)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for official, parts in OFFICIAL.items():
        for i in range(2):
            fan_in, fan_out = shape_of(parts[0])
            pairs[official.format(i=i)] = (
                torch.randn(rank, fan_in, generator=g) * 0.2,
                torch.randn(fan_out * len(parts), rank, generator=g) * 0.2,
            )
    return pairs


def as_diffusers(fused):
    """The fused LoRA as peft on diffusers modules: parts share down, up split by rows (how pixart saves)."""
    out = {}
    for official, (down, up) in fused.items():
        i = official.split(".")[1] if official.startswith("blocks.") else None
        template = next(k for k in OFFICIAL if k.format(i=i) == official)
        parts = [p.format(i=i) for p in OFFICIAL[template]]
        for name, chunk in zip(parts, up.chunk(len(parts)), strict=True):
            out[name] = (down, chunk)
    return out


def write_peft(folder, pairs, rank, alpha):
    """peft's adapter folder: PeftModel.save_pretrained's key names and its LoraConfig json."""
    folder.mkdir()
    tensors = {}
    for name, (down, up) in pairs.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = down.clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = up.clone()
    save_file(tensors, folder / "adapter_model.safetensors")
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(pairs)).save_pretrained(folder)
    return folder


def write_keys(path, pairs, alpha, stem, roles=("lora_down", "lora_up")):
    """Save each (down, up) as ``stem(module).<down role>.weight`` / ``.<up role>.weight`` / ``.alpha``."""
    tensors = {}
    for name, (down, up) in pairs.items():
        tensors[f"{stem(name)}.{roles[0]}.weight"] = down.clone()
        tensors[f"{stem(name)}.{roles[1]}.weight"] = up.clone()
        tensors[f"{stem(name)}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, path)
    return path


# Each writer's stem rule for PixArt, on diffusers module names (split) or official ones (fused).
def write_kohya(path, pairs, alpha, prefix="lora_transformer_"):
    """OneTrainer / ai-toolkit: prefix + diffusers module name with '.' → '_'."""
    return write_keys(path, pairs, alpha, lambda name: prefix + name.replace(".", "_"))


def write_diffusers_with_alpha(path, pairs, alpha):
    """diffusers-style: 'transformer.' + diffusers module name, lora_A / lora_B, and an '.alpha' scalar."""
    return write_keys(path, pairs, alpha, lambda name: f"transformer.{name}", roles=("lora_A", "lora_B"))


def write_comfyui(path, fused, alpha, prefix="diffusion_model."):
    """ComfyUI's generic names for its native PixArt (official modules), or ExtraModels' (no prefix)."""
    return write_keys(path, fused, alpha, lambda official: prefix + official)


def write_comfy_kohya(path, fused, alpha):
    """ComfyUI's kohya names for native models: lora_unet_ + official module name with '.' → '_'."""
    return write_keys(path, fused, alpha, lambda official: "lora_unet_" + official.replace(".", "_"))


def cli_error(capsys, args, *fragments):
    """Run `pixart ARGS`; it must fail with exit 2 and one error line holding every fragment."""
    capsys.readouterr()
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(f in lines[0] for f in fragments), lines[0]


def merged_weights(folder, family, *loras):
    model = load_transformer(folder, family=family)
    for path, scale in loras:
        load_lora(model, path, scale=scale, merge=True)
    return model.state_dict()


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol:
            assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "writer",
    [
        lambda path, pairs, alpha: write_kohya(path, pairs, alpha),
        lambda path, pairs, alpha: write_kohya(path, pairs, alpha, prefix="lycoris_"),  # SimpleTuner's LyCORIS LoRA
        lambda path, pairs, alpha: write_kohya(path, pairs, alpha, prefix="lora_unet_"),
        write_diffusers_with_alpha,
    ],
    ids=["onetrainer", "simpletuner-lycoris", "lora-unet-diffusers-names", "diffusers-alpha"],
)
def test_split_qkv_formats_merge_exactly_like_peft(base_folder, family, tmp_path, writer):
    pairs = split_lora()
    peft = write_peft(tmp_path / "peft", pairs, rank=3, alpha=5)
    other = writer(tmp_path / "other.safetensors", pairs, 5)
    expected = merged_weights(base_folder, family, (peft, 0.8))
    assert not torch.equal(
        expected["blocks.0.attn.qkv.weight"], merged_weights(base_folder, family)["blocks.0.attn.qkv.weight"]
    )
    assert_same(merged_weights(base_folder, family, (other, 0.8)), expected)
    # live (unmerged) peft layers give the same model output too
    live = load_lora(load_transformer(base_folder, family=family), other)
    reference = load_lora(load_transformer(base_folder, family=family), peft)
    assert_same(live.state_dict(), reference.state_dict())


@pytest.mark.parametrize(
    "writer",
    [write_comfyui, lambda p, f, a: write_comfyui(p, f, a, prefix=""), write_comfy_kohya],
    ids=["comfyui", "extramodels", "comfyui-lora-unet"],
)
def test_fused_official_formats_merge_exactly_like_peft(base_folder, family, tmp_path, writer):
    fused = fused_lora()
    peft = write_peft(tmp_path / "peft", as_diffusers(fused), rank=3, alpha=2)
    other = writer(tmp_path / "comfy.safetensors", fused, 2)
    assert_same(merged_weights(base_folder, family, (other, 1.0)), merged_weights(base_folder, family, (peft, 1.0)))


@pytest.mark.parametrize("config", [LoHaConfig, LoKrConfig], ids=["loha", "lokr"])
def test_lycoris_loha_and_lokr_merge_like_peft(base_folder, family, tmp_path, config):
    """SimpleTuner's LyCORIS files: lycoris_ + underscored diffusers names, LyCORIS tensor names, .alpha."""
    reference = PixArtTransformer2DModel.from_pretrained(base_folder)
    targets = ["attn1.to_q", "attn1.to_k", "attn2.to_v", "ff.net.2"]
    peft_model = get_peft_model(reference, config(r=2, alpha=3, target_modules=targets))
    g = torch.Generator().manual_seed(8)
    tensors = {}
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".hada_" in name or ".lokr_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
                module, kind = name.removeprefix("base_model.model.").removesuffix(".default").rsplit(".", 1)
                stem = "lycoris_" + module.replace(".", "_")
                tensors[f"{stem}.{kind}"], tensors[f"{stem}.alpha"] = param.detach().clone(), torch.tensor(3.0)
    assert any(".lokr_w2_b" in k or ".hada_w2_b" in k for k in tensors)  # w2 is a low-rank pair: scale alpha/r
    save_file(tensors, tmp_path / "lycoris.safetensors")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    expected = load_transformer(tmp_path / "merged", family=family).state_dict()
    got = merged_weights(base_folder, family, (tmp_path / "lycoris.safetensors", 1.0))
    assert not torch.equal(
        got["blocks.0.attn.qkv.weight"], merged_weights(base_folder, family)["blocks.0.attn.qkv.weight"]
    )
    # the Hadamard / Kronecker product as one LoRA: the same sums in another order, hence ≤ 1e-6
    assert_same(got, expected, atol=1e-6)


def trained(base_folder, family, tmp_path, name, seed):
    model = load_transformer(base_folder, family=family)
    add_lora(model, rank=4, alpha=6, targets=("attn", "cross_attn", "mlp"))
    perturb(model, seed=seed)
    return save_lora(model, tmp_path / name)


def test_convert_out_and_back_round_trips(base_folder, family, tmp_path):
    ours = trained(base_folder, family, tmp_path, "ours", seed=2)
    expected = merged_weights(base_folder, family, (ours, 1.0))
    kohya, comfy, back = tmp_path / "k.safetensors", tmp_path / "c.safetensors", tmp_path / "back"
    assert main(["lora", "convert", str(ours), str(kohya), "--to", "kohya"]) == 0
    assert main(["lora", "convert", str(kohya), str(comfy), "--to", "comfyui"]) == 0
    assert main(["lora", "convert", str(comfy), str(back), "--to", "peft"]) == 0
    keys = load_file(kohya)
    assert "lora_transformer_transformer_blocks_1_attn1_to_v.lora_up.weight" in keys
    assert float(keys["lora_transformer_transformer_blocks_1_attn1_to_v.alpha"]) == 6.0
    keys = load_file(comfy)
    assert keys["diffusion_model.blocks.1.attn.qkv.lora_up.weight"].shape == (3 * WIDTH, 4)
    assert {k.split(".")[4] for k in keys if k.startswith("diffusion_model.blocks.0.mlp.")} == {"fc1", "fc2"}
    for path in (kohya, comfy, back):  # ours shares down across q/k/v, so fusing back is exact
        assert_same(merged_weights(base_folder, family, (path, 1.0)), expected)

    # Separate q/k/v LoRAs fuse into one block-diagonal LoRA for ComfyUI: exact but for the order of the
    # float products (alpha/rank folded into up first), hence ≤ 1e-6.
    split = write_kohya(tmp_path / "split.safetensors", split_lora(), alpha=5)
    assert main(["lora", "convert", str(split), str(tmp_path / "split-c.safetensors"), "--to", "comfyui"]) == 0
    assert (
        main(["lora", "convert", str(tmp_path / "split-c.safetensors"), str(tmp_path / "split-p"), "--to", "peft"]) == 0
    )
    want = merged_weights(base_folder, family, (split, 1.0))
    assert_same(merged_weights(base_folder, family, (tmp_path / "split-p", 1.0)), want, atol=1e-6)


def test_merge_of_two_equals_applying_both(base_folder, family, tmp_path):
    a = trained(base_folder, family, tmp_path, "a", seed=2)
    b = write_comfyui(tmp_path / "b.safetensors", fused_lora(rank=2, seed=9), alpha=3)
    out = tmp_path / "ab.safetensors"
    assert main(["lora", "merge", f"{a}:0.7", f"{b}:0.3", str(out), "--to", "kohya"]) == 0
    both = merged_weights(base_folder, family, (a, 0.7), (b, 0.3))
    # one matmul of the summed rank instead of two: the same sums in another order, hence ≤ 1e-6
    assert_same(merged_weights(base_folder, family, (out, 1.0)), both, atol=1e-6)
    assert not torch.allclose(
        both["blocks.0.attn.qkv.weight"], merged_weights(base_folder, family, (a, 0.7))["blocks.0.attn.qkv.weight"]
    )


def test_unknown_keys_are_named_never_ignored(base_folder, family, tmp_path, capsys):
    path = write_kohya(tmp_path / "te.safetensors", split_lora(), alpha=5)
    tensors = load_file(path)
    for i in range(5):  # OneTrainer also trains T5: pixart applies no text-encoder LoRA, so it must say so
        tensors[f"lora_te_encoder_block_{i}_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 8)
    save_file(tensors, path)
    model = load_transformer(base_folder, family=family)
    message = one_line_error(
        lambda: load_lora(model, path), "te.safetensors", "lora_te_encoder_block_0", "(and 2 more)"
    )
    assert "not a LoRA weight" in message
    cli_error(capsys, ["lora", "convert", str(path), str(tmp_path / "o"), "--to", "peft"], "lora_te_encoder")


def test_lora_for_another_model_is_one_line_naming_the_file(base_folder, family, tmp_path):
    model = load_transformer(base_folder, family=family)
    wide = {n: (torch.zeros(2, 64), torch.zeros(shape_of(n)[1], 2)) for n in split_lora()}
    path = write_kohya(tmp_path / "xl.safetensors", wide, alpha=2)
    one_line_error(lambda: load_lora(model, path), "xl.safetensors", "64", "different model size")
    deep = {"blocks.27.attn.qkv": (torch.zeros(2, WIDTH), torch.zeros(3 * WIDTH, 2))}
    path = write_comfyui(tmp_path / "deep.safetensors", deep, alpha=2)
    one_line_error(lambda: load_lora(model, path), "deep.safetensors", "transformer_blocks.27", "2 blocks")
    if family == "sigma":  # α-1024's micro-condition embedders do not exist in Σ
        micro = {"adaln_single.emb.resolution_embedder.linear_1": (torch.zeros(2, 256), torch.zeros(WIDTH, 2))}
        path = write_kohya(tmp_path / "alpha-only.safetensors", micro, alpha=2)
        one_line_error(lambda: load_lora(model, path), "alpha-only.safetensors", "resolution_embedder", "sigma model")


def test_other_adapter_kinds_and_bad_cli_input_fail_with_one_line(base_folder, family, tmp_path, capsys):
    model = load_transformer(base_folder, family=family)
    tucker = {"lycoris_transformer_blocks_0_attn1_to_q.lokr_t2": torch.zeros(2, 2, 1, 1)}
    save_file(tucker, tmp_path / "tucker.safetensors")
    one_line_error(lambda: load_lora(model, tmp_path / "tucker.safetensors"), "tucker.safetensors", "LyCORIS Tucker")
    half = {"lycoris_transformer_blocks_0_attn1_to_q.hada_w1_a": torch.zeros(WIDTH, 2)}
    save_file(half, tmp_path / "half.safetensors")
    one_line_error(lambda: load_lora(model, tmp_path / "half.safetensors"), "half.safetensors", "malformed LyCORIS")

    good = write_kohya(tmp_path / "good.safetensors", split_lora(), alpha=5)
    cli_error(
        capsys, ["lora", "convert", str(good), str(tmp_path / "out.bin"), "--to", "kohya"], "out.bin", ".safetensors"
    )
    cli_error(capsys, ["lora", "merge", str(good), str(tmp_path / "o")], "at least two")
    wide = {"transformer_blocks.0.attn1.to_q": (torch.zeros(2, 64), torch.zeros(WIDTH, 2))}
    other = write_kohya(tmp_path / "wide.safetensors", wide, 2)
    args = ["lora", "merge", str(good), str(other), str(tmp_path / "o")]
    cli_error(capsys, args, "transformer_blocks.0.attn1.to_q", "one model")
    assert not (tmp_path / "o").exists()


def test_generate_takes_any_format_with_a_scale(tmp_path):
    """`pixart generate --lora PATH:SCALE` with a OneTrainer file draws what the same LoRA as peft draws."""
    folder = save_pipeline(tmp_path / "sigma", "sigma")
    pairs = split_lora()
    peft = write_peft(tmp_path / "peft", pairs, rank=3, alpha=5)
    kohya = write_kohya(tmp_path / "onetrainer.safetensors", pairs, 5)

    def draw(lora, out):
        args = ["generate", "a tree", "--model", str(folder), "--device", "cpu", "--steps", "2", "--seed", "3"]
        assert main([*args, "--width", "32", "--height", "32", "--no-binning", "--lora", lora, "--out", str(out)]) == 0
        (png,) = out.glob("*.png")
        return np.asarray(Image.open(png))

    drawn = draw(f"{kohya}:0.8", tmp_path / "k")
    assert np.array_equal(drawn, draw(f"{peft}:0.8", tmp_path / "p"))
    assert not np.array_equal(drawn, draw(f"{kohya}:0", tmp_path / "none"))
