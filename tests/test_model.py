"""The transformer on its own: shapes, official init, KV compression, block hooks, tracing, config checks."""

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch

from pixart import PixArtConfig, PixArtError, PixArtTransformer, preset
from pixart.model.transformer import pos_embed_2d


def inputs(cfg, b=2, h=8, w=12, valid=(5, 9)):
    x = torch.randn(b, cfg.in_channels, h, w)
    t = torch.tensor([10.0, 700.0])[:b]
    y = torch.randn(b, cfg.model_max_length, cfg.caption_channels)
    mask = torch.zeros(b, cfg.model_max_length, dtype=torch.long)
    for i, n in enumerate(valid[:b]):
        mask[i, :n] = 1
    res = torch.tensor([[h * 8.0, w * 8.0]] * b)
    ar = torch.tensor([h / w] * b)
    return x, t, y, mask, res, ar


def perturbed(cfg):
    torch.manual_seed(0)
    model = PixArtTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", ["debug-alpha", "debug-sigma"])
def test_output_shape_non_square(name):
    cfg = preset(name)
    model = perturbed(cfg)
    out = model(*inputs(cfg, h=6, w=10))
    assert out.shape == (2, cfg.out_channels, 6, 10)
    assert torch.isfinite(out).all()


def test_fresh_model_predicts_zero():
    # The final linear is zero-initialised, so an untrained model predicts exactly zero.
    cfg = preset("debug-alpha")
    out = PixArtTransformer(cfg)(*inputs(cfg))
    assert torch.equal(out, torch.zeros_like(out))


def test_official_init_values():
    cfg = preset("debug-sigma")
    model = PixArtTransformer(cfg)
    for block in model.blocks:
        assert torch.equal(block.cross_attn.proj.weight, torch.zeros_like(block.cross_attn.proj.weight))
    attn = model.blocks[1].attn
    assert attn.kv_factor == 2
    assert torch.allclose(attn.sr.weight, torch.full_like(attn.sr.weight, 0.25))
    assert model.blocks[0].attn.kv_factor == 1 and not hasattr(model.blocks[0].attn, "sr")


def test_padding_does_not_change_the_output():
    # Extra padding tokens (whatever their features) must not change the prediction.
    cfg = preset("debug-alpha")
    model = perturbed(cfg)
    x, t, y, mask, res, ar = inputs(cfg)
    y2 = y.clone()
    y2[mask == 0] = torch.randn_like(y2[mask == 0]) * 100
    with torch.no_grad():
        assert torch.allclose(model(x, t, y, mask, res, ar), model(x, t, y2, mask, res, ar), atol=1e-6)


def test_kv_compress_factor_one_equals_plain_attention():
    base = preset("debug-sigma").replace(kv_compress={})
    plain = perturbed(base)
    compressed_cfg = base.replace(kv_compress={0: 1, 1: 1, 2: 1})
    compressed = PixArtTransformer(compressed_cfg).eval()
    compressed.load_state_dict(plain.state_dict())
    args = inputs(base)
    with torch.no_grad():
        assert torch.equal(plain(*args), compressed(*args))


def test_kv_compress_as_average_pooling():
    # At init (sr = average pooling) and with the LayerNorm's affine at identity, compressed keys equal
    # LayerNorm(avg_pool(k)).
    cfg = preset("debug-sigma")
    attn = PixArtTransformer(cfg).blocks[1].attn
    k = torch.randn(2, 6 * 10, cfg.hidden_size)
    pooled = torch.nn.functional.avg_pool2d(k.transpose(1, 2).reshape(2, -1, 6, 10), 2).flatten(2).transpose(1, 2)
    expected = torch.nn.functional.layer_norm(pooled, (cfg.hidden_size,))
    assert torch.allclose(attn.compress(k, (6, 10)), expected, atol=1e-5)


def test_pos_embed_layout():
    # First half encodes the column (width) coordinate, sin before cos; the origin token is sin 0, cos 1.
    emb = pos_embed_2d(16, 3, 5, base_size=4, scale=1.0)
    assert emb.shape == (15, 16)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert torch.equal(emb[1, 8:], emb[0, 8:])  # same row, next column: the height half is unchanged
    assert not torch.equal(emb[1, :8], emb[0, :8])


@contextlib.contextmanager
def saved_for_backward() -> Iterator[list[int]]:
    """Collect the size in bytes of every tensor autograd keeps for the backward pass, while inside.

    Tensors a non-reentrant torch.utils.checkpoint region saves go to its own hooks, not to these: what
    checkpointing exists to save is what this list no longer holds.
    """
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.nbytes)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield sizes


def test_gradient_checkpointing_gives_same_gradients_and_recomputes_the_blocks():
    """Checkpointing keeps the gradients, keeps fewer activations for backward, and reruns each block there."""
    cfg = preset("debug-sigma")
    model = perturbed(cfg).train()
    args = inputs(cfg)
    block_runs: list[int] = []
    for i, block in enumerate(model.blocks):  # a pre-hook: checkpoint's recomputation may stop before the end
        block.register_forward_pre_hook(lambda module, inputs, i=i: block_runs.append(i))

    def step():
        """A training step's gradients, the bytes autograd kept for backward, and the blocks run in backward."""
        model.zero_grad()
        block_runs.clear()
        with saved_for_backward() as saved:
            loss = model(*args).square().mean()
        in_forward = len(block_runs)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved), block_runs[in_forward:]

    plain, plain_saved, plain_reruns = step()
    model.gradient_checkpointing = True
    checkpointed, checkpointed_saved, reruns = step()
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert plain_reruns == [] and reruns == [2, 1, 0]  # backward walks the blocks last to first
    assert checkpointed_saved < plain_saved / 4, (checkpointed_saved, plain_saved)


