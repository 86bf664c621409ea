"""Step caching: faster denoising with the same weights by reusing the deep blocks' work between steps.

Step caching follows FORA (Selvaraju et al. 2024, arXiv 2407.01425) and Δ-DiT (Chen et al. 2024,
arXiv 2406.01125): between neighbouring denoising steps the deep blocks change what they add to the
token stream very little, so ``cache_steps = N`` runs every block on one step in N and, on the N - 1
steps in between, runs only the shallow blocks and adds the deep blocks' residual (their output minus
their input) remembered from the last full step. :class:`StepCache` is a block hook
(:data:`pixart.model.transformer.BlockHook`): the model's own forward runs, and the cache only decides
which blocks it calls.

``cache_threshold = T`` decides per step instead, as First-Block-Cache (ParaAttention; diffusers'
``FirstBlockCacheConfig``) does after TeaCache (Liu et al. 2024, arXiv 2411.19108): the first block always
runs, and when its residual differs from the one of the last full step by less than T (mean absolute
difference over mean absolute value, the whole batch together, so a guided pass decides once for both
halves) the deep blocks' residual is reused. Early steps, where the latents change fast, run in full; the
flat middle of the schedule is skipped.
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

MAX_CACHE_THRESHOLD = 1.0
"""A first-block change of 100 % is a different image: beyond it every step after the first would be reused."""


def check_cache_steps(cache_steps: int) -> None:
    """Refuse a cache strength no run could use, naming the value and what is accepted."""
    ok = isinstance(cache_steps, int) and not isinstance(cache_steps, bool)
    if not ok or not 0 <= cache_steps <= MAX_CACHE_STEPS:
        raise PixArtError(
            f"cache steps must be an integer from 0 to {MAX_CACHE_STEPS} (0 or 1: off; N: every block "
            f"runs on one step in N), got {cache_steps!r}"
        )


def check_cache_threshold(cache_threshold: float, cache_steps: int = 0) -> None:
    """Refuse a threshold that is not a number from 0 to MAX_CACHE_THRESHOLD, or one given beside cache steps."""
    ok = isinstance(cache_threshold, (int, float)) and not isinstance(cache_threshold, bool)
    if not ok or not 0 <= cache_threshold <= MAX_CACHE_THRESHOLD:  # NaN fails both comparisons
        raise PixArtError(
            f"cache threshold must be a number from 0 to {MAX_CACHE_THRESHOLD} (0: off; T: reuse the deep blocks "
            f"while the first block's output changed by less than T), got {cache_threshold!r}"
        )
    if cache_threshold > 0 and cache_steps > 1:
        raise PixArtError(
            f"choose one of cache steps ({cache_steps}) and cache threshold ({cache_threshold:g}): "
            "a fixed schedule or an adaptive one"
        )


def runs_every_block(step: int, cache_steps: int) -> bool:
    """Whether step ``step`` (from 0) of a sampling run runs every block, as :class:`StepCache` schedules it."""
    return cache_steps <= 1 or step % cache_steps == 0


def cached_denoiser(
    model: nn.Module, cache_steps: int, cache_threshold: float = 0.0, decisions: list[bool] | None = None
) -> Callable[..., torch.Tensor]:
    """The model itself when caching is off (cache steps 0 or 1, threshold 0), else the model with a fresh
    :class:`StepCache` for one sampling run (called like the model). ``decisions`` collects, call by call,
    whether the call ran every block."""
    if cache_steps <= 1 and not cache_threshold:
        return model
    if not isinstance(model, PixArtTransformer):
        raise PixArtError("step caching needs the PyTorch transformer (not OpenVINO or a compiled model)")
    cache = StepCache(len(model.blocks), max(cache_steps, 1), threshold=cache_threshold, decisions=decisions)
    return partial(model, block_hook=cache)


class StepCache:
    """A block hook that reuses the deep blocks' residual between full model calls (one sampling run).

    With ``every = N`` the calls 0, N, 2N, … run every block; with ``threshold = T`` a call runs every block when
    the first block's residual moved by T or more (relative L1) since the last full call. Make a new one for every
    run: it counts calls, and the remembered residuals belong to one batch.
    """

    def __init__(
        self,
        depth: int,
        every: int = 1,
        fresh_blocks: int | None = None,
        *,
        threshold: float = 0.0,
        decisions: list[bool] | None = None,
    ):
        """depth: the model's number of blocks; every: run all blocks on calls 0, N, 2N, …; fresh_blocks: how
        many shallow blocks always run (default a quarter of the depth, at least one: they carry the new
        latents and timestep); threshold: decide from the first block's change instead (0: off); decisions:
        a list to append each call's choice to (True: every block ran)."""
        self.depth, self.every, self.threshold = depth, every, threshold
        self.fresh_blocks = max(1, depth // 4) if fresh_blocks is None else fresh_blocks
        if not 0 <= self.fresh_blocks < depth:
            raise PixArtError(f"fresh blocks must be from 0 to {depth - 1} for this model, got {fresh_blocks!r}")
        if threshold and not self.fresh_blocks:
            raise PixArtError("a cache threshold needs at least one fresh block to measure the change by")
        self.calls = 0
        self.residual: torch.Tensor | None = None
        self.full = True  # whether the current call runs the deep blocks
        self.deep_in: torch.Tensor | None = None  # the first deep block's input on a full call
        self.first: torch.Tensor | None = None  # the first block's residual on this call
        self.reference: torch.Tensor | None = None  # … and on the last full call, which the change is measured from
        self.change = float("inf")  # relative L1 change of the first block's residual on this call
        self.decisions = [] if decisions is None else decisions

    def __call__(self, i: int, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if i < self.fresh_blocks:
            out = run(x)
            if i == 0 and self.threshold:
                self.first = out - x
                self.change = relative_change(self.first, self.reference)
            return out
        if i == self.fresh_blocks:
            self.full = self.runs_deep_blocks()
            self.decisions.append(self.full)
            self.deep_in = x
        if self.full:
            x = run(x)
        elif i == self.fresh_blocks:
            x = x + self.residual  # the deep blocks' whole contribution; the later ones pass x through
        if i == self.depth - 1:
            if self.full:
                self.residual = x - self.deep_in
            self.calls += 1
            self.deep_in = self.first = None
        return x

    def runs_deep_blocks(self) -> bool:
        """Whether this call runs the deep blocks: the first call always, then by schedule or by change."""
        if self.residual is None:
            full = True
        elif self.threshold:
            full = self.change >= self.threshold
        else:
            full = runs_every_block(self.calls, self.every)
        if full and self.threshold:
            # Measured from the last full call, not the previous call: slow drift adds up until it counts.
            self.reference = self.first
        return full


def relative_change(now: torch.Tensor, before: torch.Tensor | None) -> float:
    """mean |now − before| / mean |before| over the whole batch (infinite without a before)."""
    if before is None:
        return float("inf")
    return ((now - before).abs().mean() / before.abs().mean()).item()
