"""Which matrix units this CPU has: whether bf16 and int8 run fast here, or would be slower than fp32.

On x86 CPUs with ``avx512_bf16`` or AMX (AMD Zen 4, Intel Sapphire Rapids and later) a bf16 matmul runs about
twice as fast as fp32; on those without, PyTorch emulates bf16 and it is over 100× slower. Int8 matmuls (dynamic
quantization) need VNNI (``avx512_vnni``, ``avx_vnni``) or AMX to gain. The flags come from ``/proc/cpuinfo``
(Linux; aarch64 lists ``bf16``, ``i8mm`` and ``asimddp`` as features); elsewhere the units count as missing,
except int8 dot products on Apple silicon, which every M chip has.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
ARM_BF16_FLAGS = ("bf16",)  # aarch64 Linux: FEAT_BF16
ARM_INT8_FLAGS = ("i8mm", "asimddp")  # int8 matrix multiply, int8 dot product


@dataclass(frozen=True)
class CpuUnits:
    """The CPU's model name and the matrix-unit flags it reports, as read from a cpuinfo text."""

    model: str
    flags: frozenset[str]

    def has_bf16(self) -> bool:
        """Whether bf16 matmuls run on hardware here (faster than fp32), not emulated (far slower)."""
        return any(f in self.flags for f in BF16_FLAGS + ARM_BF16_FLAGS)

    def has_int8(self) -> bool:
        """Whether int8 dot-product units are here, so dynamic int8 linears beat fp32 ones."""
        return any(f in self.flags for f in INT8_FLAGS + ARM_INT8_FLAGS)

    def describe(self, torch_capability: str | None = None) -> str:
        """One line for benchmark headers and ``pixart generate -v``: model, units, torch's kernel level."""
        units = [f for f in BF16_FLAGS + INT8_FLAGS + ARM_BF16_FLAGS + ARM_INT8_FLAGS if f in self.flags]
        fast = [name for name, ok in (("bf16", self.has_bf16()), ("int8", self.has_int8())) if ok]
        line = f"{self.model}: {' '.join(units) or 'no bf16/int8 matrix units'}"
        line += f" (fast: {', '.join(fast)})" if fast else " (fp32 only)"
        return line + (f", torch kernels {torch_capability}" if torch_capability else "")


def parse_cpuinfo(text: str) -> CpuUnits:
    """The units a /proc/cpuinfo text lists (its first processor's entry: all cores of one machine match)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the end of the first processor's entry
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or platform.processor()
    flags = fields.get("flags") or fields.get("features") or ""  # x86 says flags, aarch64 features
    return CpuUnits(model or "unknown CPU", frozenset(flags.split()))


def cpu_units(cpuinfo: str | Path = CPUINFO) -> CpuUnits:
    """This machine's CPU units; ``cpuinfo`` is the file to read (tests pass a saved one)."""
    try:
        return parse_cpuinfo(Path(cpuinfo).read_text(errors="replace"))
    except OSError:  # not Linux
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            # Apple silicon has no /proc/cpuinfo; M1 has int8 dot products, bf16 came with M2.
            return CpuUnits(f"Apple {platform.machine()}", frozenset({"asimddp"}))
        return CpuUnits(platform.processor() or platform.machine() or "unknown CPU", frozenset())


def describe_cpu(cpuinfo: str | Path = CPUINFO) -> str:
    """This CPU's one-line description with the kernel level torch dispatches to (AVX2, AVX512, …)."""
    import torch

    return cpu_units(cpuinfo).describe(torch.backends.cpu.get_cpu_capability())
