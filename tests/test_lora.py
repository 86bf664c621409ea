"""LoRA: peft adapters on our fused-projection model, exchanged with diffusers' PixArtTransformer2DModel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.lora import (
    LoraSwitch,
    add_lora,
    load_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    parse_lora_spec,
    save_lora,
)
from pixart.errors import PixArtError
from test_files import assert_plain_modes
from tiny import T5_WIDTH, tiny_transformer


@pytest.fixture(params=["alpha", "sigma"])
def family(request):
    return request.param


@pytest.fixture
def base_folder(tmp_path, family):
    """A tiny diffusers transformer folder both implementations load the same weights from."""
    folder = tmp_path / f"base-{family}"
    tiny_transformer(family, seed=3).save_pretrained(folder)
    return folder


def ours(folder, family):
    return load_transformer(folder, family=family)


def theirs(folder):
    return PixArtTransformer2DModel.from_pretrained(folder).eval()


def inputs(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 12, generator=g)
    t = torch.tensor([999.0, 250.0])
    y = torch.randn(2, 7, T5_WIDTH, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    extra = {}
    if family == "alpha":
        extra = {"resolution": torch.tensor([[128.0, 96.0]] * 2), "aspect_ratio": torch.tensor([128 / 96] * 2)}
    return x, t, y, mask, extra


@torch.no_grad()
def run_ours(model, family, seed=0):
    x, t, y, mask, extra = inputs(family, seed)
    return model(x, t, y, mask, **extra)


@torch.no_grad()
def run_theirs(model, family, seed=0):
    x, t, y, mask, extra = inputs(family, seed)
    added = extra or {"resolution": None, "aspect_ratio": None}
    return model(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=added).sample


def perturb(model, seed=1):
    """Give every LoRA A and B random values, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_add_lora_trains_only_adapters_and_starts_as_identity(base_folder, family):
    model = ours(base_folder, family)
    before = run_ours(model, family)
    names = add_lora(model, rank=4, alpha=8, targets=("attn", "cross_attn", "mlp"))
    assert len(names) == 2 * 7  # 2 blocks × (qkv, proj, q, kv, proj, fc1, fc2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}
    assert torch.equal(run_ours(model, family), before)  # B starts at zero

    x, t, y, mask, extra = inputs(family)
    model(x, t, y, mask, **extra).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B" in n)
    assert set(lora_state_dict(model)) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}


def test_targets_accept_module_patterns(base_folder, family):
    model = ours(base_folder, family)
    assert add_lora(model, 2, targets=[r"blocks\.1\.attn\.qkv", "mlp.fc2"]) == [
        "blocks.0.mlp.fc2",
        "blocks.1.attn.qkv",
        "blocks.1.mlp.fc2",
    ]


