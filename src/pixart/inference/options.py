"""What to generate and how to reproduce it: ``GenerationOptions``, ``LoadSettings`` and the PNG that records them.

Each generated image carries its settings as PNG text metadata (``image.info``); :func:`save_image` writes them with
the image, :func:`read_png_metadata` reads them from a file, and :meth:`GenerationOptions.from_metadata` rebuilds the
run from them: prompt, options and the :class:`LoadSettings` (model, transformer, LoRAs, step caching) that made it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pixart.errors import PixArtError
from pixart.files import disk_full_is_one_line, file_mode
from pixart.inference.control import check_control_scale, check_control_type
from pixart.model.quantize import QUANTIZE_MODES
from pixart.model.resolution import check_size
from pixart.sampling.samplers import get_sampler

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""--dtype's names and torch's spelling of each, which images record (:data:`pixart.inference.devices.DTYPES`)."""
MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
"""The released schedules have 1000 training timesteps; more steps than that would revisit the same ones."""
MAX_GUIDANCE = 50.0
"""Released models use 4.5 (α, Σ) or 1 (LCM); far above 50 the guided prediction saturates to a black image."""
MAX_TOKENS = 1024
"""T5's relative attention has no hard length limit, but its attention bias grows with tokens² (T5-XXL at 1024
tokens: 256 MB per layer) and the released models were trained on 120 (α) or 300 (Σ) tokens."""
MAX_MASK_BLUR = 256
"""A feather wider than this blurs the whole kept region of any image a model makes."""


def check_seed_range(seed: int, images: int) -> None:
    """Refuse a run whose last image's seed (image k uses seed + k) would not fit a generator or the PNG's metadata."""
    if seed + images - 1 > MAX_SEED:
        raise PixArtError(
            f"seed {seed} is too large for {images} images (image k uses seed + k); "
            f"use a seed from 0 to {MAX_SEED - images + 1}"
        )


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
    """A name from :data:`pixart.sampling.samplers.SAMPLERS`; None: the model's default (dpm++; lcm, dmd for LCM, DMD
    models)."""
    steps: int | None = None
    """Denoising steps, up to :data:`MAX_STEPS`; None: the sampler's."""
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
    control_scale: float = 1.0
    """With a ControlNet: the factor on its residuals (0: none, 1: as trained); see :mod:`pixart.inference.control`."""
    control_type: str = "none"
    """With a ControlNet: how the control image becomes its map ('none': as it is, 'canny': its edges,
    'layout': where it differs from its plain background, white on black)."""
    strength: float | None = None
    """With an input image: how much of its schedule is run, in (0, 1]; None: 0.6, or 1 for inpainting."""
    mask_blur: int | None = None
    """With a mask: the feather in pixels of the kept pixels pasted back; 0 is a hard edge; None: 4."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values no model could use, naming the value and what is accepted."""

        def positive_int(name: str, value, optional: bool = True, most: int | None = None) -> None:
            if value is None and optional:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PixArtError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
            if most is not None and value > most:
                raise PixArtError(f"{name.replace('_', ' ')} must be from 1 to {most}, got {value!r}")

        if self.negative_prompt is not None:
            check_text("negative prompt", self.negative_prompt)
        positive_int("num_images", self.num_images, optional=False)
        positive_int("batch_size", self.batch_size, optional=False)
        positive_int("steps", self.steps, most=MAX_STEPS)
        positive_int("max_tokens", self.max_tokens, most=MAX_TOKENS)
        if self.width is not None or self.height is not None:
            # The model-independent part of the size rule; the pipeline checks the rest (patch grid, bins).
            # A given 0 is checked as 0, not taken for "unset".
            check_size(
                8 if self.width is None else self.width, 8 if self.height is None else self.height, 8, binned=True
            )
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise PixArtError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.sampler is not None:
            get_sampler(self.sampler).check(self.steps, self.guidance)
        if self.guidance is not None:
            ok = isinstance(self.guidance, (int, float)) and not isinstance(self.guidance, bool)
            if not ok or not math.isfinite(self.guidance) or not 0 <= self.guidance <= MAX_GUIDANCE:
                raise PixArtError(
                    f"guidance must be a finite number from 0 to {MAX_GUIDANCE:g} (≤ 1 turns it off), "
                    f"got {self.guidance!r}"
                )
        check_control_scale(self.control_scale)
        check_control_type(self.control_type)

        if self.strength is not None:
            ok = isinstance(self.strength, (int, float)) and not isinstance(self.strength, bool)
            if not ok or not 0 < self.strength <= 1:  # NaN fails the comparison too
                raise PixArtError(f"strength must be a number above 0 and at most 1, got {self.strength!r}")
        if self.mask_blur is not None:
            ok = isinstance(self.mask_blur, int) and not isinstance(self.mask_blur, bool)
            if not ok or not 0 <= self.mask_blur <= MAX_MASK_BLUR:
                raise PixArtError(
                    f"mask blur must be a whole number of pixels from 0 to {MAX_MASK_BLUR}, got {self.mask_blur!r}"
                )

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
                control_scale=float(info.get("control_scale", 1.0)),
                control_type=info.get("control_type", "none"),
                strength=float(info["strength"]) if "strength" in info else None,
                mask_blur=int(info["mask_blur"]) if "mask_blur" in info else None,
            )
        except (KeyError, ValueError) as err:
            raise PixArtError(f"the image's generation metadata is incomplete or malformed: {err}") from None
        return info["prompt"], options, LoadSettings.from_metadata(info)


