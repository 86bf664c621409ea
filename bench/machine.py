"""What a benchmark ran on, printed above its table: CPU model, its matrix units, torch and its threads.

Shared by the bench scripts, which are run as files (``python bench/x.py``), so they import it as a sibling.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from pixart.inference.cpu_units import describe_cpu


def header(what: str) -> str:
    """One line naming the benchmark, the CPU and its units, torch and its thread count."""
    return f"{what} | {describe_cpu()} | torch {torch.__version__}, {torch.get_num_threads()} threads"


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS, so one part's peak can be read; False where unsupported.

    Linux resets a process's high-water mark (VmHWM) when "5" is written to its clear_refs; ru_maxrss cannot be reset.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_gb() -> float:
    """Peak resident memory in GiB since the last :func:`reset_peak_rss` (else since the process started)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, bytes on macOS: Linux only


def rss_gb() -> float:
    """Resident memory now, in GiB."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else ():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")
