"""Full INT8 quantization of the exported transformer: activations too, calibrated on generated latents.

``pixart export openvino --int8 full`` runs NNCF's post-training quantization (``nncf.quantize``) on the
transformer IR. NNCF places FakeQuantize nodes before the matmuls and convolutions and sets their ranges
from statistics of real inputs, so the calibration data must look like what the transformer sees when it
samples: :func:`calibration_inputs` runs the PyTorch pipeline on a few prompts and records every model
call (latents at every timestep of the schedule, guided batches with their null caption, α's size
micro-conditions). T5 keeps weight-only INT8 (its activations are not the bottleneck: it runs once).

Two settings decide whether the quantized model still follows its prompts (measured on the bundled demo's 200
held-out prompts, docs in the README's "OpenVINO" section): the layers that embed the inputs and read out the
result stay in floating point (:data:`FLOAT_LAYERS`), and SmoothQuant moves activation outliers into the weights
at α = 0.5 (:data:`SMOOTH_QUANT_ALPHA`). With NNCF's defaults alone the demo kept 71-73 % of its two-object scenes
fully correct, against 95.5 % in fp32; with both, 94.8-95.5 %.
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

FLOAT_LAYERS = r"__module\.(x_embedder|t_embedder|t_block|y_embedder|csize_embedder|ar_embedder|final_layer)\."
"""IR node names (``re.match``) of the layers left unquantized: the patch and caption embeddings, the timestep and
size embeddings with the adaLN modulation they feed every block, and the final projection. Little of the work is
theirs (the blocks hold the matmuls over every image token), but quantizing them cost the demo most of its accuracy:
the timestep path alone is not enough (two objects 73-79 % fully correct with only it in floating point)."""

SMOOTH_QUANT_ALPHA = 0.5
"""NNCF's SmoothQuant strength for the matmuls (its default for transformers is 0.95)."""

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
            ignored_scope=nncf.IgnoredScope(patterns=[FLOAT_LAYERS]),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=SMOOTH_QUANT_ALPHA)
            ),
        )


@torch.no_grad()
def calibrated_int8_transformer(ir, pipe, width: int, height: int):
    """The transformer IR quantized to full INT8 on the default calibration prompts run through ``pipe``."""
    samples = calibration_inputs(pipe, CALIBRATION_PROMPTS, steps=CALIBRATION_STEPS, width=width, height=height)
    log.info("calibrating INT8 activations on %d transformer calls", len(samples))
    return quantize_transformer(ir, samples)