def test_saved_lora_gives_diffusers_with_peft_the_same_output(base_folder, family, tmp_path):
    model = ours(base_folder, family)
    add_lora(model, rank=4, alpha=6, targets=("attn", "cross_attn", "mlp"))
    perturb(model)
    expected = run_ours(model, family)
    assert not torch.allclose(expected, run_ours(ours(base_folder, family), family), atol=1e-3)

    save_lora(model, tmp_path / "lora")
    assert_plain_modes(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "transformer_blocks.0.attn1.to_q" in config["target_modules"]
    assert (config["r"], config["lora_alpha"]) == (4, 6)

    reference = theirs(base_folder)
    assert torch.allclose(run_theirs(reference, family), run_ours(ours(base_folder, family), family), atol=1e-5)
    PeftModel.from_pretrained(reference, tmp_path / "lora")
    assert torch.allclose(run_theirs(reference, family), expected, atol=1e-5)


def test_save_then_load_live_and_merged_round_trips(base_folder, family, tmp_path):
    model = ours(base_folder, family)
    add_lora(model, rank=3, alpha=5, targets=("attn", "cross_attn"))
    perturb(model)
    expected = run_ours(model, family)
    save_lora(model, tmp_path / "lora")

    live = load_lora(ours(base_folder, family), tmp_path / "lora")
    assert {n: v for n, v in lora_state_dict(live).items()}.keys() == lora_state_dict(model).keys()
    assert all(torch.equal(lora_state_dict(live)[k], v) for k, v in lora_state_dict(model).items())
    assert torch.equal(run_ours(live, family), expected)

    merged = load_lora(ours(base_folder, family), tmp_path / "lora", merge=True)
    assert not lora_layers(merged)
    assert torch.allclose(run_ours(merged, family), expected, atol=1e-5)

    # merge_lora on a live model gives the merged result; scale 0.5 halves the change, live or merged.
    assert torch.allclose(run_ours(merge_lora(live), family), expected, atol=1e-5)
    base = run_ours(ours(base_folder, family), family)
    half_live = load_lora(ours(base_folder, family), tmp_path / "lora", scale=0.5)
    half_merged = load_lora(ours(base_folder, family), tmp_path / "lora", scale=0.5, merge=True)
    assert torch.allclose(run_ours(half_live, family), run_ours(half_merged, family), atol=1e-5)
    assert not torch.allclose(run_ours(half_live, family), expected, atol=1e-3)
    # re-saving a rescaled live adapter keeps its scale
    save_lora(half_live, tmp_path / "half")
    resaved = load_lora(ours(base_folder, family), tmp_path / "half")
    assert torch.allclose(run_ours(resaved, family), run_ours(half_live, family), atol=1e-6)
    assert not torch.allclose(run_ours(resaved, family), base, atol=1e-3)


def test_lora_state_dict_resumes_into_a_fresh_adapter(base_folder, family):
    model = ours(base_folder, family)
    add_lora(model, rank=4, targets="attn")
    perturb(model)
    state = lora_state_dict(model)

    resumed = ours(base_folder, family)
    add_lora(resumed, rank=4, targets="attn")
    load_lora_state_dict(resumed, state)
    assert torch.equal(run_ours(resumed, family), run_ours(model, family))

    other_rank = ours(base_folder, family)
    add_lora(other_rank, rank=2, targets="attn")
    one_line_error(lambda: load_lora_state_dict(other_rank, state), "shape (4, 48)", "(2, 48)")
    other_targets = ours(base_folder, family)
    add_lora(other_targets, rank=4, targets="mlp")
    one_line_error(lambda: load_lora_state_dict(other_targets, state), "targets differ")
    one_line_error(lambda: load_lora_state_dict(ours(base_folder, family), state), "no LoRA adapter")


@pytest.mark.parametrize(
    "targets, rank_pattern",
    [
        (["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"], {"to_k": 2, "attn2.to_v": 5}),
        (["attn1.to_q", "attn1.to_v", "attn2.to_k"], {}),  # partial: fused layers get zero rows for the rest
    ],
)
def test_diffusers_trained_qkv_lora_loads_exactly(base_folder, family, tmp_path, targets, rank_pattern):
    reference = theirs(base_folder)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern={})
    peft_model = get_peft_model(reference, config)
    perturb(peft_model, seed=7)
    peft_model.save_pretrained(tmp_path / "diffusers-lora")
    expected = run_theirs(reference, family)

    live = load_lora(ours(base_folder, family), tmp_path / "diffusers-lora")
    assert torch.allclose(run_ours(live, family), expected, atol=1e-5)
    merged = load_lora(ours(base_folder, family), tmp_path / "diffusers-lora", merge=True)
    assert torch.allclose(run_ours(merged, family), expected, atol=1e-5)
    # and it survives our save → diffusers again
    save_lora(live, tmp_path / "resaved")
    again = theirs(base_folder)
    PeftModel.from_pretrained(again, tmp_path / "resaved")
    assert torch.allclose(run_theirs(again, family), expected, atol=1e-5)


