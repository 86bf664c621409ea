"""Step caching: faster denoising with the same weights by reusing the deep blocks' work between steps.

Step caching follows FORA (Selvaraju et al. 2024, arXiv 2407.01425) and Δ-DiT (Chen et al. 2024,
arXiv 2406.01125): between neighbouring denoising steps the deep blocks change what they add to the
token stream very little, so ``cache_steps = N`` runs every block on one step in N and, on the N - 1
steps in between, runs only the shallow blocks and adds the deep blocks' residual (their output minus
their input) remembered from the last full step. :class:`StepCache` is a block hook
(:data:`pixart.model.transformer.BlockHook`): the model's own forward runs, and the cache only decides
which blocks it calls.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from pixart.errors import PixArtError
from pixart.model.transformer import PixArtTransformer

MAX_CACHE_STEPS = 10
"""Beyond one full step in ten the reused residual is too stale to be useful."""


def check_cache_steps(cache_steps: int) -> None:
    """Refuse a cache strength no run could use, naming the value and what is accepted."""
    ok = isinstance(cache_steps, int) and not isinstance(cache_steps, bool)
    if not ok or not 0 <= cache_steps <= MAX_CACHE_STEPS:
        raise PixArtError(
            f"cache steps must be an integer from 0 to {MAX_CACHE_STEPS} (0 or 1: off; N: every block "
            f"runs on one step in N), got {cache_steps!r}"
        )


def runs_every_block(step: int, cache_steps: int) -> bool:
    """Whether step ``step`` (from 0) of a sampling run runs every block, as :class:`StepCache` schedules it."""
    return cache_steps <= 1 or step % cache_steps == 0


def cached_denoiser(model: nn.Module, cache_steps: int) -> Callable[..., torch.Tensor]:
    """The model itself when caching is off (0 or 1), else the model with a fresh :class:`StepCache` for one
    sampling run (called like the model)."""
    if cache_steps <= 1:
        return model
    if not isinstance(model, PixArtTransformer):
        raise PixArtError("step caching needs the PyTorch transformer (not OpenVINO or a compiled model)")
    return partial(model, block_hook=StepCache(len(model.blocks), cache_steps))


class StepCache:
    """A block hook that reuses the deep blocks' residual on N - 1 of every N model calls (one sampling run).

    Make a new one for every run: it counts calls, and the remembered residual belongs to one batch.
    """

    def __init__(self, depth: int, every: int, fresh_blocks: int | None = None):
        """depth: the model's number of blocks; every: run all blocks on calls 0, N, 2N, …; fresh_blocks: how
        many shallow blocks always run (default a quarter of the depth, at least one: they carry the new
        latents and timestep)."""
        self.depth, self.every = depth, every
        self.fresh_blocks = max(1, depth // 4) if fresh_blocks is None else fresh_blocks
        if not 0 <= self.fresh_blocks < depth:
            raise PixArtError(f"fresh blocks must be from 0 to {depth - 1} for this model, got {fresh_blocks!r}")
        self.calls = 0
        self.residual: torch.Tensor | None = None
        self.full = True  # whether the current call runs the deep blocks
        self.deep_in: torch.Tensor | None = None  # the first deep block's input on a full call

    def __call__(self, i: int, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if i < self.fresh_blocks:
            return run(x)
        if i == self.fresh_blocks:
            self.full = self.residual is None or runs_every_block(self.calls, self.every)
            self.deep_in = x
        if self.full:
            x = run(x)
        elif i == self.fresh_blocks:
            x = x + self.residual  # the deep blocks' whole contribution; the later ones pass x through
        if i == self.depth - 1:
            if self.full:
                self.residual = x - self.deep_in
            self.calls += 1
            self.deep_in = None
        return x
