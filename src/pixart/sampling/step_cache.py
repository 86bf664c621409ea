"""Faster denoising with the same weights: torch.compile, and step caching of the deep blocks.

Step caching follows FORA (Selvaraju et al. 2024, arXiv 2407.01425) and Δ-DiT (Chen et al. 2024,
arXiv 2406.01125): between neighbouring denoising steps the deep blocks change what they add to the
token stream very little, so ``cache_steps = N`` runs every block on one step in N and, on the N - 1
steps in between, runs only the shallow blocks and adds the deep blocks' residual (their output minus
their input) remembered from the last full step. The model's own math is untouched: the wrapper calls
the model's submodules in the order ``PixArtTransformer.forward`` does.
"""

from __future__ import annotations

import shutil
import statistics

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


def cached_denoiser(model: nn.Module, cache_steps: int) -> nn.Module:
    """The model itself when caching is off (0 or 1), else a fresh :class:`StepCache` for one sampling run."""
    if cache_steps <= 1:
        return model
    if not isinstance(model, PixArtTransformer):
        raise PixArtError("step caching needs the PyTorch transformer (not OpenVINO or a compiled model)")
    return StepCache(model, cache_steps)


class StepCache(nn.Module):
    """A PixArt transformer that reuses its deep blocks' residual on N - 1 of every N calls (one sampling run).

    Make a new one for every run: it counts calls, and the remembered residual belongs to one batch.
    """

    def __init__(self, model: PixArtTransformer, every: int, fresh_blocks: int | None = None):
        """every: run all blocks on calls 0, N, 2N, …; fresh_blocks: how many shallow blocks always run
        (default a quarter of the depth, at least one: they carry the new latents and timestep)."""
        super().__init__()
        depth = len(model.blocks)
        self.model, self.every = model, every
        self.fresh_blocks = max(1, depth // 4) if fresh_blocks is None else fresh_blocks
        if not 0 <= self.fresh_blocks < depth:
            raise PixArtError(f"fresh blocks must be from 0 to {depth - 1} for this model, got {fresh_blocks!r}")
        self.calls = 0
        self.residual: torch.Tensor | None = None

    @property
    def config(self):
        return self.model.config

    def forward(self, x, timestep, y, mask=None, resolution=None, aspect_ratio=None) -> torch.Tensor:
        """Same inputs and output as :meth:`PixArtTransformer.forward`."""
        m = self.model
        x, y, mask, t, t0, hw = m.embed(x, timestep, y, mask, resolution, aspect_ratio)
        for block in m.blocks[: self.fresh_blocks]:
            x = block(x, y, t0, mask, hw)
        if self.residual is None or runs_every_block(self.calls, self.every):
            deep_in = x
            for block in m.blocks[self.fresh_blocks :]:
                x = block(x, y, t0, mask, hw)
            self.residual = x - deep_in
        else:
            x = x + self.residual
        self.calls += 1
        return m.head(x, t, hw)


def compile_transformer(model: nn.Module, device: torch.device, cache_steps: int = 0) -> nn.Module:
    """The same module with torch.compile (inductor) applied in place; compiling happens on the first call.

    Without step caching the whole forward is compiled. With it (cache_steps > 1) the cache calls the
    blocks one by one and would bypass a compiled forward, so each block is compiled instead: they hold
    nearly all the work, and blocks of one shape share one compiled graph (PyTorch's "regional compilation").
    """
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise PixArtError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop it")
    if cache_steps > 1:
        for block in model.blocks:
            block.compile()
    else:
        model.compile()  # in place: attributes such as .config and .y_embedder stay reachable
    return model


def runs_every_block(step: int, cache_steps: int) -> bool:
    """Whether step ``step`` (from 0) of a sampling run runs every block, as :class:`StepCache` schedules it."""
    return cache_steps <= 1 or step % cache_steps == 0


def compile_seconds(step_ends: list[float], full: list[bool] | None = None) -> float:
    """Time the first step took beyond a typical later step: how long torch.compile took.

    ``step_ends`` are perf_counter readings: the start of denoising, then the end of each step. ``full``
    marks the steps that ran every block (default: all); the typical step is taken among those, because a
    step-cached step skips the deep blocks that the first step runs.
    """
    durations = [b - a for a, b in zip(step_ends[:-1], step_ends[1:], strict=True)]
    if not durations:
        return 0.0
    full = [True] * len(durations) if full is None else full
    later = [d for d, f in zip(durations[1:], full[1:], strict=True) if f] or durations[1:]
    typical = statistics.median(later) if later else 0.0
    return max(0.0, durations[0] - typical)