def count_block_calls(model) -> list[int]:
    """Pre-forward hooks on the blocks themselves (a checkpoint's recomputation stops early, before a
    forward hook would fire)."""
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_gradient_checkpointing_applies_where_a_hook_runs_the_block():
    cfg = preset("debug-sigma")
    model = perturbed(cfg).train()
    args = inputs(cfg)

    def grads(**hook):
        model.zero_grad()
        model(*args, **hook).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    calls = count_block_calls(model)
    hooked = grads(block_hook=lambda i, x, run: run(x))
    assert calls == [2] * cfg.depth  # each block ran again in the backward pass: it was checkpointed
    for a, b in zip(plain, hooked, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["debug-alpha", "debug-sigma"])
def test_a_hook_that_only_runs_each_block_is_the_plain_forward(name):
    cfg = preset(name)
    model = perturbed(cfg)
    args = inputs(cfg)
    seen = []

    def hook(i, x, run):
        seen.append(i)
        return run(x)

    with torch.no_grad():
        assert torch.equal(model(*args, block_hook=hook), model(*args))
    assert seen == list(range(cfg.depth))


@pytest.mark.parametrize("after", [0, 2])
def test_a_hook_adding_a_residual_after_block_i_equals_the_blocks_run_by_hand(after):
    # As a ControlNet does: block i's output plus a control residual is the next block's input.
    cfg = preset("debug-sigma")
    model = perturbed(cfg)
    args = inputs(cfg)  # 8 x 12 latents, patch 2: 24 tokens
    residual = torch.randn(2, 24, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(*args, block_hook=lambda i, x, run: run(x) + residual if i == after else run(x))
        x, y, mask, t, t0, hw = model.embed(*args)
        for i, block in enumerate(model.blocks):
            x = block(x, y, t0, mask, hw)
            if i == after:
                x = x + residual
        expected = model.head(x, t, hw)
        assert not torch.allclose(expected, model(*args), atol=1e-3)
    assert torch.equal(got, expected)


def test_a_hook_runs_another_block_with_the_same_conditioning():
    # A ControlNet branch: a copy of block 0 runs on its own tokens with the base's caption, t0 and mask.
    cfg = preset("debug-alpha")
    model = perturbed(cfg)
    args = inputs(cfg)
    branch = copy.deepcopy(model.blocks[0])
    with torch.no_grad():
        for p in branch.parameters():  # other weights than the model's block 0
            p.add_(torch.randn_like(p) * 0.05)
    seen = {}

    def hook(i, x, run):
        if i == 0:
            seen["branch"] = run(x * 0.5, block=branch)
        return run(x)

    with torch.no_grad():
        assert torch.equal(model(*args, block_hook=hook), model(*args))
        x, y, mask, t, t0, hw = model.embed(*args)
        expected = branch(x * 0.5, y, t0, mask, hw)
    assert torch.equal(seen["branch"], expected) and not torch.allclose(
        expected, model.blocks[0](x * 0.5, y, t0, mask, hw)
    )


def test_a_trace_leaves_the_caption_length_free():
    # OpenVINO exports a torch.jit.trace of the forward: it must not freeze the trimmed caption length.
    cfg = preset("debug-alpha")
    model = perturbed(cfg)
    torch.manual_seed(2)
    short, longer = inputs(cfg, valid=(3, 4)), inputs(cfg, valid=(9, 16))
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(model, short, check_trace=False)
    with torch.no_grad():
        trimmed_there = model(*short)
        assert model(*longer).shape == trimmed_there.shape
        # Attending the padded caption under a key mask instead of trimming it reorders float sums only.
        torch.testing.assert_close(traced(*short), trimmed_there)
        torch.testing.assert_close(traced(*longer), model(*longer))


def test_micro_conditions_required():
    cfg = preset("debug-alpha")
    x, t, y, mask, _, _ = inputs(cfg)
    with pytest.raises(ValueError, match="micro-conditions"):
        PixArtTransformer(cfg)(x, t, y, mask)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"family": "gamma"}, "family='gamma'"),
        ({"hidden_size": 50}, "hidden_size=50"),
        ({"depth": 0}, "depth=0"),
        ({"pe_scale": float("nan")}, "pe_scale"),
        ({"kv_compress": {40: 2}}, "layer 40"),
        ({"hidden_size": 64, "num_heads": 2, "micro_conditions": True}, "divisible by 3"),
    ],
)
def test_config_validation_names_the_bad_value(changes, message):
    with pytest.raises(PixArtError, match=message):
        preset("debug-alpha").replace(**changes)


def test_config_round_trips_through_dict():
    cfg = preset("sigma-1024-ms").replace(kv_compress={14: 2, 20: 4})
    data = cfg.to_dict()
    data["kv_compress"] = {str(k): v for k, v in data["kv_compress"].items()}  # as JSON gives it back
    assert PixArtConfig.from_dict(data) == cfg


def test_unknown_preset_lists_known_ones():
    with pytest.raises(PixArtError, match="alpha-1024-ms"):
        preset("alpha-2048")
