"""Text-to-image generation: ``PixArtPipeline`` loads a model once and turns prompts into PIL images.

The one entry point for notebooks, the CLI and the web UI::

    pipe = PixArtPipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    images = pipe("a red fox in the snow", GenerationOptions(seed=1, width=1024, height=768))

Components: T5 (:class:`pixart.model.text.TextEncoder`), our transformer
(:func:`pixart.checkpoints.convert.load_transformer`), diffusers' AutoencoderKL and schedulers
(:mod:`pixart.sampling.samplers`). Each image carries its settings as
PNG text metadata (``image.info``) from which :meth:`GenerationOptions.from_metadata` rebuilds the run: prompt,
options and the :class:`LoadSettings` (model, transformer, LoRAs, step caching) that made it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pixart import __version__
from pixart.errors import PixArtError
from pixart.files import file_mode
from pixart.model.resolution import check_size, generation_size, resize_and_crop
from pixart.model.text import DEFAULT_MAX_TOKENS, TextEncoder, check_quantization
from pixart.sampling.samplers import Conditioning, default_sampler, denoise, get_sampler, make_scheduler
from pixart.sampling.step_cache import cached_denoiser, check_cache_steps, runs_every_block

log = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).parent.parent / "assets" / "demo"
"""The small bundled model used when no model is named (a diffusers pipeline folder)."""

HUB_MODELS = (
    "PixArt-alpha/PixArt-XL-2-1024-MS",
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
    "PixArt-alpha/PixArt-LCM-XL-2-1024-MS",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SEED = 2**63 - 1


@dataclass
class GenerationOptions:
    """How to generate: everything but the prompt and the model. Shared by the CLI and the web UI.

    Fields left None take the sampler's or the model's defaults when the pipeline resolves them.
    """

    negative_prompt: str | None = None
    """What to steer away from. None: the model's null caption (α's learned one, else T5 of "")."""
    num_images: int = 1
    """Images per prompt; image k of a run uses seed + k."""
    seed: int | None = None
    """Seed of the first image; None picks one at random (it is recorded in the metadata)."""
    sampler: str | None = None
    """A name from :data:`pixart.sampling.samplers.SAMPLERS`; None: the model's default (dpm++, lcm for LCM models)."""
    steps: int | None = None
    guidance: float | None = None
    """Classifier-free guidance scale; ≤ 1 turns guidance off (one model pass per step)."""
    width: int | None = None
    """Output size in pixels; None: the model's training size (sample_size × 8)."""
    height: int | None = None
    binning: bool = True
    """Sample at the nearest trained aspect-ratio bin, then resize and centre-crop to width × height."""
    max_tokens: int | None = None
    """T5 tokens per caption; None: the family's (α 120, Σ 300)."""
    clean: bool = True
    """DeepFloyd-IF caption cleaning (needs the ``clean`` extra); lower-casing happens regardless."""
    batch_size: int = 1
    """Images denoised together; larger is faster on a GPU and needs more memory."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values no model could use, naming the value and what is accepted."""

        def positive_int(name: str, value, optional: bool = True) -> None:
            if value is None and optional:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PixArtError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")

        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise PixArtError(f"negative prompt must be text, got {self.negative_prompt!r}")
        positive_int("num_images", self.num_images, optional=False)
        positive_int("batch_size", self.batch_size, optional=False)
        positive_int("steps", self.steps)
        positive_int("max_tokens", self.max_tokens)
        if self.width is not None or self.height is not None:
            # The model-independent part of the size rule; the pipeline checks the rest (patch grid, bins).
            check_size(self.width or 8, self.height or 8, multiple=8, binned=True)
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise PixArtError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.sampler is not None:
            get_sampler(self.sampler)
        if self.guidance is not None:
            ok = isinstance(self.guidance, (int, float)) and not isinstance(self.guidance, bool)
            if not ok or not math.isfinite(self.guidance) or self.guidance < 0:
                raise PixArtError(f"guidance must be a finite number ≥ 0 (≤ 1 turns it off), got {self.guidance!r}")

    def replace(self, **changes) -> GenerationOptions:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def from_metadata(info: dict[str, str]) -> tuple[str, GenerationOptions, LoadSettings]:
        """The prompt, options and weights that reproduce an image, from its PNG text metadata (``image.info``)."""
        if "prompt" not in info or "seed" not in info:
            raise PixArtError("the image has no pixart generation metadata (prompt, seed, …)")
        try:
            options = GenerationOptions(
                negative_prompt=info.get("negative_prompt"),
                seed=int(info["seed"]),
                sampler=info["sampler"],
                steps=int(info["steps"]),
                guidance=float(info["guidance"]),
                width=int(info["width"]),
                height=int(info["height"]),
                binning=info.get("binning", "true") == "true",
                max_tokens=int(info["max_tokens"]),
                clean=info.get("clean", "true") == "true",
            )
        except (KeyError, ValueError) as err:
            raise PixArtError(f"the image's generation metadata is incomplete or malformed: {err}") from None
        return info["prompt"], options, LoadSettings.from_metadata(info)


