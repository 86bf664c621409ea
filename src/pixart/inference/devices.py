"""Where and at what cost generation runs: the device and dtype to use, memory, and what a call took."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import shutil
import statistics
import sys
from dataclasses import dataclass

import torch

from pixart.errors import PixArtError
from pixart.inference.cpu_units import BF16_FLAGS, CPUINFO, INT8_FLAGS, cpu_units

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    """The fastest device here: a CUDA GPU, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    """The execution device: the one asked for (checked to exist) or the best available."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise PixArtError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PixArtError(f"device {str(device)!r} asked for, but this torch build sees no CUDA GPU; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PixArtError("device 'mps' asked for, but MPS is not available here; use cpu")
    return device


def resolve_dtype(
    name: str | torch.dtype | None, device: torch.device, cpuinfo: str | os.PathLike = CPUINFO
) -> torch.dtype:
    """The dtype to run in: ``name``, or for auto (None) bf16 on a CPU with bf16 units, fp32 on other CPUs and
    fp16 on accelerators.

    On CPU, bf16 runs where the CPU has bf16 units (``cpuinfo`` tells, see :mod:`pixart.inference.cpu_units`):
    there it is about twice as fast as fp32, with images about 50 dB from fp32's (README, "Speed, every mode in
    one table"). Without the units bf16 is emulated, far slower than fp32, so fp32 runs instead, with a warning
    when bf16 was asked for. fp16 on CPU has no fast kernels anywhere: allowed, warned.
    """
    if isinstance(name, torch.dtype):
        dtype = name
    elif name is None or name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_units(cpuinfo).has_bf16() else torch.float32
        dtype = torch.float16
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise PixArtError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype == torch.bfloat16:
        units = cpu_units(cpuinfo)
        if not units.has_bf16():
            log.warning(
                "bf16 asked for, but this CPU (%s) has no bf16 units (%s): running in fp32, which is faster here",
                units.model,
                "/".join(BF16_FLAGS),
            )
            return torch.float32
    elif device.type == "cpu" and dtype != torch.float32:
        log.warning("%s on CPU is very slow (no fast half-precision kernels); fp32 is recommended", dtype)
    return dtype


def resolve_quantize(mode: str | None, device: torch.device, cpuinfo: str | os.PathLike = CPUINFO) -> str | None:
    """The quantization to run: ``mode``, or None with a warning where the CPU lacks int8 units (VNNI, AMX)."""
    if mode is None or device.type != "cpu":
        return mode
    units = cpu_units(cpuinfo)
    if not units.has_int8():
        log.warning(
            "--quantize %s asked for, but this CPU (%s) has no int8 units (%s): running in fp32, which is faster here",
            mode,
            units.model,
            "/".join(INT8_FLAGS),
        )
        return None
    return mode


def check_compiler(device: torch.device) -> None:
    """Refuse torch.compile on a CPU without a C++ compiler, which inductor needs to build its kernels."""
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise PixArtError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop it")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocations on a GPU, else the process's peak RSS (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def release_memory() -> None:
    """Return freed tensors' memory to the system, so the next stage does not stack on the last one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            # glibc keeps freed heap pages for reuse; trimming hands them back so the RSS really drops.
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class RunStats:
    """What the last call cost: for the closing summary of the CLI and the benchmark."""

    seconds: float
    images: int
    steps: int  # model evaluations × images, i.e. denoising steps done in total
    peak_memory_bytes: int  # CUDA: max allocated; CPU: the process's peak resident set
    compile_seconds: float | None = None  # torch.compile: first step's time beyond a normal step's
    full_steps: int | None = None  # step caching: the steps that ran every block (None: caching off)

    def summary(self) -> str:
        rate = self.steps / self.seconds if self.seconds > 0 else float("inf")
        compiled = "" if self.compile_seconds is None else f", torch.compile {self.compile_seconds:.1f} s (included)"
        cached = "" if self.full_steps is None else f", {self.full_steps} of {self.steps} steps ran every block"
        return (
            f"{self.images} image(s) in {self.seconds:.1f} s, {rate:.2f} steps/s{cached}, "
            f"peak memory {self.peak_memory_bytes / 2**30:.2f} GiB{compiled}"
        )


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
