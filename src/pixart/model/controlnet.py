"""The PixArt-δ ControlNet-Transformer: a trainable copy of the first blocks, steered by a control image.

PixArt-δ (Chen et al. 2024, arXiv 2401.05252 §4) copies the first 13 of the 28 base blocks. The control
image's VAE latents, patch-embedded by the frozen base ``x_embedder`` plus the position embedding
(:func:`control_tokens`), enter the branch through a zero-initialised ``before_proj``; the output of each
branch block passes a zero-initialised ``after_proj`` and is added to the input of the next base block.
In the official code's order (``ControlPixArtHalf.forward``), with c the control tokens::

    x = base.blocks[0](x)
    for i in 0 … N-1:
        c = branch[i]((x + before_proj(c)) if i == 0 else c)
        x = base.blocks[i + 1](x + scale · after_proj(c))
    x = base.blocks[N + 1 …](x)

Parameter names are the official ones (``controlnet.i.copied_block.*``, ``controlnet.0.before_proj``,
``controlnet.i.after_proj``), so a released checkpoint's branch loads with no renaming. The branch runs as a
block hook (:data:`pixart.model.transformer.BlockHook`) on the base model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from pixart.errors import PixArtError
from pixart.model.config import PixArtConfig
from pixart.model.transformer import PixArtBlock, PixArtTransformer

COPIED_BLOCKS = 13
"""Blocks the released α ControlNets copy (of 28): the PixArt-δ "ControlNet-Transformer" half."""


class ControlBlock(nn.Module):
    """Branch block i: a copy of base block i, its after_proj and (block 0 only) the before_proj."""

    def __init__(self, config: PixArtConfig, index: int):
        super().__init__()
        c = config.hidden_size
        self.copied_block = PixArtBlock(config, config.kv_factor(index))
        if index == 0:
            self.before_proj = nn.Linear(c, c)
        self.after_proj = nn.Linear(c, c)


class PixArtControlNet(nn.Module):
    """The branch alone (the base model stays apart and frozen); run it with :meth:`hook`."""

    def __init__(self, config: PixArtConfig, num_blocks: int = COPIED_BLOCKS):
        """config: the base model's; num_blocks: how many of its first blocks the branch copies."""
        super().__init__()
        if not isinstance(num_blocks, int) or not 1 <= num_blocks < config.depth:
            raise PixArtError(
                f"a ControlNet copies from 1 to {config.depth - 1} blocks of this {config.depth}-block model, "
                f"got {num_blocks!r}"
            )
        self.config, self.num_blocks = config, num_blocks
        self.controlnet = nn.ModuleList(ControlBlock(config, i) for i in range(num_blocks))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Zero projections: a new branch adds nothing, so the base model's output is unchanged exactly."""
        projections = [self.controlnet[0].before_proj] + [block.after_proj for block in self.controlnet]
        for linear in projections:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @classmethod
    def from_transformer(cls, base: PixArtTransformer, num_blocks: int = COPIED_BLOCKS) -> PixArtControlNet:
        """A new branch for ``base``: its first blocks copied, the projections zero (training starts here)."""
        net = cls(base.config, num_blocks)
        for i, block in enumerate(net.controlnet):
            block.copied_block.load_state_dict(base.blocks[i].state_dict())
        return net.to(device=base.x_embedder.proj.weight.device, dtype=base.dtype)

    def hook(self, tokens: torch.Tensor, scale: float = 1.0) -> ControlHook:
        """The block hook that runs this branch on control tokens (:func:`control_tokens`)."""
        return ControlHook(self, tokens, scale)


def control_tokens(base: PixArtTransformer, latents: torch.Tensor) -> torch.Tensor:
    """Control latents (B, C, H, W), scaled as image latents, as tokens (B, h*w, D): embedded exactly as the
    base model embeds its input x (the frozen x_embedder plus the sin-cos position embedding)."""
    p = base.config.patch_size
    latents = latents.to(base.dtype)
    pos = base.pos_embed(latents.shape[-2] // p, latents.shape[-1] // p, latents.device)
    return base.x_embedder(latents) + pos.to(latents.dtype)


class ControlHook:
    """A block hook adding the branch's residuals to the base blocks 1 … N, in the official order.

    Control tokens of fewer rows than the batch are repeated, as the official model repeats its text mask:
    one control image serves every image of a batch, and both halves of a guidance batch.
    """

    def __init__(self, net: PixArtControlNet, tokens: torch.Tensor, scale: float = 1.0):
        self.net, self.tokens, self.scale = net, tokens, scale
        self.c: torch.Tensor | None = None  # the branch's tokens between two base blocks of one forward

    def __call__(self, i: int, x: torch.Tensor, run: Callable[..., torch.Tensor]) -> torch.Tensor:
        if 1 <= i <= self.net.num_blocks:
            branch = self.net.controlnet[i - 1]
            if i == 1:
                c = self.tokens
                if c.shape[0] != x.shape[0]:
                    if x.shape[0] % c.shape[0]:
                        raise PixArtError(
                            f"{c.shape[0]} control maps do not divide a batch of {x.shape[0]}: give one, or one "
                            "per image"
                        )
                    c = c.repeat(x.shape[0] // c.shape[0], 1, 1)
                self.c = run(x + branch.before_proj(c), block=branch.copied_block)
            else:
                self.c = run(self.c, block=branch.copied_block)
            x = x + self.scale * branch.after_proj(self.c)
            if i == self.net.num_blocks:
                self.c = None
        return run(x)


def controlled(base: PixArtTransformer, net: PixArtControlNet, latents: torch.Tensor, scale: float = 1.0):
    """The base model called like itself, with the branch steering it by the control latents (B, C, H, W)."""
    return partial(base, block_hook=net.hook(control_tokens(base, latents), scale))