TRANSFORMER_OPTIONS = ("num_heads", "pe_scale", "kv_compress", "ema")
"""The load_transformer keywords a LoadSettings may carry."""


@dataclass(frozen=True)
class LoadSettings:
    """Which weights make an image: what its PNG records and :meth:`PixArtPipeline.from_pretrained` loads.

    The device and dtype are not among them: they follow the machine that reproduces the image.
    """

    model: str | None = None
    """Pipeline folder or hub id; None: the bundled demo model."""
    transformer: str | None = None
    """Other transformer weights (any form :func:`pixart.checkpoints.convert.load_transformer` reads)."""
    loras: tuple[tuple[str, float], ...] = ()
    """LoRAs merged into the transformer, as (path, scale), in order."""
    cache_steps: int = 0
    """Step caching (:mod:`pixart.sampling.step_cache`): it approximates the deep blocks, so it changes the image."""
    transformer_options: tuple[tuple[str, Any], ...] = ()
    """load_transformer keywords for what an official checkpoint cannot tell (num_heads, pe_scale, kv_compress,
    ema), as sorted (name, value) pairs."""

    def replace(self, **changes) -> LoadSettings:
        return dataclasses.replace(self, **changes)

    def metadata(self) -> dict[str, str]:
        """The PNG text fields that record these settings; :meth:`from_metadata` reads them back."""
        fields = {"model": self.model or "", "transformer": self.transformer or ""}
        if self.loras:
            fields["loras"] = json.dumps([[str(path), float(scale)] for path, scale in self.loras])
        if self.cache_steps > 1:
            fields["cache_steps"] = str(self.cache_steps)
        if self.transformer_options:
            fields["transformer_options"] = json.dumps(dict(self.transformer_options))
        return fields

    @staticmethod
    def from_metadata(info: dict[str, str]) -> LoadSettings:
        """The settings a PNG's text metadata records; empty or missing fields mean the defaults."""
        try:
            loras = json.loads(info.get("loras", "[]"))
            if not isinstance(loras, list) or not all(_is_lora_entry(entry) for entry in loras):
                raise ValueError
        except ValueError:
            raise PixArtError(
                f"the image's loras metadata {info['loras']!r} is malformed; expected a JSON list of [path, scale]"
            ) from None
        try:
            cache_steps = int(info.get("cache_steps", 0))
        except ValueError:
            bad = info["cache_steps"]
            raise PixArtError(f"the image's cache_steps metadata {bad!r} is not a whole number") from None
        try:
            options = json.loads(info.get("transformer_options", "{}"))
            if not isinstance(options, dict) or not set(options) <= set(TRANSFORMER_OPTIONS):
                raise ValueError
        except ValueError:
            raise PixArtError(
                f"the image's transformer_options metadata {info['transformer_options']!r} is malformed; expected "
                f"a JSON object of {', '.join(TRANSFORMER_OPTIONS)}"
            ) from None
        return LoadSettings(
            model=info.get("model") or None,
            transformer=info.get("transformer") or None,
            loras=tuple((path, float(scale)) for path, scale in loras),
            cache_steps=cache_steps,
            transformer_options=tuple(sorted(options.items())),
        )


