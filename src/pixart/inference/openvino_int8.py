"""Full INT8 quantization of the exported transformer: activations too, calibrated on generated latents.

``pixart export openvino --int8 full`` runs NNCF's post-training quantization (``nncf.quantize``) on the
transformer IR. NNCF places FakeQuantize nodes before the matmuls and convolutions and sets their ranges
from statistics of real inputs, so the calibration data must look like what the transformer sees when it
samples: :func:`calibration_inputs` runs the PyTorch pipeline on a few prompts and records every model
call (latents at every timestep of the schedule, guided batches with their null caption, α's size
micro-conditions). T5 keeps weight-only INT8 (its activations are not the bottleneck: it runs once).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

CALIBRATION_PROMPTS = (
    "a red fox in the snow",
    "a small blue square above a yellow circle",
    "a portrait of an old man, oil painting",
    "a city street at night in the rain",
)
"""Varied captions: the activation ranges come from these runs, so one subject would narrow them."""

CALIBRATION_STEPS = 8
"""Model calls per prompt, spread over the whole schedule: ranges at high noise and near the clean image."""


def calibration_inputs(pipe, prompts: Sequence[str], *, steps: int, width: int, height: int) -> list[list[np.ndarray]]:
    """The transformer's inputs (in the IR's input order) at every model call of ``pipe`` generating ``prompts``.

    ``pipe`` is a PyTorch :class:`pixart.inference.pipeline.PixArtPipeline` holding the weights being exported.
    """
    from pixart.inference.openvino import transformer_inputs

    model = pipe.transformer
    samples: list[list[np.ndarray]] = []

    def record(_module, args, kwargs) -> None:
        x, timestep, y, mask = args[:4]
        micro = kwargs.get("resolution"), kwargs.get("aspect_ratio")
        inputs = transformer_inputs(model.config, x, timestep, y, mask, *micro)
        samples.append([t.numpy() for t in inputs])

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for k, prompt in enumerate(prompts):
            pipe(prompt, seed=k, steps=steps, width=width, height=height, binning=False, show_progress=False)
    finally:
        handle.remove()
    return samples


def quantize_transformer(ir, samples: list[list[np.ndarray]]):
    """The transformer IR with INT8 weights and activations (NNCF post-training quantization on ``samples``)."""
    import nncf

    chatty = log.isEnabledFor(logging.DEBUG)  # NNCF's tables and progress bars go to stdout: only with pixart -v
    nncf.set_log_level(logging.INFO if chatty else logging.ERROR)
    with contextlib.nullcontext() if chatty else contextlib.redirect_stdout(io.StringIO()):
        # TRANSFORMER keeps softmax, layer norms and the residual adds in floating point, where INT8 hurts most.
        return nncf.quantize(
            ir,
            nncf.Dataset(samples),
            subset_size=len(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.MIXED,  # asymmetric activations: GELU and SiLU outputs are one-sided
        )


@torch.no_grad()
def calibrated_int8_transformer(ir, pipe, width: int, height: int):
    """The transformer IR quantized to full INT8 on the default calibration prompts run through ``pipe``."""
    samples = calibration_inputs(pipe, CALIBRATION_PROMPTS, steps=CALIBRATION_STEPS, width=width, height=height)
    log.info("calibrating INT8 activations on %d transformer calls", len(samples))
    return quantize_transformer(ir, samples)