TRANSFORMER_OPTIONS = ("num_heads", "pe_scale", "kv_compress", "ema", "family", "image_size")
"""The load_transformer keywords a LoadSettings may carry."""


@dataclass(frozen=True)
class LoadSettings:
    """Which weights make an image: what its PNG records and :meth:`PixArtPipeline.from_pretrained` loads.

    The device is not among them: it follows the machine that reproduces the image.
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
    ema, family, image_size), as sorted (name, value) pairs."""
    controlnet: str | None = None
    """A ControlNet (:func:`pixart.checkpoints.controlnet.load_controlnet`) the pipeline steers by when given a
    control image."""
    dtype: str | None = None
    """The precision it ran in (fp32, bf16, fp16: :data:`DTYPE_NAMES`); None: the device's
    default. bf16 changes the image a little (about 49 dB from fp32 on a mid-size model)."""
    quantize: str | None = None
    """"int8": the transformer's and T5's linears ran in int8 on the CPU (:mod:`pixart.model.quantize`)."""
    cache_threshold: float = 0.0
    """Adaptive step caching (:mod:`pixart.sampling.step_cache`), instead of cache_steps; 0: off."""

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
        if self.controlnet:
            fields["controlnet"] = self.controlnet
        if self.quantize:
            fields["quantize"] = self.quantize
        if self.dtype:  # torch's spelling, as images have always recorded it
            fields["dtype"] = DTYPE_NAMES.get(self.dtype, self.dtype)
        if self.cache_threshold > 0:
            fields["cache_threshold"] = repr(float(self.cache_threshold))  # repr: the float round-trips exactly
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
            cache_threshold = float(info.get("cache_threshold", 0))
        except ValueError:
            bad = info["cache_threshold"]
            raise PixArtError(f"the image's cache_threshold metadata {bad!r} is not a number") from None
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
            controlnet=info.get("controlnet") or None,
            dtype=_recorded_dtype(info.get("dtype")),
            quantize=_recorded_quantize(info.get("quantize")),
            cache_threshold=cache_threshold,
        )


def _recorded_dtype(value: str | None) -> str | None:
    """Our name of the dtype an image records (torch's spelling: float32, bfloat16, float16)."""
    names = {spelling: name for name, spelling in DTYPE_NAMES.items()}
    if value and value not in names:
        raise PixArtError(f"the image's dtype metadata {value!r} is not one of {', '.join(names)}")
    return names.get(value) if value else None


def _recorded_quantize(value: str | None) -> str | None:
    if value and value not in QUANTIZE_MODES:
        raise PixArtError(f"the image's quantize metadata {value!r} is not one of {', '.join(QUANTIZE_MODES)}")
    return value or None


def check_recorded_weights(recorded: LoadSettings, given: set[str], *, trust: bool, source: str) -> None:
    """Refuse to load the weights an image's metadata names unless the user chose them or trusts the image.

    A PNG is data anyone can write, and its model, transformer and LoRA fields are paths and hub ids that would be
    read (or downloaded) as they stand. ``given`` names the fields the user set themselves (model, transformer,
    loras); what the image names beyond those needs ``trust``. The refusal shows what would be loaded.
    """
    wanted = {
        "model": recorded.model,
        "transformer": recorded.transformer,
        "loras": ", ".join(f"{path}:{scale:g}" for path, scale in recorded.loras),
        "controlnet": recorded.controlnet,
    }
    named = {field: value for field, value in wanted.items() if value and field not in given}
    if named and not trust:
        flags = "/".join(f"--{'lora' if field == 'loras' else field}" for field in named)
        listing = "; ".join(f"{field} {value}" for field, value in named.items())
        raise PixArtError(
            f"{source} names weights to load ({listing}); choose them yourself with {flags}, "
            "or pass --trust-metadata to load what the image names"
        )


def check_text(what: str, text: object) -> None:
    """Refuse a prompt that is not text, or holds bytes that were not UTF-8 (Python keeps those of a command
    line as lone surrogates, which the tokenizer cannot encode)."""
    if not isinstance(text, str):
        raise PixArtError(f"{what} must be text, got {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PixArtError(
            f"{what} {text!r} is not valid UTF-8 (bad byte at character {err.start}); give the prompt as UTF-8 text"
        ) from None


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


def next_free_index(out_dir: str | os.PathLike) -> int:
    """The number :func:`save_image` gives the next image in out_dir: one past the highest ``NNNNN-`` there."""
    out = Path(out_dir)
    taken = [int(m.group(1)) for f in out.iterdir() if (m := re.match(r"(\d+)-", f.name))] if out.is_dir() else []
    return max(taken, default=-1) + 1


def save_image(image: Image.Image, out_dir: str | os.PathLike, index: int | None = None) -> Path:
    """Write a PNG with its generation metadata into out_dir under a fresh name; never overwrites a file.

    Names are ``NNNNN-SEED.png``, NNNNN from ``index`` (default :func:`next_free_index`) or the next number free.
    The file is written to a temporary name and hard-linked into place, which fails rather than replaces if
    another process took the name first.
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
        with disk_full_is_one_line("an image", out), os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        index = next_free_index(out) if index is None else index
        while True:
            target = out / f"{index:05d}-{image.info.get('seed', 'x')}.png"
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                index += 1
    finally:
        os.unlink(tmp)
