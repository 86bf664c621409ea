"""OpenVINO: export T5, the transformer and the VAE to OpenVINO IR, and generate with them on CPU.

``export_openvino(model, out)`` writes a self-contained folder: ``text_encoder.xml``, ``transformer.xml``,
``vae_decoder.xml`` and ``vae_encoder.xml`` (image-to-image and inpainting start from its posterior) (IR from
``openvino.convert_model`` on traced PyTorch modules), the tokenizer and scheduler folders, and
``pixart_openvino.json`` (model config, latent size, VAE scaling, α's learned null caption).
``load_openvino_pipeline(folder)`` returns a :class:`pixart.inference.pipeline.PixArtPipeline` whose
components run through OpenVINO, so sampling, guidance, decoding and metadata are the PyTorch path's.

One IR serves every image size: the transformer is traced at one latent size, but the trace records the
2-D position embedding and the unpatchify reshapes as operations on the input's shape (torch tensor ops
on traced sizes), and its inputs are declared with dynamic batch, height, width and caption length, so
every aspect-ratio bin runs from one export. ``int8="weights"`` (or True) compresses the weights of T5 and
the transformer to INT8 with NNCF (``nncf.compress_weights``), activations staying fp32; ``int8="full"``
quantizes the transformer's activations too, calibrated on generated latents (:mod:`pixart.inference.openvino_int8`).

At run time ``precision`` chooses OpenVINO's floating-point precision for T5, the transformer and the VAE: f32,
or bf16 on CPUs with bf16 units (``avx512_bf16``, AMX), where it is about twice as fast; ``auto`` picks by CPU.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from pixart.errors import PixArtError
from pixart.files import new_folder
from pixart.inference.cpu_units import BF16_FLAGS, CpuUnits, cpu_units
from pixart.model.config import PixArtConfig
from pixart.model.transformer import text_attention_mask
from pixart.sampling.samplers import read_scheduler_config

log = logging.getLogger(__name__)

MANIFEST = "pixart_openvino.json"
FORMAT_VERSION = 1
INT8_MODES = ("weights", "full")
PRECISIONS = ("f32", "bf16", "auto")


def resolve_precision(precision: str, units: CpuUnits | None = None) -> str:
    """f32 or bf16 for OpenVINO's INFERENCE_PRECISION_HINT: ``auto`` is bf16 only where the CPU has bf16 units
    (``units``: this machine's by default); elsewhere bf16 is emulated and far slower than f32."""
    if precision not in PRECISIONS:
        raise PixArtError(f"unknown OpenVINO precision {precision!r}; choose {', '.join(PRECISIONS)}")
    has_units = (cpu_units() if units is None else units).has_bf16()
    if precision == "bf16" and not has_units:
        log.warning("this CPU has no bf16 units (%s): running OpenVINO in f32", " or ".join(BF16_FLAGS))
        return "f32"
    if precision == "auto":
        return "bf16" if has_units else "f32"
    return precision


def _require_openvino():
    try:
        import openvino
    except ImportError:
        raise PixArtError('OpenVINO is not installed: pip install -e ".[openvino]"') from None
    return openvino


@functools.cache
def shared_core():
    """The process's one ``openvino.Core``, kept for its lifetime.

    OpenVINO's CPU plugin (2026.4) installs a signal stack of its own on the thread that creates it and puts back the
    one it found when it is destroyed. With a Core per pipeline, two pipelines freed in the order they were made
    leave the thread on the first plugin's freed stack, and the next signal with a Python handler (torch's
    DataLoader SIGCHLD handler, pixart serve's SIGTERM) kills the process with SIGSEGV. One Core, one plugin,
    never destroyed before exit, is what OpenVINO's own samples do anyway.
    """
    return _require_openvino().Core()


class _T5Features(nn.Module):
    """T5 encoder → last hidden state, the one output PixArt reads."""

    def __init__(self, t5: nn.Module):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.t5(input_ids=input_ids, attention_mask=attention_mask)[0]


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    """VAE encoder → the posterior's parameters (mean and log-variance stacked on channels), as diffusers keeps them."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent_dist.parameters


def export_openvino(
    model: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    transformer: str | os.PathLike | None = None,
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
    width: int | None = None,
    height: int | None = None,
    int8: bool | str = False,
    max_tokens: int | None = None,
    force: bool = False,
) -> Path:
    """Convert a pipeline (folder or hub id) to an OpenVINO folder.

    ``model`` None: the pipeline folder ``transformer`` is (or is the ``transformer/`` subfolder of), else
    the bundled demo. ``transformer`` swaps in other weights; ``loras`` ((path, scale) pairs) are merged into
    it before the trace, as :meth:`pixart.inference.pipeline.PixArtPipeline.from_pretrained` merges them.

    width/height: the image size the networks are traced at (default: the model's training size); the
    exported transformer and VAE take any size (multiples of 8 × patch size pixels).
    int8: False, "weights" (True) or "full" (see the module's docstring).
    """
    int8 = "weights" if int8 is True else int8
    if int8 not in (False, None, *INT8_MODES):
        raise PixArtError(f"unknown INT8 mode {int8!r}; choose {', '.join(INT8_MODES)}")
    ov = _require_openvino()
    from diffusers import AutoencoderKL

    from pixart.checkpoints.convert import load_transformer
    from pixart.checkpoints.export import _check_out
    from pixart.checkpoints.lora import load_lora
    from pixart.inference.pipeline import learned_null_caption, resolve_model
    from pixart.model.text import DEFAULT_MAX_TOKENS, TextEncoder

    out = Path(out)
    _check_out(out, force)
    if model is None and transformer is not None:
        model = _own_pipeline(Path(transformer))
    root = resolve_model(model, need_transformer=transformer is None)
    net = load_transformer(transformer if transformer is not None else root, device="cpu", dtype=torch.float32)
    for path, scale in loras:
        net = load_lora(net, path, scale, merge=True)
    config = net.config
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32).eval()
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = config.sample_size * vae_factor
    width, height = width or side, height or side
    multiple = vae_factor * config.patch_size
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise PixArtError(f"export size {width}x{height} must be positive multiples of {multiple} pixels")
    tokens = max_tokens or DEFAULT_MAX_TOKENS[config.family]
    encoder = TextEncoder.from_pretrained(root, device="cpu", dtype=torch.float32)
    if encoder.width != config.caption_channels:
        raise PixArtError(
            f"the text encoder gives {encoder.width}-d features but the transformer reads {config.caption_channels}"
        )
    null = learned_null_caption(net)

    with new_folder(out, f"the OpenVINO export {out.name}") as tmp:
        lat = (1, config.in_channels, height // vae_factor, width // vae_factor)
        ids = torch.ones(2, tokens, dtype=torch.long)
        text_mask = torch.ones(2, tokens, dtype=torch.long)
        with torch.no_grad():
            t5_ir = ov.convert_model(_T5Features(encoder.model), example_input=(ids, text_mask))
            example = [
                torch.randn(2, *lat[1:]),
                torch.tensor([500.0, 500.0]),
                torch.randn(2, tokens, config.caption_channels),
                text_mask,
            ]
            if config.micro_conditions:
                example += [torch.tensor([[float(height), float(width)]] * 2), torch.tensor([height / width] * 2)]
            # -1: dynamic. Batch, latent height and width, caption length; the channel counts are fixed.
            shapes = [[-1, config.in_channels, -1, -1], [-1], [-1, -1, config.caption_channels], [-1, -1]]
            if config.micro_conditions:
                shapes += [[-1, 2], [-1]]
            # The model's own forward, traced: under tracing it attends the whole padded caption (see
            # text_attention_mask), so the IR takes any caption length.
            denoiser_ir = ov.convert_model(net.eval(), example_input=tuple(example), input=shapes)
            vae_ir = ov.convert_model(
                _VaeDecoder(vae), example_input=(torch.randn(lat),), input=[[-1, config.in_channels, -1, -1]]
            )
            # The encoder's input is pixels in [-1, 1]; fp32 like the decoder (image-to-image matches PyTorch).
            encoder_ir = ov.convert_model(
                _VaeEncoder(vae), example_input=(torch.rand(1, 3, height, width) * 2 - 1,), input=[[-1, 3, -1, -1]]
            )
        if int8:
            import nncf

            # NNCF reports each model on stdout (a statistics table through its logger, a rich progress bar)
            # and has no switch to set before importing it: show that only when pixart logs debug (pixart -v).
            chatty = log.isEnabledFor(logging.DEBUG)
            nncf.set_log_level(logging.INFO if chatty else logging.ERROR)
            with contextlib.nullcontext() if chatty else contextlib.redirect_stdout(io.StringIO()):
                # Weights only: activations stay fp32, so accuracy drops little and no calibration data is needed.
                t5_ir = nncf.compress_weights(t5_ir, mode=nncf.CompressWeightsMode.INT8_ASYM)
                if int8 == "weights":
                    denoiser_ir = nncf.compress_weights(denoiser_ir, mode=nncf.CompressWeightsMode.INT8_ASYM)
        if int8 == "full":
            from pixart.inference.openvino_int8 import calibrated_int8_transformer
            from pixart.inference.pipeline import PixArtPipeline

            scheduler_config = read_scheduler_config(root)
            pipe = PixArtPipeline(encoder, net, vae, scheduler_config, device=torch.device("cpu"), dtype=torch.float32)
            denoiser_ir = calibrated_int8_transformer(denoiser_ir, pipe, width, height)
        _save_ir(ov, t5_ir, tmp / "text_encoder.xml")
        _save_ir(ov, denoiser_ir, tmp / "transformer.xml")
        _save_ir(ov, vae_ir, tmp / "vae_decoder.xml")
        _save_ir(ov, encoder_ir, tmp / "vae_encoder.xml")
        shutil.copytree(root / "tokenizer", tmp / "tokenizer")
        if (root / "scheduler").is_dir():
            shutil.copytree(root / "scheduler", tmp / "scheduler")
        manifest = {
            "format": "pixart-openvino",
            "version": FORMAT_VERSION,
            "config": config.to_dict(),
            "height": height,
            "width": width,
            "max_tokens": tokens,
            "vae_block_out_channels": list(vae.config.block_out_channels),
            "vae_scaling_factor": float(vae.config.scaling_factor),
            "int8": bool(int8),
            "int8_mode": int8 or "",
            "source": {
                "model": str(model or ""),
                "transformer": str(transformer or ""),
                "loras": [[str(path), float(scale)] for path, scale in loras],
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if null is not None:
            np.save(tmp / "null_caption.npy", null.float().cpu().numpy())
    return out


def _save_ir(ov, ir, path: Path) -> None:
    """``ov.save_model`` keeping the weights fp32, with the OS error behind a failed write attached as its cause.

    OpenVINO's C++ streams report a failed write only as "iostream error", so a full disk would not be told
    from a bug. The write is retried from Python at the end of the files it made: out of space (disk, quota
    or file size limit), that fails again at once with the reason; otherwise the original error stands.
    """
    # compress_to_fp16 would halve the files but round every weight: keep fp32 for parity with PyTorch.
    try:
        ov.save_model(ir, path, compress_to_fp16=False)
    except RuntimeError as err:
        for part in (path.with_suffix(".bin"), path):
            try:
                with open(part, "ab") as file:
                    file.write(bytes(2**20))  # past a partly filled last block
                    file.flush()
                    os.fsync(file.fileno())
            except OSError as reason:
                raise err from reason
        raise


def _own_pipeline(transformer: Path) -> Path | None:
    """The diffusers pipeline folder a transformer path is, or is the transformer/ subfolder of; else None."""
    for folder in (transformer, transformer.parent):
        if transformer.is_dir() and (folder / "model_index.json").is_file() and (folder / "vae").is_dir():
            return folder
    return None


def read_manifest(folder: Path) -> dict:
    """The export's manifest, checked to be one this version reads."""
    path = folder / MANIFEST
    if not path.is_file():
        raise PixArtError(
            f"{folder} is not an OpenVINO export (no {MANIFEST}); write one with `pixart export openvino`"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise PixArtError(f"{path} is not readable JSON") from None
    if manifest.get("format") != "pixart-openvino" or manifest.get("version") != FORMAT_VERSION:
        raise PixArtError(f"{path} is not a pixart OpenVINO export of version {FORMAT_VERSION}")
    return manifest


def check_vae_encoder(folder: str | os.PathLike) -> None:
    """Refuse image inputs for an export without the VAE encoder (written before image-to-image was supported)."""
    read_manifest(Path(folder))  # not an export at all: say that instead
    if not (Path(folder) / "vae_encoder.xml").is_file():
        raise PixArtError(
            f"the OpenVINO export {folder} has no VAE encoder (it predates image inputs); "
            "re-export it with `pixart export openvino` to use --image/--mask"
        )


class _OVModule(nn.Module):
    """A compiled OpenVINO model called like a PyTorch module (torch tensors in, torch tensor out)."""

    def __init__(self, core, path: Path, threads: int | None, precision: str = "f32"):
        super().__init__()
        # Pinned: on CPUs with bf16 units OpenVINO would otherwise choose bf16 by itself.
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(path), "CPU", config)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        result = self.compiled([t.detach().cpu().numpy() for t in inputs])
        return torch.from_numpy(np.array(result[0]))


class OVTextEncoderModel(_OVModule):
    def forward(self, input_ids, attention_mask):
        return (self.run(input_ids, attention_mask),)


class OVTransformer(_OVModule):
    """The exported transformer, called like :meth:`pixart.model.transformer.PixArtTransformer.forward`."""

    def __init__(self, core, path: Path, threads: int | None, config: PixArtConfig, null, precision: str = "f32"):
        super().__init__(core, path, threads, precision)
        from pixart.checkpoints.convert import placeholder_y_embedding

        self.config = config
        # Read by learned_null_caption, which recognises the placeholder as "no learned null caption".
        self.y_embedder = SimpleNamespace(y_embedding=placeholder_y_embedding(config) if null is None else null)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, x, timestep, y, mask=None, resolution=None, aspect_ratio=None):
        if mask is not None:
            # The traced IR attends the whole padded caption through the mask (Σ: 300 tokens where a prompt uses a
            # few dozen), running the caption projection and cross-attention's keys and values on every padding
            # token each step. Cut the padding no caption uses first, as the PyTorch model does.
            y = text_attention_mask(y, mask)[0]
            mask = mask[..., : y.shape[1]]
        return self.run(*transformer_inputs(self.config, x, timestep, y, mask, resolution, aspect_ratio))


def transformer_inputs(config: PixArtConfig, x, timestep, y, mask, resolution, aspect_ratio) -> list[torch.Tensor]:
    """The exported transformer's inputs, in order, from the arguments of the PyTorch model's forward."""
    b = x.shape[0]
    timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(b)
    mask = torch.ones(y.shape[:2], dtype=torch.long) if mask is None else mask
    inputs = [x.float(), timestep, y.float(), mask.long()]
    if config.micro_conditions:
        inputs += [resolution.float().reshape(-1, 2).expand(b, 2), aspect_ratio.float().reshape(-1).expand(b)]
    return inputs


class OVVae(_OVModule):
    """The exported VAE, called like diffusers' AutoencoderKL: ``decode``, and ``encode`` if the export has one."""

    def __init__(self, core, folder: Path, threads: int | None, manifest: dict, precision: str = "f32"):
        super().__init__(core, folder / "vae_decoder.xml", threads, precision)
        encoder = folder / "vae_encoder.xml"
        self.encoder = _OVModule(core, encoder, threads, precision) if encoder.is_file() else None
        self.folder = folder
        self.config = SimpleNamespace(
            block_out_channels=manifest["vae_block_out_channels"],
            scaling_factor=manifest["vae_scaling_factor"],
        )
        self.dtype = torch.float32

    def decode(self, latents: torch.Tensor, return_dict: bool = False):
        return (self.run(latents.float()),)

    def encode(self, pixels: torch.Tensor, return_dict: bool = True):
        if self.encoder is None:
            check_vae_encoder(self.folder)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # diffusers' own posterior over the exported parameters: mean, std and sampling exactly as PyTorch's.
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(self.encoder.run(pixels.float())))


def load_openvino_pipeline(folder: str | os.PathLike, *, threads: int | None = None, precision: str = "f32"):
    """A :class:`pixart.inference.pipeline.PixArtPipeline` running T5, the transformer and the VAE through OpenVINO.

    precision: f32, bf16 or auto (:func:`resolve_precision`) for T5, the transformer and the VAE (as PyTorch's
    bf16 runs all three: the bf16 decoder halves its time and costs the image 0.2-0.3 dB on the mid-size pipeline).
    """
    precision = resolve_precision(precision)
    from transformers import AutoTokenizer

    from pixart.inference.pipeline import PixArtPipeline
    from pixart.model.text import TextEncoder

    folder = Path(folder)
    manifest = read_manifest(folder)
    config = PixArtConfig.from_dict(manifest["config"])
    null_path = folder / "null_caption.npy"
    null = torch.from_numpy(np.load(null_path)) if null_path.is_file() else None
    core = shared_core()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    t5 = OVTextEncoderModel(core, folder / "text_encoder.xml", threads, precision)
    encoder = TextEncoder(tokenizer, t5, device="cpu")
    transformer = OVTransformer(core, folder / "transformer.xml", threads, config, null, precision)
    vae = OVVae(core, folder, threads, manifest, precision)
    scheduler_config = read_scheduler_config(folder)
    names = {"model": str(folder), "transformer": ""}
    # Loaders, not objects: the pipeline treats callables as loaders, and these modules are callable.
    return PixArtPipeline(
        lambda: encoder,
        lambda: transformer,
        lambda: vae,
        scheduler_config,
        device=torch.device("cpu"),
        dtype=torch.float32,
        names=names,
    )