def test_bare_diffusers_safetensors_file_loads_with_alpha_equal_rank(base_folder, family, tmp_path):
    """diffusers' training scripts write pytorch_lora_weights.safetensors (keys under 'transformer.', no config)."""
    reference = theirs(base_folder)
    peft_model = get_peft_model(reference, LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"]))
    perturb(peft_model, seed=4)
    expected = run_theirs(reference, family)
    state = {
        k.replace("base_model.model.", "transformer.").replace(".default", ""): v.contiguous()
        for k, v in peft_model.state_dict().items()
        if ".lora_" in k
    }
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors")
    merged = load_lora(ours(base_folder, family), tmp_path / "pytorch_lora_weights.safetensors", merge=True)
    assert torch.allclose(run_ours(merged, family), expected, atol=1e-5)


def one_line_error(call, *fragments):
    with pytest.raises(PixArtError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_bad_adapters_fail_with_one_line(base_folder, family, tmp_path):
    model = ours(base_folder, family)
    one_line_error(lambda: load_lora(model, tmp_path / "nope"), "nope", "does not exist", "a bundled LoRA: demo-lcm")
    (tmp_path / "junk.safetensors").write_text("not a safetensors file")
    one_line_error(lambda: load_lora(model, tmp_path / "junk.safetensors"), "junk.safetensors", "safetensors")
    save_file({"some.weight": torch.zeros(2, 2)}, tmp_path / "full.safetensors")
    one_line_error(lambda: load_lora(model, tmp_path / "full.safetensors"), "some.weight", "not a LoRA weight")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_lora(model, tmp_path / "empty"), "adapter_model.safetensors")

    add_lora(model, rank=4)
    save_lora(model, tmp_path / "good")
    config_path = tmp_path / "good" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 8}))
    one_line_error(lambda: load_lora(ours(base_folder, family), tmp_path / "good"), "rank 4", "r=8")
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    one_line_error(lambda: load_lora(ours(base_folder, family), tmp_path / "good"), "DoRA")
    config_path.write_text(json.dumps(config))

    weights = load_file(tmp_path / "good" / "adapter_model.safetensors")
    deeper = {k.replace("transformer_blocks.1.", "transformer_blocks.5."): v for k, v in weights.items()}
    save_file(deeper, tmp_path / "deep.safetensors")
    one_line_error(lambda: load_lora(ours(base_folder, family), tmp_path / "deep.safetensors"), "transformer_blocks.5")
    wider = {k: torch.zeros(v.shape[0], 64) if ".lora_A" in k else v for k, v in weights.items()}
    save_file(wider, tmp_path / "wide.safetensors")
    one_line_error(lambda: load_lora(ours(base_folder, family), tmp_path / "wide.safetensors"), "64", "48")

    one_line_error(lambda: load_lora(model, tmp_path / "good", merge=False), "already has a live LoRA")
    one_line_error(lambda: add_lora(model, rank=2), "already has a LoRA")
    one_line_error(lambda: load_lora(ours(base_folder, family), tmp_path / "good", scale=float("nan")), "nan")


def test_bad_add_lora_arguments(base_folder, family):
    model = ours(base_folder, family)
    one_line_error(lambda: add_lora(model, rank=0), "rank 0")
    one_line_error(lambda: add_lora(model, rank=4, alpha=-1), "alpha -1")
    one_line_error(lambda: add_lora(model, rank=4, dropout=1.5), "dropout 1.5")
    one_line_error(lambda: add_lora(model, rank=4, targets=("atn",)), "'atn'", "cross_attn")
    one_line_error(lambda: add_lora(model, rank=4, targets=("(",)), "regular expression")
    one_line_error(lambda: save_lora(model, "unused"), "no LoRA adapter")
    assert not lora_layers(model)


def test_parse_lora_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("style/lora", "C:/loras/x", "a:b"):
        Path(path).mkdir(parents=True)
    assert parse_lora_spec("style/lora:0.7") == ("style/lora", 0.7)
    assert parse_lora_spec("style/lora") == ("style/lora", 1.0)
    assert parse_lora_spec("C:/loras/x") == ("C:/loras/x", 1.0)
    assert parse_lora_spec("a:b:-1.5") == ("a:b", -1.5)
    assert parse_lora_spec("demo-lcm:0.5") == ("demo-lcm", 0.5)  # a bundled LoRA's name
    one_line_error(lambda: parse_lora_spec(""), "--lora")
    one_line_error(lambda: parse_lora_spec("absent:0.5"), "'absent' does not exist", "a bundled LoRA: demo-lcm")


def test_lora_switch_merges_exactly_like_loading_and_restores_the_base(base_folder, family, tmp_path):
    paths = {}
    for seed, name in enumerate(("one", "two"), start=1):
        model = ours(base_folder, family)
        add_lora(model, 4, targets=("attn", "mlp") if name == "one" else ("cross_attn",))
        perturb(model, seed)
        paths[name] = save_lora(model, tmp_path / name)
    model = ours(base_folder, family)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    switch = LoraSwitch(model, paths)
    for chosen in [(("one", 0.7),), (("two", 1.0), ("one", -0.3)), (), (("one", 0.7),)]:
        switch.use(chosen)
        loaded = ours(base_folder, family)
        for name, scale in chosen:
            load_lora(loaded, paths[name], scale, merge=True)
        expected = loaded.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), chosen  # bit for bit
        assert any(not torch.equal(v, base[k]) for k, v in model.state_dict().items()) == bool(chosen)
