"""The web UI and HTTP API behind ``pixart serve``: one loaded :class:`PixArtPipeline`, shared by every request.

Two doors to the same generation:

- a Gradio page (prompt, sampler, steps, guidance, seed, size presets from the model's aspect-ratio
  bins, a gallery of the saved PNGs), whose button is also Gradio's named API endpoint ``generate``
  (usable with ``gradio_client``);
- ``POST /api/generate`` taking JSON and returning the PNGs as base64 with their metadata.

Both go through :class:`ImageService`, which rate-limits each client, checks a request against
:class:`ServeLimits`, runs at most ``concurrency`` generations at once (stopping one whose API client
hung up or whose page closed), logs one line per request and saves every image with
:func:`pixart.inference.options.save_image`, so what users download is the PNG with its generation metadata,
exactly as ``pixart generate`` writes it.
Before either door, :class:`pixart.serve.guard.Guard` turns away other sites, strangers' host names,
missing tokens and oversized or slow bodies; slow request headers are cut off below it
(:mod:`pixart.serve.slow_clients`).
"""

# No `from __future__ import annotations`: FastAPI reads the route's `request: Request` annotation at run
# time, and Request is imported inside build_app (gradio and fastapi are an optional extra).
import asyncio
import base64
import contextlib
import json
import logging
import math
import queue
import reprlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from pixart.checkpoints.formats import MAX_LORA_SCALE
from pixart.errors import PixArtError
from pixart.inference.control import CONTROL_TYPES, control_map
from pixart.inference.sizes import check_trained_size
from pixart.sampling.samplers import SAMPLERS, default_sampler
from pixart.serve.guard import Access, Guard, RateLimited, RateLimiter, utc_stamp
from pixart.serve.inputs import IMAGE_FIELDS, RequestImages, ServedControlNet, editor_images, read_images

if TYPE_CHECKING:  # `pixart --help` imports this module for ServeLimits; transformers costs seconds
    from pixart.checkpoints.lora import LoraSwitch
    from pixart.inference.options import GenerationOptions
    from pixart.inference.pipeline import PixArtPipeline

log = logging.getLogger(__name__)

API_FIELDS = ("negative_prompt", "seed", "steps", "guidance", "width", "height", "sampler", "num_images", "binning")
API_FIELDS += ("strength", "mask_blur", "control_scale", "control_type")  # with image inputs (serve/inputs.py)
"""GenerationOptions fields a request may set besides the prompt; the rest (batch size, …) are the server's."""

