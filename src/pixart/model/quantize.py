"""Int8 linears for CPU inference: every nn.Linear of the transformer's blocks (and of T5) with int8 weights and
activations quantised on the fly, which runs on the CPU's int8 dot-product units (VNNI, AMX).

Two well-kept implementations do it. PyTorch's own ``quantize_dynamic`` (fbgemm kernels) is the default: on an
AMD Zen 4 with one thread it ran four width-576 MLP blocks in 0.016 s (relative error 8e-3), torchao's
``Int8DynamicActivationInt8WeightConfig`` in 0.034 s (4e-3), bf16 weights in 0.025 s and fp32 in 0.107 s.
PyTorch marks it deprecated in favour of torchao, so ``backend="torchao"`` is there for when it goes.
torchao's weight-only int8 was no faster than fp32 on CPU, so it is not offered.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import TYPE_CHECKING

from pixart.errors import PixArtError

QUANTIZE_MODES = ("int8",)
"""Values of ``--quantize`` / ``LoadSettings.quantize``."""
INT8_BACKENDS = ("torch", "torchao")

if TYPE_CHECKING:  # torch is imported where it is used: the CLI checks --quantize before importing it
    import torch


def check_quantize(mode: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a quantization this device or dtype cannot run, before anything is loaded."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise PixArtError(f"unknown quantization {mode!r}; choose {', '.join(QUANTIZE_MODES)} (or none)")
    if device.type != "cpu":
        raise PixArtError(f"--quantize {mode} runs on the CPU only, not {device.type}; on a GPU use --dtype fp16")
    if dtype_name(dtype) != "fp32":
        raise PixArtError(f"--quantize {mode} keeps activations in fp32; drop --dtype {dtype_name(dtype)}")


def quantize_int8(model: torch.nn.Module, backend: str = "torch") -> torch.nn.Module:
    """``model`` with every nn.Linear int8 (dynamic activations, int8 weights), changed in place."""
    if backend not in INT8_BACKENDS:
        raise PixArtError(f"unknown int8 backend {backend!r}; choose {', '.join(INT8_BACKENDS)}")
    import torch

    model = model.float()  # int8 kernels take fp32 activations
    if backend == "torchao":
        with _quiet_torchao_import():
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch marks eager quantization deprecated in favour of torchao; it still works, and is faster on CPU.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        # In place: a quantised copy would hold both the fp32 and the int8 weights at once.
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def dtype_name(dtype: torch.dtype) -> str:
    """Our short name of a dtype (fp32, bf16, fp16), as --dtype takes it."""
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return short.get(str(dtype).removeprefix("torch."), str(dtype))


@contextlib.contextmanager
def _quiet_torchao_import():
    # torchao's import reports its CUDA-only extensions as failing to load: noise on a CPU machine.
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)
