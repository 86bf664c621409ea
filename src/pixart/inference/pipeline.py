"""Text-to-image generation: ``PixArtPipeline`` loads a model once and turns prompts into PIL images.

The one entry point for notebooks, the CLI and the web UI::

    pipe = PixArtPipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    images = pipe("a red fox in the snow", GenerationOptions(seed=1, width=1024, height=768))

Components: T5 (:class:`pixart.model.text.TextEncoder`), our transformer
(:func:`pixart.checkpoints.convert.load_transformer`), diffusers' AutoencoderKL and schedulers
(:mod:`pixart.sampling.samplers`). What to generate and the PNG metadata that reproduces an image live in
:mod:`pixart.inference.options`; device, dtype and memory in :mod:`pixart.inference.devices`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pixart import __version__
from pixart.demo import BUNDLE
from pixart.errors import PixArtError
from pixart.inference import sizes
from pixart.inference.control import prepare_control
from pixart.inference.devices import (
    RunStats,
    check_compiler,
    compile_seconds,
    parse_device,
    peak_memory_bytes,
    release_memory,
    resolve_dtype,
    resolve_quantize,
)
from pixart.inference.image_inputs import ImageInputs, ImageSource, trimmed_timesteps
from pixart.inference.options import GenerationOptions, LoadSettings, check_seed_range, check_text
from pixart.inference.options import read_png_metadata as read_png_metadata  # re-exported: the README imports it here
from pixart.inference.options import save_image as save_image  # re-exported: the README imports it here
from pixart.model.config import FAMILY
from pixart.model.quantize import check_quantize, dtype_name, quantize_int8
from pixart.model.resolution import generation_size, resize_and_crop
from pixart.model.text import DEFAULT_MAX_TOKENS, TextEncoder, check_quantization, check_text_width
from pixart.sampling.samplers import (
    Conditioning,
    default_sampler,
    denoise,
    get_sampler,
    make_scheduler,
    read_scheduler_config,
)
from pixart.sampling.step_cache import cached_denoiser, check_cache_steps, check_cache_threshold

log = logging.getLogger(__name__)


DEMO_MODEL = BUNDLE
"""The small bundled model used when no model is named (a diffusers pipeline folder)."""

HUB_MODELS = (
    "PixArt-alpha/PixArt-XL-2-1024-MS",
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
    "PixArt-alpha/PixArt-LCM-XL-2-1024-MS",
)


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
    """The learned null caption (α's) if the family has one and the checkpoint carried it, else None (T5 of "").

    Official α checkpoints store ``y_embedding``; diffusers folders do not, and
    :func:`pixart.checkpoints.convert.load_transformer` then fills the buffer with fixed seeded noise, recognised here.
    """
    if not FAMILY[model.config.family].learned_null_caption:
        return None
    from pixart.checkpoints.convert import placeholder_y_embedding

    y = model.y_embedder.y_embedding
    # Compared in the model's dtype: a bf16 or fp16 model holds the placeholder rounded.
    if torch.equal(y.detach().cpu(), placeholder_y_embedding(model.config).to(y.dtype)):
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
        trained_sizes: tuple[tuple[int, int], ...] = (),
        quantize: str | None = None,
        cache_threshold: float = 0.0,
    ):
        """Components are either loaded objects or zero-argument loaders. low_memory: load each part
        when its stage starts and release it when the stage ends; offload: keep parts on the CPU and
        move each to the device only for its stage. compiled: the transformer went through
        torch.compile (its first step is timed as compile time); cache_steps: see :mod:`pixart.sampling.step_cache`;
        loras: the (path, scale) merged into the transformer, and transformer_options: the load_transformer
        keywords it was loaded with, both for the metadata. trained_sizes: the (width, height) sizes the
        transformer's folder records it was trained at (:mod:`pixart.inference.sizes`), () if none. quantize:
        "int8" if the transformer's linears were quantised (:mod:`pixart.model.quantize`), for the metadata;
        cache_threshold: adaptive step caching instead of cache_steps."""
        self.device, self.dtype, self.low_memory, self._offload = device, dtype, low_memory, offload
        self.compiled, self.cache_steps, self.cache_threshold = compiled, cache_steps, cache_threshold
        self.scheduler_config = dict(scheduler_config)
        self.names = dict(names or {})
        self.loras = tuple(loras)
        self.transformer_options = tuple(transformer_options)
        self.trained_sizes = tuple(trained_sizes)
        self.quantize = quantize
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
        self.controlnet = None
        """The ControlNet (path or module) a call with a control image steers by unless it names another."""
        self._full_precision: Callable[[], torch.nn.Module] | None = None  # from_pretrained's fp32 reader, below bf16

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
        quantize: str | None = None,
        cache_threshold: float = 0.0,
    ) -> PixArtPipeline:
        """Load a pipeline folder or hub id; ``transformer`` swaps in other weights (any form
        load_transformer reads) while T5, VAE and scheduler come from ``model``. ``model`` may also be
        :class:`LoadSettings` (e.g. an image's, from :meth:`GenerationOptions.from_metadata`), which then says
        the model, transformer, LoRAs and step caching.

        low_memory: T5, transformer and VAE are each loaded for their stage and released after it
        (on CUDA they wait on the CPU instead), so peak memory is the largest part, not the sum.
        compile: torch.compile the transformer; cache_steps: reuse deep blocks (:mod:`pixart.sampling.step_cache`)
        on a fixed schedule, or cache_threshold: while the first block's output changes less than it.
        transformer_options: more load_transformer keywords (``TRANSFORMER_OPTIONS``), e.g. num_heads.
        dtype: None or "auto" is bf16 on a CPU with bf16 units (avx512_bf16, AMX), fp32 on other CPUs (and with
        ``quantize``), fp16 on GPUs; "bf16" on a CPU without bf16 units runs fp32 (warned).
        quantize: "int8" runs the transformer's and T5's linears in int8 on the CPU (:mod:`pixart.model.quantize`).
        """
        from diffusers import AutoencoderKL

        from pixart.checkpoints.convert import load_transformer
        from pixart.checkpoints.lora import load_lora

        controlnet = None
        recorded_dtype = None
        if isinstance(model, LoadSettings):
            if transformer is not None or loras or cache_steps or transformer_options or quantize or cache_threshold:
                raise TypeError(
                    "give the transformer, LoRAs, cache steps, quantize and cache threshold in the LoadSettings, "
                    "not beside it"
                )
            transformer_options, controlnet = dict(model.transformer_options), model.controlnet
            quantize, recorded_dtype = model.quantize, model.dtype
            cache_threshold = model.cache_threshold
            model, transformer, loras, cache_steps = model.model, model.transformer, model.loras, model.cache_steps
        device = parse_device(device)
        if dtype is None and not (recorded_dtype == "fp16" and device.type == "cpu"):
            dtype = recorded_dtype  # a GPU's fp16 image remade on a CPU: the CPU's own default instead
        check_cache_steps(cache_steps)
        check_cache_threshold(cache_threshold, cache_steps)
        if compile:
            check_compiler(device)
        if quantize and dtype in (None, "auto"):
            dtype = "fp32"  # int8 kernels take fp32 activations: auto's bf16 would refuse the quantization
        dtype = resolve_dtype(dtype, device)
        check_quantization(t5_quantization, device)
        check_quantize(quantize, device, dtype)
        quantize = resolve_quantize(quantize, device)
        if quantize == "int8" and t5_quantization is None:
            t5_quantization = "int8-dynamic"
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

        source = transformer if transformer is not None else root

        def read_transformer(where: torch.device, read_dtype: torch.dtype) -> torch.nn.Module:
            return load_transformer(source, device=where, dtype=read_dtype, **(transformer_options or {}))

        def load_model() -> torch.nn.Module:
            log.info("loading the transformer from %s", source)
            # LoRAs merge into fp32 weights, then the sum is cast: a LoRA then makes the same network as a file
            # with it merged in (as a fine-tune is saved), in bf16 or fp16 too.
            net = read_transformer(stage_device, torch.float32 if loras else dtype)
            check_text_width(net.config.caption_channels, root, f"the transformer {source}")  # before it runs
            for path, scale in loras or []:
                net = load_lora(net, path, scale, merge=True)  # merged: no per-step LoRA cost
            if loras:
                net = net.to(dtype)
            if quantize == "int8":
                # After the merge, so the LoRA deltas are quantised with the weights. The blocks only: nearly all
                # the time goes there, and the embedders read their weights' dtype, which int8 modules lack.
                quantize_int8(net.blocks)
            if compile:
                # The step cache's block hook would break a whole-forward graph.
                net.compile(regional=cache_steps > 1 or cache_threshold > 0)
            return net

        def load_vae() -> torch.nn.Module:
            vae_config = json.loads((root / "vae" / "config.json").read_text())
            # SD/SDXL VAEs overflow in fp16: those marked force_upcast stay in fp32 under fp16, as in diffusers.
            # bf16 has fp32's range, so it runs the VAE in bf16 (diffusers' PixArt pipelines do too).
            upcast = dtype == torch.float16 and vae_config.get("force_upcast", True)
            vae_dtype = torch.float32 if upcast else dtype
            try:
                # safetensors only, as for the transformer and T5: a pickled .bin could run code when loaded
                vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype, use_safetensors=True)
            except OSError as err:
                first = str(err).strip().splitlines()[0]
                raise PixArtError(
                    f"cannot load the VAE from {root / 'vae'} (only safetensors are supported): {first}"
                ) from None
            vae = vae.to(stage_device).eval().requires_grad_(False)
            if vae_tiling:
                vae.enable_tiling()
            return vae

        scheduler_config = read_scheduler_config(root)
        # The bundled demo is recorded as no model: its path is this machine's install, not a choice to repeat.
        names = {"model": "" if model is None else str(model), "transformer": str(transformer or "")}
        loaders = (load_text_encoder, load_model, load_vae)
        if not low_memory:
            loaders = tuple(load() for load in loaders)
        pipe = cls(
            *loaders,
            scheduler_config,
            device=device,
            dtype=dtype,
            low_memory=low_memory,
            offload=offload,
            names=names,
            compiled=compile,
            cache_steps=cache_steps,
            cache_threshold=cache_threshold,
            loras=tuple((str(path), float(scale)) for path, scale in loras or ()),
            transformer_options=tuple(sorted((transformer_options or {}).items())),
            trained_sizes=sizes.trained_sizes(root) if transformer is None else (),
            quantize=quantize,
        )
        pipe.controlnet = controlnet
        if dtype != torch.float32 and quantize is None:
            pipe._full_precision = functools.partial(read_transformer, torch.device("cpu"), torch.float32)
        return pipe

    def full_precision_transformer(self) -> torch.nn.Module | None:
        """The transformer read again in fp32 on the CPU, without LoRAs, when this pipeline runs in bf16 or fp16;
        None when it runs in fp32. A server merging LoRAs per request merges into these weights and casts, as
        from_pretrained merges before its cast, so its images equal ``pixart generate --lora``'s."""
        return None if self._full_precision is None else self._full_precision()

    @property
    def known_sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) sizes the model does well: those it records it was trained at, else its aspect-ratio bins."""
        return sizes.known_sizes(self.trained_sizes, self.model_config.sample_size, self.vae_factor)

    @property
    def transformer(self) -> torch.nn.Module:
        """The loaded transformer, to change its weights in place (a server switching LoRAs per request).

        A low-memory pipeline on the CPU loads it afresh for each call, so it has none to hand out.
        """
        if self.low_memory and not self._offload:
            raise PixArtError("a low-memory pipeline reloads its transformer for every call; load it without")
        return self._loaded["transformer"]

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
        names = self.names.values()  # a model or transformer naming a released checkpoint picks its sampler (DMD)
        sampler = get_sampler(options.sampler) if options.sampler else default_sampler(self.scheduler_config, names)
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
        image: ImageSource | None = None,
        mask: ImageSource | None = None,
        progress: Callable[[int, int], None] | None = None,
        show_progress: bool = True,
        control: Image.Image | str | os.PathLike | None = None,
        controlnet: torch.nn.Module | str | os.PathLike | None = None,
        **overrides,
    ) -> list[Image.Image]:
        """Generate ``num_images`` images for each prompt; returns PIL images with metadata in ``.info``.

        ``overrides`` are GenerationOptions fields (``seed=3, steps=10``). ``progress(done, total)`` is
        called after every denoising step of the whole call, e.g. for a UI's progress bar.
        ``control`` (an image or its path) steers the model through ``controlnet`` (a
        :class:`pixart.model.controlnet.PixArtControlNet` or its file; default :attr:`controlnet`), with the
        options' control_scale and control_type (:mod:`pixart.inference.control`).

        ``image`` (a PIL image or a file) starts from that image instead of noise (``strength``, default 0.6) and
        ``mask`` (white = repaint) repaints only part of it (``strength`` 1 and ``mask_blur`` 4 px by default);
        the size defaults to the image's. See :mod:`pixart.inference.image_inputs`.
        """
        from tqdm.auto import tqdm

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise PixArtError("give at least one prompt (text); an empty string asks for an unconditional image")
        for p in prompts:
            check_text("prompt", p)
        options = (options or GenerationOptions()).replace(**overrides)
        inputs = ImageInputs.load(image, mask, options)  # None: text-to-image
        opts = self.resolve(options if inputs is None else inputs.with_defaults(options, self))
        if inputs is not None and get_sampler(opts.sampler).timesteps:
            raise PixArtError(
                f"the {opts.sampler} sampler runs only its distilled timesteps from pure noise; it cannot start "
                "from an image (--image/--mask): choose another sampler"
            )
        steer = prepare_control(
            control,
            self.controlnet if controlnet is None and control is not None else controlnet,
            scale=opts.control_scale,
            control_type=opts.control_type,
            base=self.model_config,
            cache_steps=self.cache_steps,
            cache_threshold=self.cache_threshold,
            device=self.device,
            dtype=self.dtype,
        )
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        height, width = self.sample_size_for(opts)
        jobs = [(p, opts.seed + k) for k, p in enumerate(p for p in prompts for _ in range(opts.num_images))]
        check_seed_range(opts.seed, len(jobs))
        batches = [jobs[i : i + opts.batch_size] for i in range(0, len(jobs), opts.batch_size)]
        guided = opts.guidance > 1.0

        text = self._encode(prompts, opts, guided)  # before the transformer loads: low-memory keeps one part at a time
        source = None
        if steer is not None or inputs is not None:
            with self._stage("vae") as vae:
                if steer is not None:
                    steer.encode(vae, height, width, self.vae_scaling)
                if inputs is not None:
                    source = inputs.encode(vae, height, width, self.vae_scaling, self.device)
                del vae
        latents, done = [], 0
        schedulers = [make_scheduler(opts.sampler, self.scheduler_config) for _ in batches]
        runs = [len(trimmed_timesteps(s, opts.steps, opts.strength or 1.0)) for s in schedulers]
        total = sum(runs)
        full: list[bool] = []  # step by step, whether the step ran every block (filled by a step cache)
        step_ends = [time.perf_counter()]  # step durations: the first one of a compiled model includes compiling

        def on_step() -> None:
            nonlocal done
            done += 1
            step_ends.append(time.perf_counter())
            bar.update()
            if progress is not None:
                progress(done, total)

        # On a CPU latents, noise and the scheduler's math stay fp32 whatever the model's dtype: a seed then draws
        # the same noise in bf16 as in fp32, and bf16 rounding does not build up over the steps.
        latent_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        with self._stage("transformer") as model, tqdm(total=total, desc="denoising", disable=not show_progress) as bar:
            for batch, scheduler in zip(batches, schedulers, strict=True):
                # A generator per image: image k is what diffusers makes alone with seed + k.
                generators = [torch.Generator(self.device).manual_seed(seed) for _, seed in batch]
                shape = (1, self.model_config.in_channels, height // self.vae_factor, width // self.vae_factor)
                if source is None:
                    start = None
                    noise = torch.cat(
                        [torch.randn(shape, generator=g, device=self.device, dtype=latent_dtype) for g in generators]
                    )
                else:  # the input's posterior sample is drawn first, then the noise, as diffusers draws them
                    start = source.start(generators, latent_dtype, opts.strength)
                    noise = start.noise
                cond = self._conditioning([p for p, _ in batch], text, height, width)
                cached = cached_denoiser(model, self.cache_steps, self.cache_threshold, full)
                latents.append(
                    denoise(
                        in_dtype(cached if steer is None else steer.denoiser(model), self.dtype),
                        scheduler,
                        noise,
                        cond,
                        steps=opts.steps,
                        guidance=opts.guidance,
                        generator=generators,
                        on_step=on_step,
                        timesteps=get_sampler(opts.sampler).timesteps,
                        start=start,
                    )
                )
            del model
        images = self._decode(torch.cat(latents), opts, opts.batch_size)
        if inputs is not None:
            images = inputs.paste_back(images, opts.mask_blur)
        input_hashes = inputs.metadata() if inputs else {}
        for image, (p, seed) in zip(images, jobs, strict=True):
            image.info.update(self.metadata(p, opts.replace(seed=seed, num_images=1)))
            image.info.update(steer.metadata() if steer is not None else {})
            image.info.update(input_hashes)
        self.last_run = RunStats(
            time.perf_counter() - started,
            len(images),
            done,
            peak_memory_bytes(self.device),
            compile_seconds=compile_seconds(step_ends, full or None) if self.compiled else None,
            full_steps=sum(full) if full else None,
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
            # T5 reads each caption at its own length, not padded to max_tokens (a 20-token prompt of Σ's 300 runs
            # on 20 tokens): padding is masked wherever it is read, so only the padded rows change, to zeros. The
            # transformer still gets max_tokens rows: its cross-attention over a batch's shorter length would make
            # an image depend, by rounding, on the other prompts batched with it.
            features, mask = encoder.encode(texts, opts.max_tokens, clean=opts.clean, trim=True)
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
                dtype=dtype_name(self.dtype),
                quantize=self.quantize,
                cache_threshold=self.cache_threshold,
            ).metadata(),
            "generator": f"pixart {__version__}",
        }
        if opts.negative_prompt is not None:
            fields["negative_prompt"] = opts.negative_prompt
        fields.update({k: v for k, v in (("strength", opts.strength), ("mask_blur", opts.mask_blur)) if v is not None})
        return {k: str(v) for k, v in fields.items()}


def in_dtype(denoiser: Callable, dtype: torch.dtype) -> Callable:
    """``denoiser`` fed latents cast to ``dtype`` and answering in the latents' own dtype (fp32 latents around a
    bf16 model on CPU); itself when the dtypes already match."""

    def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.dtype == dtype:
            return denoiser(x, *args, **kwargs)
        return denoiser(x.to(dtype), *args, **kwargs).to(x.dtype)

    return run


def _is_module(value: object) -> bool:
    return isinstance(value, (torch.nn.Module, TextEncoder))