EXAMPLE_PROMPTS = (  # for the released models (T5-XXL): the bundled demo takes its own, from its vocabulary
    "a small cactus with a happy face in the Sahara desert",
    "an astronaut riding a horse on the moon, oil painting",
    "a red fox in the snow, watercolor",
    "a cozy wooden cabin by a lake at dusk, warm light in the windows",
)
CUSTOM_SIZE = "custom"
RELEASED_TEXT_WIDTH = 4096
"""Feature width of T5-XXL, the text encoder of every released PixArt model."""


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of a shared server; set by the ``pixart serve`` flags."""

    max_prompt_chars: int = 1000
    """Longest prompt (and negative prompt) in characters; T5 reads at most 300 tokens anyway."""
    max_pixels: int = 2048 * 2048
    """Largest width × height of one image, and of the bin it is sampled at (Σ's 2K releases fit)."""
    max_images: int = 4
    """Images per request."""
    max_steps: int = 100
    """Denoising steps per image (ddpm's usual count)."""
    concurrency: int = 1
    """Generations running at once; more only helps with spare GPU memory and cores."""
    max_queue: int = 16
    """Requests allowed to wait for a free slot; beyond that the server answers "busy"."""
    max_work: int | None = None
    """Largest pixels × steps × images of one request; None: the model's default size × the most steps a
    sampler defaults to (ddpm's 100) × max_images."""
    max_body: int = 8 * 2**20
    """Largest request body in bytes (also the page's upload limit). Fits a 1024² image and mask even as
    incompressible PNGs (3 MiB + 1 MiB, 5.4 MiB in base64), or an image and a control image of typical photos."""
    body_timeout: int = 30
    """Seconds a client has to send a request body."""
    header_timeout: int = 10
    """Seconds a client has to send its request headers, from connecting or from its previous answer."""
    rate_limit: int = 60
    """Generation requests per minute per client address."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "max_work":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PixArtError(f"--{f.name.replace('_', '-')} must be a positive integer, got {value!r}")


class ServerBusy(PixArtError):
    """Too many requests are already waiting; the client should retry later."""


class _Cancelled(Exception):
    """The client went away: raised from the progress callback to stop denoising and free the slot."""


FIELD_KINDS = {
    "sampler": (str, "the name of a sampler (text)"),
    "width": (int, "an integer"),
    "height": (int, "an integer"),
}
"""Fields whose wrong type GenerationOptions would not name (a list as sampler cannot even be looked up)."""


@dataclass(frozen=True)
class ServedLora:
    """A LoRA the server loaded, which requests may choose by name."""

    name: str
    path: str
    """As given on the command line: what the PNG metadata records, as ``pixart generate --lora`` does."""
    scale: float
    """Its scale when a request names it without one."""


class ImageService:
    """The model behind the UI and the API: checks requests, generates under the concurrency limit, saves PNGs.

    ``loras``, if any, are read once and merged into the transformer per request as the request chooses
    (:class:`pixart.checkpoints.lora.LoraSwitch`); requests with another choice wait until the running ones end.
    """

    def __init__(
        self,
        pipe: "PixArtPipeline",
        limits: ServeLimits,
        out_dir: str | Path,
        log_prompts: bool = False,
        loras: tuple[ServedLora, ...] = (),
        allow_any_size: bool = False,
        controlnets: tuple[ServedControlNet, ...] = (),
    ):
        self.pipe, self.limits, self.out_dir, self.log_prompts = pipe, limits, Path(out_dir), log_prompts
        self.allow_any_size = allow_any_size
        self.loras = {lora.name: lora for lora in loras}
        self.controlnets = {net.name: net for net in controlnets}
        self._switch: LoraSwitch | None = None
        if loras:
            from pixart.checkpoints import lora

            paths = {served.name: served.path for served in loras}
            self._switch = lora.LoraSwitch(pipe.transformer, paths, base=pipe.full_precision_transformer())
        self._choice: tuple[tuple[str, float], ...] | None = ()
        self._choice_users = 0
        self._choice_changed = threading.Condition()
        side = pipe.model_config.sample_size * pipe.vae_factor
        # The most steps any sampler's defaults ask (ddpm's 100), so every default request fits.
        steps = max(sampler.steps for sampler in SAMPLERS.values())
        self.max_work = limits.max_work or side * side * steps * limits.max_images
        self.rate = RateLimiter(limits.rate_limit)
        self._slots = threading.Semaphore(limits.concurrency)
        self._waiting = self._running = 0
        self._count_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Requests waiting for a generation slot right now."""
        with self._count_lock:
            return self._waiting

    @property
    def running(self) -> int:
        """Generations running right now."""
        with self._count_lock:
            return self._running

    def options(self, prompt: object, images: RequestImages | None = None, **given) -> "GenerationOptions":
        """Options for one request, refused with a one-line PixArtError if the request breaks a rule or limit.

        With an input image, its defaults (size, strength, mask blur) are filled in, as the pipeline fills them.
        """
        from pixart.inference.image_inputs import ImageInputs
        from pixart.inference.options import GenerationOptions

        limits, images = self.limits, images or RequestImages()
        unknown = sorted(set(given) - set(API_FIELDS))
        if unknown:
            accepted = ", ".join(("prompt", *API_FIELDS, *IMAGE_FIELDS, "loras"))
            raise PixArtError(f"unknown field(s) {', '.join(unknown)}; accepted: {accepted}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PixArtError("enter a prompt: a non-empty text describing the image")
        for name, text in (("prompt", prompt), ("negative prompt", given.get("negative_prompt"))):
            if isinstance(text, str) and len(text) > limits.max_prompt_chars:
                raise PixArtError(
                    f"the {name} has {len(text)} characters; this server takes at most {limits.max_prompt_chars}"
                )
            if isinstance(text, str) and not _encodable(text):
                raise PixArtError(f"the {name} is not valid Unicode text (it holds a lone surrogate)")
        for name, (kind, what) in FIELD_KINDS.items():
            value = given.get(name)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise PixArtError(f"{name} must be {what}, got {reprlib.repr(value)}")
        if not isinstance(given.get("binning", True), bool):
            raise PixArtError(f"binning must be true or false, got {reprlib.repr(given['binning'])}")
        options = GenerationOptions(**{k: v for k, v in given.items() if v is not None})
        inputs = ImageInputs.load(images.image, images.mask, options)  # a mask without white: refused here
        if inputs is not None:
            options = inputs.with_defaults(options, self.pipe)
        if options.num_images > limits.max_images:
            raise PixArtError(
                f"{options.num_images} images asked; this server makes at most {limits.max_images} per request"
            )
        if options.steps is not None and options.steps > limits.max_steps:
            raise PixArtError(f"{options.steps} steps asked; this server runs at most {limits.max_steps}")
        resolved = self.pipe.resolve(options)  # the model's size rules, with its default size filled in
        if not self.allow_any_size:  # a size the demo never saw: refused now, not answered with a blur minutes later
            trained = self.pipe.trained_sizes
            check_trained_size(resolved.width, resolved.height, trained, "--allow-any-size to pixart serve")
        height, width = self.pipe.sample_size_for(resolved)
        pixels = max(resolved.width * resolved.height, width * height)
        if pixels > limits.max_pixels:
            raise PixArtError(
                f"{resolved.width} × {resolved.height} (sampled at {width} × {height}) is {pixels} pixels; "
                f"this server makes at most {limits.max_pixels} per image"
            )
        # Image-to-image runs only the last int(steps × strength) steps; a ControlNet runs its copied blocks
        # beside the model's, so a step costs (depth + copied) / depth of a plain one.
        steps = resolved.steps if resolved.strength is None else int(resolved.steps * resolved.strength)
        depth = self.pipe.model_config.depth
        blocks = depth + (images.controlnet.net.num_blocks if images.controlnet is not None else 0)
        work = math.ceil(pixels * steps * resolved.num_images * blocks / depth)
        if work > self.max_work:
            counted = f"{pixels} pixels × {steps} steps × {resolved.num_images} images"
            counted += f" × {blocks}/{depth} blocks (ControlNet)" if blocks > depth else ""
            raise PixArtError(
                f"{counted} is {work} pixel-steps of work; this server does at most {self.max_work} per request"
            )
        return options

    def lora_choice(self, value: object) -> tuple[tuple[str, float], ...]:
        """A request's ``loras`` (names, or [name, scale] pairs, among the loaded ones) as (name, scale) pairs."""
        if value is None:
            return ()
        loaded = ", ".join(self.loras) or "none: start the server with --lora"
        if not isinstance(value, list):
            raise PixArtError(f"loras must be a list of LoRA names or [name, scale] pairs, got {reprlib.repr(value)}")
        chosen = []
        for entry in value:
            name, scale = entry, None
            if isinstance(entry, list) and len(entry) == 2:
                name, scale = entry
            if not isinstance(name, str) or name not in self.loras:
                raise PixArtError(f"unknown LoRA {reprlib.repr(name)}; this server has: {loaded}")
            if scale is None:
                scale = self.loras[name].scale
            number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
            if not number or not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
                raise PixArtError(
                    f"the scale of LoRA {name!r} must be a number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, "
                    f"got {reprlib.repr(scale)}"
                )
            chosen.append((name, float(scale)))
        return tuple(chosen)

    @contextlib.contextmanager
    def _using(self, choice: tuple[tuple[str, float], ...], cancel: threading.Event | None):
        """Hold the transformer with these LoRAs merged; a different choice waits until no generation runs."""
        with self._choice_changed:
            while self._choice_users and self._choice != choice:
                if cancel is not None and cancel.is_set():
                    raise _Cancelled("stopped while waiting for its LoRAs")
                self._choice_changed.wait(0.1)
            if self._choice != choice:
                self._choice = None  # unknown until the switch is done, should it fail
                self._switch.use(choice)
                self.pipe.loras = tuple((self.loras[name].path, scale) for name, scale in choice)
                self._choice = choice
            self._choice_users += 1
        try:
            yield
        finally:
            with self._choice_changed:
                self._choice_users -= 1
                self._choice_changed.notify_all()

    def generate(
        self,
        prompt: str,
        options: "GenerationOptions",
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
        loras: tuple[tuple[str, float], ...] = (),
        images: RequestImages | None = None,
    ) -> list[tuple[Path, dict[str, str]]]:
        """Generate and save; returns each PNG's path and metadata. Waits for a slot, or raises ServerBusy.

        ``loras`` are (name, scale) pairs from :meth:`lora_choice`; ``images`` the request's image inputs
        (:func:`pixart.serve.inputs.read_images`). Once ``cancel`` is set, waiting or denoising stops within
        a step with :class:`_Cancelled`.
        """
        from pixart.inference.options import save_image

        images = images or RequestImages()

        def step(done: int, total: int) -> None:
            if cancel is not None and cancel.is_set():
                raise _Cancelled(f"stopped after {done} of {total} steps")
            if progress is not None:
                progress(done, total)

        with self._count_lock:
            if self._waiting >= self.limits.max_queue:
                raise ServerBusy(f"the server is busy ({self._waiting} requests waiting); retry in a moment")
            self._waiting += 1
        try:
            while not self._slots.acquire(timeout=0.1):
                if cancel is not None and cancel.is_set():
                    raise _Cancelled("stopped while waiting for a slot")
        finally:
            with self._count_lock:
                self._waiting -= 1
        try:
            with self._count_lock:
                self._running += 1
            with self._using(loras, cancel) if self._switch is not None else contextlib.nullcontext():
                made = self.pipe(
                    prompt,
                    options,
                    progress=step,
                    show_progress=False,
                    image=images.image,
                    mask=images.mask,
                    control=images.control,
                    controlnet=images.controlnet and images.controlnet.net,
                )
        finally:
            with self._count_lock:
                self._running -= 1
            self._slots.release()
        for image in made:  # the ControlNet came in loaded: name its file as `pixart generate --controlnet` does
            image.info.update(images.metadata())
        return [(save_image(image, self.out_dir), dict(image.info)) for image in made]

    def handle(
        self,
        client: str,
        read: Callable[[], tuple[object, dict]],
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[tuple[Path, dict[str, str]]]:
        """One request from either door, logged on one line: rate limit, ``read()`` → (prompt, fields), generate."""
        started, prompt, resolved = time.monotonic(), None, None
        outcome = "500 internal error"
        try:
            self.rate.admit(client)
            prompt, given = read()
            loras = self.lora_choice(given.pop("loras", None))
            images = read_images(given, self.limits.max_pixels, self.controlnets)
            options = self.options(prompt, images, **given)
            resolved = self.pipe.resolve(options)
            results = self.generate(prompt, options, progress, cancel, loras, images)
            outcome = "200 ok"
            return results
        except RateLimited:
            outcome = "429 rate limited"
            raise
        except ServerBusy:
            outcome = "503 busy"
            raise
        except _Cancelled as err:
            outcome = f"499 client gone, {err}"
            raise
        except PixArtError as err:
            outcome = f"400 {err}"
            raise
        finally:
            size = "-"
            if resolved is not None:
                size = f"{resolved.width}x{resolved.height} {resolved.steps} steps x{resolved.num_images}"
            said = f" prompt={prompt!r}" if self.log_prompts and isinstance(prompt, str) else ""
            log.info("%s %s %s %.2f s %s%s", utc_stamp(), client, size, time.monotonic() - started, outcome, said)

    def size_presets(self) -> dict[str, tuple[int, int]]:
        """Labels like "1024 × 768" → (width, height): the model's known sizes (:attr:`PixArtPipeline.known_sizes`:
        the demo's trained sizes, a release's aspect-ratio bins) within the pixel limit."""
        sizes = [(w, h) for w, h in self.pipe.known_sizes if w * h <= self.limits.max_pixels]
        return {f"{w} × {h}": (w, h) for w, h in sizes}

    def examples(self) -> tuple[str, tuple[str, ...]]:
        """Example prompts that fit the loaded model and what they are for: the demo's from its vocabulary, the
        released models' for a model reading T5-XXL features (a release or a fine-tune of one), else none."""
        if not self.pipe.names.get("model"):  # the bundled demo, or weights trained on it
            from pixart.demo.shapes import example_prompts

            return "the bundled demo (shapes, colours, places)", tuple(example_prompts())
        if self.pipe.model_config.caption_channels == RELEASED_TEXT_WIDTH:
            return "the released PixArt models", EXAMPLE_PROMPTS
        return "", ()

    def model_name(self) -> str:
        """The model as clients may see it: a hub id, or a local folder's own name, never a path of this machine."""
        name = self.pipe.names.get("model", "")
        if not name:
            return "the bundled demo"
        return Path(name).name if Path(name).exists() or Path(name).is_absolute() else name


def read_api_body(raw: bytes) -> tuple[object, dict]:
    """The prompt and the other fields of a ``POST /api/generate`` body; a PixArtError unless it is a JSON object."""

    def refuse_constant(name: str):
        raise PixArtError(f"{name} is not a JSON number; send a finite number")

    try:
        body = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise PixArtError('the body must be JSON, e.g. {"prompt": "a red fox"}') from None
    if not isinstance(body, dict):
        raise PixArtError('the body must be a JSON object with at least a "prompt"')
    return body.pop("prompt", None), body


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def api_response(results: list[tuple[Path, dict[str, str]]]) -> dict:
    """The JSON body of a successful ``POST /api/generate``: each saved PNG in base64 with its metadata."""
    return {
        "images": [
            {
                "png_base64": base64.b64encode(path.read_bytes()).decode("ascii"),
                "seed": int(info["seed"]),
                "metadata": info,
            }
            for path, info in results
        ]
    }


def build_ui(service: ImageService):
    """The Gradio page: the controls of the official PixArt demo, over :meth:`ImageService.generate`."""
    import gradio as gr

    from pixart.inference.image_inputs import DEFAULT_MASK_BLUR

    pipe, limits = service.pipe, service.limits
    presets = service.size_presets()
    side = pipe.model_config.sample_size * pipe.vae_factor
    square = f"{side} × {side}"
    default_size = square if square in presets else next(iter(presets), CUSTOM_SIZE)
    examples_for, examples = service.examples()
    default = default_sampler(pipe.scheduler_config, pipe.names.values())

    def generate(
        prompt,
        negative_prompt,
        size,
        width,
        height,
        num_images,
        sampler,
        steps,
        guidance,
        seed,
        randomize,
        binning,
        loras,
        editor=None,
        strength=0,
        mask_blur=DEFAULT_MASK_BLUR,
        control=None,
        control_type="none",
        control_scale=1.0,
        controlnet=None,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 - Gradio finds its progress tracker by this default
    ):
        w, h = presets.get(size, (width, height))
        fields = dict(
            negative_prompt=negative_prompt or None,
            sampler=sampler,
            steps=_whole(steps),
            guidance=guidance,
            seed=None if randomize else _whole(seed),
            width=_whole(w),
            height=_whole(h),
            num_images=_whole(num_images),
            binning=binning,
            loras=list(loras or []),
        )
        image, mask = editor_images(editor)
        if image is not None:  # strength 0 on the slider: the default (0.6, or 1 when inpainting)
            fields |= {"image": image, "mask": mask, "strength": strength or None}
            fields |= {"mask_blur": _whole(mask_blur)} if mask is not None else {}
        if control is not None:
            fields |= {"control": control, "control_type": control_type, "control_scale": control_scale}
            fields |= {"controlnet": controlnet or None}
        client = request.client.host if request.client else "?"
        progress(0, desc="waiting for a free slot")
        try:
            results = yield from _until_done(
                lambda step, cancel: service.handle(client, lambda: (prompt, fields), step, cancel), progress
            )
        except PixArtError as err:
            raise gr.Error(str(err), print_exception=False) from None
        # File paths, not PIL images: Gradio then serves the saved PNGs, metadata included, instead of re-encoding.
        gallery = [(str(path), f"seed {info['seed']}") for path, info in results]
        yield gallery, int(results[0][1]["seed"])

    def sampler_defaults(name):
        chosen = SAMPLERS.get(name, default)
        return chosen.steps, chosen.guidance

    # Gradio copies every returned file into its cache; an hourly sweep of copies older than an hour keeps a
    # long-running server's disk use bounded (the PNGs in out_dir are not touched).
    with gr.Blocks(title="PixArt", analytics_enabled=False, delete_cache=(3600, 3600)) as ui:
        gr.Markdown(f"# PixArt\nModel: `{service.model_name()}` ({pipe.model_config.family})")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=3,
                    max_length=limits.max_prompt_chars,
                    elem_id="prompt",
                    placeholder="describe the image",
                )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                size = gr.Dropdown(
                    list(presets) + [CUSTOM_SIZE],
                    value=default_size,
                    label="Size (width × height; the sizes the model was trained at)",
                )
                with gr.Row(visible=size.value == CUSTOM_SIZE) as custom:
                    width = gr.Number(side, precision=0, label="Width")
                    height = gr.Number(side, precision=0, label="Height")
                num_images = gr.Slider(1, limits.max_images, value=1, step=1, label="Images")
                with gr.Accordion("Advanced options", open=False):
                    negative = gr.Textbox(
                        label="Negative prompt",
                        max_length=limits.max_prompt_chars,
                        placeholder="empty: the model's null caption",
                    )
                    samplers = gr.Dropdown(list(SAMPLERS), value=default.name, label="Sampler")
                    steps = gr.Slider(1, limits.max_steps, value=default.steps, step=1, label="Steps")
                    guidance = gr.Slider(0, 20, value=default.guidance, step=0.1, label="Guidance (≤ 1 is off)")
                    with gr.Row():
                        seed = gr.Number(0, precision=0, label="Seed (image k uses seed + k)")
                        randomize = gr.Checkbox(True, label="Randomize seed")
                    binning = gr.Checkbox(True, label="Sample at the nearest trained aspect ratio, then resize")
                loras = gr.Dropdown(
                    list(service.loras),
                    value=[],
                    multiselect=True,
                    visible=bool(service.loras),
                    label="LoRAs (merged in the order chosen, each at its server scale)",
                )
                with gr.Accordion("Start from an image (image-to-image, inpainting)", open=False):
                    editor = gr.ImageEditor(
                        type="pil",
                        format="png",  # lossless: the image the model starts from is the one uploaded
                        sources=["upload", "clipboard"],
                        layers=False,
                        transforms=(),
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                        label="Input image, resized to the size above; paint over what to repaint (no paint: all)",
                        elem_id="input-image",
                    )
                    strength = gr.Slider(
                        0, 1, value=0, step=0.01, label="Strength (0: the default, 0.6; 1 where painted)"
                    )
                    mask_blur = gr.Slider(0, 64, value=DEFAULT_MASK_BLUR, step=1, label="Feather of the paint (px)")
                with gr.Accordion("Control image (ControlNet)", open=False, visible=bool(service.controlnets)):
                    with gr.Row():
                        control = gr.Image(type="pil", label="Control image", elem_id="control-image")
                        control_preview = gr.Image(
                            label="Control map", interactive=False, format="png", elem_id="control-map"
                        )
                    controlnet = gr.Dropdown(list(service.controlnets), value=next(iter(service.controlnets), None),
                                             label="ControlNet")  # fmt: skip
                    with gr.Row():
                        control_type = gr.Dropdown(list(CONTROL_TYPES), value="canny", label="Control map")
                        control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Control scale")
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="Images", columns=2, format="png", elem_id="gallery", buttons=["download", "fullscreen"]
                )
        if examples:
            gr.Examples([[p] for p in examples], inputs=[prompt], label=f"Examples for {examples_for}")
        inputs = [
            prompt,
            negative,
            size,
            width,
            height,
            num_images,
            samplers,
            steps,
            guidance,
            seed,
            randomize,
            binning,
            loras,
            editor,
            strength,
            mask_blur,
            control,
            control_type,
            control_scale,
            controlnet,
        ]
        run.click(generate, inputs, [gallery, seed], api_name="generate")
        prompt.submit(generate, inputs, [gallery, seed], api_visibility="private")
        samplers.change(sampler_defaults, samplers, [steps, guidance], api_visibility="private")
        size.change(lambda s: gr.Row(visible=s == CUSTOM_SIZE), size, custom, api_visibility="private")
        for changed in (control, control_type):
            changed.change(control_preview_of, [control, control_type], control_preview, api_visibility="private")
    return ui.queue(max_size=limits.max_queue, default_concurrency_limit=limits.concurrency)


def _until_done(work: Callable, progress):
    """Run ``work(step, cancel)`` in a thread for the page, yielding "no change" at each step and twice a second.

    Gradio stops a page's event when its tab closes only by closing the generator at a ``yield`` (a plain
    function would run to its end), so the page's generate is a generator: closed, it sets ``cancel``
    and the generation stops within a step, as the API's does when its client hangs up. Returns what
    ``work`` returned, or raises what it raised.
    """
    import gradio as gr

    steps: queue.SimpleQueue = queue.SimpleQueue()
    cancel = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work(lambda done, total: steps.put((done, total)), cancel)
        except BaseException as err:  # handed to the generator, which raises it in Gradio's thread
            outcome["error"] = err
        finally:
            steps.put(None)

    # A daemon: a server told to stop does not wait for a generation nobody will see.
    threading.Thread(target=run, name="pixart-page-generation", daemon=True).start()
    try:
        while True:
            try:
                step = steps.get(timeout=0.5)
            except queue.Empty:  # waiting for a slot: still give Gradio its chance to stop
                yield gr.skip(), gr.skip()
                continue
            if step is None:
                break
            progress(step, desc="denoising")  # from Gradio's thread: its progress tracker is found there
            yield gr.skip(), gr.skip()
    finally:
        cancel.set()  # the tab closed (GeneratorExit here); after the end it changes nothing
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def build_app(service: ImageService, access: Access | None = None):
    """The ``pixart serve`` ASGI app: ``POST /api/generate`` and ``GET /api/info``, the Gradio page at ``/``.

    Every request passes :class:`Guard` first (host, origin, token, content type, body size and deadline).
    """
    import gradio as gr
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    limits = service.limits
    access = access or Access(max_body=limits.max_body, body_timeout=limits.body_timeout)
    app = FastAPI(title="pixart", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/api/generate")
    async def api_generate(request: Request):
        try:
            raw = await request.body()
        except ClientDisconnect:  # the guard already answered (body too large or too slow), or the client left
            return JSONResponse({"error": "the request body did not arrive"}, 400)
        cancel = threading.Event()

        async def watch() -> None:  # a client that hangs up stops its generation within a step
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)
            cancel.set()

        watcher = asyncio.create_task(watch())
        client = request.client.host if request.client else "?"
        try:
            results = await run_in_threadpool(service.handle, client, lambda: read_api_body(raw), None, cancel)
        except RateLimited as err:
            return JSONResponse({"error": str(err)}, 429, {"retry-after": str(err.retry_after)})
        except ServerBusy as err:
            return JSONResponse({"error": str(err)}, 503, {"retry-after": "5"})
        except _Cancelled:
            return JSONResponse({"error": "the client disconnected"}, 499)
        except PixArtError as err:
            return JSONResponse({"error": str(err)}, 400)
        except Exception:  # a bug in pixart: keep its traceback in the log, keep the answer JSON
            log.exception("POST /api/generate failed")
            return JSONResponse({"error": "internal error while generating; see the server log"}, 500)
        finally:
            watcher.cancel()
        return api_response(results)

    @app.get("/api/info")
    def api_info():
        pipe = service.pipe
        return {
            "model": service.model_name(),
            "family": pipe.model_config.family,
            "samplers": list(SAMPLERS),
            "default_sampler": default_sampler(pipe.scheduler_config, pipe.names.values()).name,
            "sizes": [list(s) for s in service.size_presets().values()],
            "any_size": service.allow_any_size or not pipe.trained_sizes,
            "examples": list(service.examples()[1]),
            "loras": [{"name": lora.name, "scale": lora.scale} for lora in service.loras.values()],
            "image_inputs": ["image", "mask"] + (["control"] if service.controlnets else []),
            "controlnets": list(service.controlnets),
            "control_types": list(CONTROL_TYPES) if service.controlnets else [],
            "limits": {f.name: getattr(limits, f.name) for f in fields(limits)} | {"max_work": service.max_work},
            "waiting": service.waiting,
            "running": service.running,
        }

    def login(username: str, password: str) -> bool:  # any user name: the token is the password
        return access.token_matches(password)

    app = gr.mount_gradio_app(
        app,
        build_ui(service),
        path="/",
        allowed_paths=[str(service.out_dir.resolve())],
        ssr_mode=False,
        footer_links=["api"],
        max_file_size=limits.max_body,
        auth=login if access.token is not None else None,
        auth_message="Sign in with any user name and the server's token as the password.",
    )
    return Guard(app, access)


def control_preview_of(image, control_type: str):
    """The page's preview of the map the ControlNet will see, at the control image's own size."""
    if image is None:
        return None
    try:
        return control_map(image, control_type, *image.size)
    except PixArtError as err:
        import gradio as gr

        raise gr.Error(str(err), print_exception=False) from None


def _whole(value):
    """Gradio sliders and numbers send 20.0 for 20; pass anything else through for the options to judge."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