def _is_lora_entry(entry: object) -> bool:
    """Whether a parsed ``loras`` entry is [path, scale]."""
    if not isinstance(entry, list) or len(entry) != 2:
        return False
    path, scale = entry
    return isinstance(path, str) and isinstance(scale, (int, float)) and not isinstance(scale, bool)


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text fields of an image file (a generated PNG's settings), or a one-line PixArtError naming the file."""
    from PIL import UnidentifiedImageError

    try:
        # Opening reads the header and the text chunks before the pixels; the pixels are never decoded.
        with Image.open(path) as image:
            return {k: v for k, v in image.info.items() if isinstance(v, str)}
    except FileNotFoundError:
        raise PixArtError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        # ValueError: PIL refuses a text chunk that decompresses beyond its limit (a zip bomb)
        raise PixArtError(f"cannot read {path} as an image: {err}") from None


@dataclass(frozen=True)
class RunStats:
    """What the last call cost: for the closing summary of the CLI and the benchmark."""

    seconds: float
    images: int
    steps: int  # model evaluations × images, i.e. denoising steps done in total
    peak_memory_bytes: int  # CUDA: max allocated; CPU: the process's peak resident set
    compile_seconds: float | None = None  # torch.compile: first step's time beyond a normal step's

    def summary(self) -> str:
        rate = self.steps / self.seconds if self.seconds > 0 else float("inf")
        compiled = "" if self.compile_seconds is None else f", torch.compile {self.compile_seconds:.1f} s (included)"
        return (
            f"{self.images} image(s) in {self.seconds:.1f} s, {rate:.2f} steps/s, "
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


def default_device() -> torch.device:
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


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU, fp16 on accelerators unless asked otherwise; half precision on CPU is allowed but warned."""
    if isinstance(name, torch.dtype):
        dtype = name
    elif name is None or name == "auto":
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise PixArtError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype != torch.float32:
        log.warning("%s on CPU is very slow (no fast half-precision kernels); fp32 is recommended", dtype)
    return dtype


def resolve_model(model: str | os.PathLike | None, need_transformer: bool = True) -> Path:
    """A local pipeline folder for a folder path or hub id (fetching only the needed subfolders)."""
    if model is None:
        if (DEMO_MODEL / "model_index.json").is_file():
            return DEMO_MODEL
        raise PixArtError(
            f"no model given and the bundled demo model is not installed ({DEMO_MODEL}); "
            f"pass --model with a pipeline folder or a hub id such as {HUB_MODELS[1]}"
        )
    from pixart.checkpoints.hub import resolve_pipeline

    folders = ["tokenizer", "text_encoder", "vae", "scheduler"] + (["transformer"] if need_transformer else [])
    # Releases ship the same weights in several formats; safetensors in full precision is enough.
    ignore = ["*.bin", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx*", "*fp16*"]
    return resolve_pipeline(model, ["model_index.json"] + [f"{f}/*" for f in folders], ignore)


def learned_null_caption(model: torch.nn.Module) -> torch.Tensor | None:
    """α's learned null caption if the checkpoint carried one, else None (use T5 of "" instead).

    Official α checkpoints store ``y_embedding``; diffusers folders do not, and
    :func:`pixart.checkpoints.convert.load_transformer` then fills the buffer with fixed seeded noise, recognised here.
    """
    if model.config.family != "alpha":
        return None
    from pixart.checkpoints.convert import placeholder_y_embedding

    y = model.y_embedder.y_embedding
    if torch.equal(y.detach().float().cpu(), placeholder_y_embedding(model.config)):
        return None
    return y.detach()


class PixArtPipeline:
    """A loaded PixArt model (T5, transformer, VAE, scheduler config), called with prompts to make images."""

    def __init__(
        self,
        text_encoder: Callable[[], TextEncoder] | TextEncoder,
        transformer: Callable[[], torch.nn.Module] | torch.nn.Module,
        vae: Callable[[], torch.nn.Module] | torch.nn.Module,
        scheduler_config: dict,
        *,
        device: torch.device,
        dtype: torch.dtype,
        low_memory: bool = False,
        offload: bool = False,
        names: dict[str, str] | None = None,
        compiled: bool = False,
        cache_steps: int = 0,
        loras: tuple[tuple[str, float], ...] = (),
        transformer_options: tuple[tuple[str, Any], ...] = (),
    ):
        """Components are either loaded objects or zero-argument loaders. low_memory: load each part
        when its stage starts and release it when the stage ends; offload: keep parts on the CPU and
        move each to the device only for its stage. compiled: the transformer went through
        torch.compile (its first step is timed as compile time); cache_steps: see :mod:`pixart.sampling.step_cache`;
        loras: the (path, scale) merged into the transformer, and transformer_options: the load_transformer
        keywords it was loaded with, both for the metadata."""
        self.device, self.dtype, self.low_memory, self._offload = device, dtype, low_memory, offload
        self.compiled, self.cache_steps = compiled, cache_steps
        self.scheduler_config = dict(scheduler_config)
        self.names = dict(names or {})
        self.loras = tuple(loras)
        self.transformer_options = tuple(transformer_options)
        self._loaders = {"text_encoder": text_encoder, "transformer": transformer, "vae": vae}
        self._loaded: dict[str, object] = {k: v for k, v in self._loaders.items() if not callable(v) or _is_module(v)}
        # Each stage frees its part on exit in low-memory mode, so no reference may outlive the block.
        with self._stage("transformer") as model:  # what options resolution needs, kept after release
            self.model_config = model.config
            null = learned_null_caption(model)
            self.null_caption = None if null is None else null.clone()
            del model, null
        with self._stage("vae") as vae_model:
            self.vae_factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
            self.vae_scaling = float(vae_model.config.scaling_factor)
            del vae_model
        self.last_run: RunStats | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | LoadSettings | None = None,
        transformer: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        low_memory: bool = False,
        vae_tiling: bool = False,
        t5_quantization: str | None = None,
        loras: list[tuple[str, float]] | None = None,
        compile: bool = False,
        cache_steps: int = 0,
        transformer_options: dict[str, Any] | None = None,
    ) -> PixArtPipeline:
        """Load a pipeline folder or hub id; ``transformer`` swaps in other weights (any form
        load_transformer reads) while T5, VAE and scheduler come from ``model``. ``model`` may also be
        :class:`LoadSettings` (e.g. an image's, from :meth:`GenerationOptions.from_metadata`), which then says
        the model, transformer, LoRAs and step caching.

        low_memory: T5, transformer and VAE are each loaded for their stage and released after it
        (on CUDA they wait on the CPU instead), so peak memory is the largest part, not the sum.
        compile: torch.compile the transformer; cache_steps: reuse deep blocks (:mod:`pixart.sampling.step_cache`).
        transformer_options: more load_transformer keywords (:data:`TRANSFORMER_OPTIONS`), e.g. num_heads.
        """
        from diffusers import AutoencoderKL

        from pixart.checkpoints.convert import load_transformer
        from pixart.checkpoints.lora import load_lora

        if isinstance(model, LoadSettings):
            if transformer is not None or loras or cache_steps or transformer_options:
                raise TypeError("give the transformer, LoRAs and cache steps in the LoadSettings, not beside it")
            transformer_options = dict(model.transformer_options)
            model, transformer, loras, cache_steps = model.model, model.transformer, model.loras, model.cache_steps
        device = parse_device(device)
        check_cache_steps(cache_steps)
        if compile:
            check_compiler(device)
        dtype = resolve_dtype(dtype, device)
        check_quantization(t5_quantization, device)
        root = resolve_model(model, need_transformer=transformer is None)
        if not (root / "vae").is_dir():
            raise PixArtError(f"{root} has no vae/ folder; pass a diffusers PixArt pipeline folder or hub id")
        offload = low_memory and device.type == "cuda"
        stage_device = torch.device("cpu") if offload else device
        t5_dtype = torch.float32 if t5_quantization == "int8-dynamic" else dtype

        def load_text_encoder() -> TextEncoder:
            log.info("loading T5 from %s", root)
            # Low memory on CPU: T5 (the largest part by far) is read layer by layer from disk as it runs.
            stream = low_memory and stage_device.type == "cpu" and t5_quantization is None
            return TextEncoder.from_pretrained(
                root, device=stage_device, dtype=t5_dtype, quantization=t5_quantization, stream=stream
            )

        def load_model() -> torch.nn.Module:
            source = transformer if transformer is not None else root
            log.info("loading the transformer from %s", source)
            net = load_transformer(source, device=stage_device, dtype=dtype, **(transformer_options or {}))
            for path, scale in loras or []:
                net = load_lora(net, path, scale, merge=True)  # merged: no per-step LoRA cost
            if compile:
                net.compile(regional=cache_steps > 1)  # the step cache's block hook would break a whole-forward graph
            return net

        def load_vae() -> torch.nn.Module:
            vae_config = json.loads((root / "vae" / "config.json").read_text())
            # SD/SDXL VAEs overflow in fp16; those marked force_upcast (as diffusers does) stay in fp32.
            vae_dtype = torch.float32 if vae_config.get("force_upcast", True) else dtype
            vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype)
            vae = vae.to(stage_device).eval().requires_grad_(False)
            if vae_tiling:
                vae.enable_tiling()
            return vae

        scheduler_file = root / "scheduler" / "scheduler_config.json"
        # Without one, diffusers' solver defaults are the PixArt schedule anyway (1000 linear betas 1e-4…0.02).
        scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
        names = {"model": str(model if model is not None else root), "transformer": str(transformer or "")}
        loaders = (load_text_encoder, load_model, load_vae)
        if not low_memory:
            loaders = tuple(load() for load in loaders)
        return cls(
            *loaders,
            scheduler_config,
            device=device,
            dtype=dtype,
            low_memory=low_memory,
            offload=offload,
            names=names,
            compiled=compile,
            cache_steps=cache_steps,
            loras=tuple((str(path), float(scale)) for path, scale in loras or ()),
            transformer_options=tuple(sorted((transformer_options or {}).items())),
        )

    # ------------------------------------------------------------------ loading stages

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator:
        """The component for one stage, on the execution device; in low-memory mode released after."""
        part = self._loaded.get(name)
        if part is None:
            part = self._loaders[name]()
            if self._offload or not self.low_memory:
                self._loaded[name] = part
        if self._offload:
            part.to(self.device)
        try:
            yield part
        finally:
            if self._offload:
                part.to("cpu")
                torch.cuda.empty_cache()
            elif self.low_memory:
                self._loaded.pop(name, None)
                del part
                release_memory()

    # ------------------------------------------------------------------ generation

    def resolve(self, options: GenerationOptions | None = None, **overrides) -> GenerationOptions:
        """Options with every default filled in from the sampler and the model, checked against the model."""
        options = (options or GenerationOptions()).replace(**overrides)
        sampler = get_sampler(options.sampler) if options.sampler else default_sampler(self.scheduler_config)
        side = self.model_config.sample_size * self.vae_factor
        resolved = options.replace(
            sampler=sampler.name,
            steps=options.steps if options.steps is not None else sampler.steps,
            guidance=options.guidance if options.guidance is not None else sampler.guidance,
            width=options.width or side,
            height=options.height or side,
            max_tokens=options.max_tokens or DEFAULT_MAX_TOKENS[self.model_config.family],
            seed=options.seed if options.seed is not None else random.randrange(2**32),
        )
        self.sample_size_for(resolved)  # size rules
        return resolved

    def sample_size_for(self, options: GenerationOptions) -> tuple[int, int]:
        """The (height, width) in pixels that sampling runs at for these options."""
        multiple = self.vae_factor * self.model_config.patch_size
        return generation_size(
            options.width, options.height, self.model_config.sample_size, multiple, options.binning, self.vae_factor
        )

    def __call__(
        self,
        prompt: str | list[str],
        options: GenerationOptions | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        show_progress: bool = True,
        **overrides,
    ) -> list[Image.Image]:
        """Generate ``num_images`` images for each prompt; returns PIL images with metadata in ``.info``.

        ``overrides`` are GenerationOptions fields (``seed=3, steps=10``). ``progress(done, total)`` is
        called after every denoising step of the whole call, e.g. for a UI's progress bar.
        """
        from tqdm.auto import tqdm

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise PixArtError("give at least one prompt (text); an empty string asks for an unconditional image")
        opts = self.resolve(options, **overrides)
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        height, width = self.sample_size_for(opts)
        jobs = [(p, opts.seed + k) for k, p in enumerate(p for p in prompts for _ in range(opts.num_images))]
        batches = [jobs[i : i + opts.batch_size] for i in range(0, len(jobs), opts.batch_size)]
        guided = opts.guidance > 1.0

        text = self._encode(prompts, opts, guided)  # before the transformer loads: low-memory keeps one part at a time
        latents, done = [], 0
        schedulers = [make_scheduler(opts.sampler, self.scheduler_config) for _ in batches]
        for scheduler in schedulers:
            scheduler.set_timesteps(opts.steps)
        total = sum(len(s.timesteps) for s in schedulers)
        full = [runs_every_block(k, self.cache_steps) for s in schedulers for k in range(len(s.timesteps))]
        step_ends = [time.perf_counter()]  # step durations: the first one of a compiled model includes compiling

        def on_step() -> None:
            nonlocal done
            done += 1
            step_ends.append(time.perf_counter())
            bar.update()
            if progress is not None:
                progress(done, total)

        with self._stage("transformer") as model, tqdm(total=total, desc="denoising", disable=not show_progress) as bar:
            for batch, scheduler in zip(batches, schedulers, strict=True):
                # A generator per image: image k is what diffusers makes alone with seed + k.
                generators = [torch.Generator(self.device).manual_seed(seed) for _, seed in batch]
                shape = (1, self.model_config.in_channels, height // self.vae_factor, width // self.vae_factor)
                noise = torch.cat(
                    [torch.randn(shape, generator=g, device=self.device, dtype=self.dtype) for g in generators]
                )
                cond = self._conditioning([p for p, _ in batch], text, height, width)
                latents.append(
                    denoise(
                        cached_denoiser(model, self.cache_steps),
                        scheduler,
                        noise,
                        cond,
                        steps=opts.steps,
                        guidance=opts.guidance,
                        generator=generators,
                        on_step=on_step,
                    )
                )
            del model
        images = self._decode(torch.cat(latents), opts, opts.batch_size)
        for image, (p, seed) in zip(images, jobs, strict=True):
            image.info.update(self.metadata(p, opts.replace(seed=seed, num_images=1)))
        self.last_run = RunStats(
            time.perf_counter() - started,
            len(images),
            done,
            peak_memory_bytes(self.device),
            compile_seconds=compile_seconds(step_ends, full) if self.compiled else None,
        )
        return images

    def _encode(self, prompts: list[str], opts: GenerationOptions, guided: bool) -> dict:
        """T5 features of every distinct prompt (and the negative), with the null caption to guide against."""
        learned = self.null_caption
        use_learned = guided and opts.negative_prompt is None and learned is not None
        if use_learned and opts.max_tokens > learned.shape[0]:
            log.info(
                'max tokens %d exceed the learned null caption (%d): using T5 of "" instead',
                opts.max_tokens,
                learned.shape[0],
            )
            use_learned = False
        negative = None if not guided or use_learned else (opts.negative_prompt or "")
        texts = list(dict.fromkeys(prompts + ([negative] if negative is not None else [])))
        with self._stage("text_encoder") as encoder:
            features, mask = encoder.encode(texts, opts.max_tokens, clean=opts.clean)
            del encoder
        features, mask = features.to(self.device, self.dtype), mask.to(self.device)
        encoded = {t: (features[i], mask[i]) for i, t in enumerate(texts)}
        if use_learned:
            # Official α sampling pairs the learned null caption with the prompt's own mask.
            encoded[None] = (learned[: opts.max_tokens].to(self.device, self.dtype), None)
        elif negative is not None:
            encoded[None] = encoded[negative]
        return encoded

    def _conditioning(self, prompts: list[str], text: dict, height: int, width: int) -> Conditioning:
        y = torch.stack([text[p][0] for p in prompts])  # (B, L, C)
        mask = torch.stack([text[p][1] for p in prompts])  # (B, L)
        if None in text:  # guided: negative rows first, as diffusers batches them
            null, null_mask = text[None]
            y = torch.cat([null.expand_as(y), y])
            mask = torch.cat([mask if null_mask is None else null_mask.expand_as(mask), mask])
        cond = Conditioning(text=y, mask=mask)
        if self.model_config.micro_conditions:
            # α-MS was trained with the (binned) generation size and its aspect ratio h / w.
            cond.resolution = torch.tensor([[height, width]], device=self.device, dtype=self.dtype)
            cond.aspect_ratio = torch.tensor([height / width], device=self.device, dtype=self.dtype)
        return cond

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, opts: GenerationOptions, batch_size: int) -> list[Image.Image]:
        from diffusers.image_processor import PixArtImageProcessor

        processor = PixArtImageProcessor(vae_scale_factor=self.vae_factor)
        images = []
        with self._stage("vae") as vae:
            for chunk in latents.split(batch_size):
                pixels = vae.decode(chunk.to(vae.dtype) / self.vae_scaling, return_dict=False)[0]
                if (pixels.shape[2], pixels.shape[3]) != (opts.height, opts.width):
                    pixels = resize_and_crop(pixels, opts.width, opts.height)
                images += processor.postprocess(pixels.float(), output_type="pil")
            del vae
        return images

    def metadata(self, prompt: str, opts: GenerationOptions) -> dict[str, str]:
        """The PNG text fields that let :meth:`GenerationOptions.from_metadata` rebuild one image's run."""
        fields = {
            "prompt": prompt,
            "seed": opts.seed,
            "steps": opts.steps,
            "sampler": opts.sampler,
            "guidance": opts.guidance,
            "width": opts.width,
            "height": opts.height,
            "binning": str(opts.binning).lower(),
            "max_tokens": opts.max_tokens,
            "clean": str(opts.clean).lower(),
            **LoadSettings(
                self.names.get("model") or None,
                self.names.get("transformer") or None,
                self.loras,
                self.cache_steps,
                self.transformer_options,
            ).metadata(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "generator": f"pixart {__version__}",
        }
        if opts.negative_prompt is not None:
            fields["negative_prompt"] = opts.negative_prompt
        return {k: str(v) for k, v in fields.items()}


def save_image(image: Image.Image, out_dir: str | os.PathLike) -> Path:
    """Write a PNG with its generation metadata into out_dir under a fresh name; never overwrites a file.

    Names are ``NNNNN-SEED.png``. The file is written to a temporary name and hard-linked into
    place, which fails rather than replaces if another process took the name first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    fd, tmp = tempfile.mkstemp(prefix=".pixart-", suffix=".png", dir=out)
    os.fchmod(fd, file_mode())  # mkstemp's 0600 would hide the image from other users whatever the umask
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        taken = [int(m.group(1)) for f in out.iterdir() if (m := re.match(r"(\d+)-", f.name))]
        index = max(taken, default=-1) + 1
        while True:
            target = out / f"{index:05d}-{image.info.get('seed', 'x')}.png"
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                index += 1
    finally:
        os.unlink(tmp)


def release_memory() -> None:
    """Return freed tensors' memory to the system, so the next stage does not stack on the last one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            # glibc keeps freed heap pages for reuse; trimming hands them back so the RSS really drops.
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _is_module(value: object) -> bool:
    return isinstance(value, (torch.nn.Module, TextEncoder))
