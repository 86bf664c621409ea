"""The image inputs of a server request: base64 images decoded within the server's limits, and its ControlNets.

A request's ``image`` (image-to-image), ``mask`` (inpainting: white = repaint) and ``control`` (a ControlNet's
control image) arrive as base64 PNG, JPEG or WebP, optionally as a ``data:`` URL, from the API, or as PIL images
from the page. Each is checked before its pixels are decoded: a header stating more pixels than the server
makes per image is refused there, so a small file that would decompress to gigabytes (a decompression bomb)
never does. The base64 text itself is bounded by the request body limit (:class:`pixart.serve.guard.Guard`).
"""

from __future__ import annotations

import base64
import binascii
import io
import reprlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageChops, ImageOps

from pixart.errors import PixArtError, first_line

if TYPE_CHECKING:
    from pixart.model.config import PixArtConfig
    from pixart.model.controlnet import PixArtControlNet

IMAGE_FIELDS = ("image", "mask", "control", "controlnet")
"""Request fields that are not GenerationOptions: the three images and the name of a loaded ControlNet."""
FORMATS = ("PNG", "JPEG", "WEBP")
"""What a request's image may be: what browsers and image libraries write; no format PIL parses with less care."""


@dataclass(frozen=True)
class ServedControlNet:
    """A ControlNet the server loaded at start, which requests with a control image steer by, chosen by name."""

    name: str
    path: str
    """As given on the command line: what the PNG metadata records, as ``pixart generate --controlnet`` does."""
    net: PixArtControlNet
    digest: str
    """SHA-256 of its file, recorded in the PNG so ``--from-png`` can tell the same weights."""

    @staticmethod
    def load(name: str, path: str, base: PixArtConfig, device, dtype) -> ServedControlNet:
        from pixart.checkpoints.controlnet import file_sha256, load_controlnet

        return ServedControlNet(name, path, load_controlnet(path, base, device=device, dtype=dtype), file_sha256(path))


@dataclass(frozen=True)
class RequestImages:
    """One request's image inputs, decoded; all None for text-to-image."""

    image: Image.Image | None = None
    mask: Image.Image | None = None
    control: Image.Image | None = None
    controlnet: ServedControlNet | None = None

    def metadata(self) -> dict[str, str]:
        """What the PNG records of the ControlNet: its path and hash, as ``pixart generate --controlnet`` records."""
        if self.controlnet is None:
            return {}
        return {"controlnet": self.controlnet.path, "controlnet_sha256": self.controlnet.digest}


def read_images(given: dict, max_pixels: int, controlnets: dict[str, ServedControlNet]) -> RequestImages:
    """Pop a request's image fields from ``given`` and decode them; a PixArtError (one line) for any bad one."""
    values = {name: given.pop(name, None) for name in IMAGE_FIELDS}
    if values["mask"] is not None and values["image"] is None:
        raise PixArtError("a mask needs the image it repaints: send it as image")
    chosen = None  # checked before any image is decoded: a refusal costs the server nothing
    if values["control"] is None:
        if values["controlnet"] is not None:
            raise PixArtError("controlnet needs a control image to steer by: send it as control")
        unused = [name for name in ("control_scale", "control_type") if given.get(name) is not None]
        if unused:
            raise PixArtError(f"{' and '.join(unused)} apply to a control image; send control or leave them out")
    else:
        chosen = choose_controlnet(values["controlnet"], controlnets)
    images = {name: decode_image(values[name], name, max_pixels) for name in ("image", "mask", "control")}
    return RequestImages(images["image"], images["mask"], images["control"], chosen)


def choose_controlnet(name: object, controlnets: dict[str, ServedControlNet]) -> ServedControlNet:
    """The loaded ControlNet a request names, or the only one loaded if it names none."""
    if not controlnets:
        raise PixArtError("this server has no ControlNet to steer by a control image (start it with --controlnet)")
    if name is None and len(controlnets) == 1:
        return next(iter(controlnets.values()))
    if name is None or not isinstance(name, str) or name not in controlnets:
        said = "no controlnet named" if name is None else f"unknown controlnet {reprlib.repr(name)}"
        raise PixArtError(f"{said}; this server has: {', '.join(controlnets)}")
    return controlnets[name]


def decode_image(value: object, what: str, max_pixels: int) -> Image.Image | None:
    """A request's image from base64 (or a data: URL) or a PIL image, at most ``max_pixels``; None if not given."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, str):
        image = _open(value, what)
    else:
        raise PixArtError(f"{what} must be a base64 PNG or JPEG image (or a data: URL), got {reprlib.repr(value)}")
    pixels = image.width * image.height
    if pixels > max_pixels:  # from the header alone: the pixels are not decoded yet
        raise PixArtError(
            f"{what} is {image.width} × {image.height} = {pixels} pixels; this server takes at most {max_pixels}"
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)  # as `pixart generate --image` reads a file: as a viewer shows it
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data past a valid header
        raise PixArtError(f"{what} cannot be decoded: {first_line(err)}") from None


def _open(text: str, what: str) -> Image.Image:
    """The image in base64 text, opened (its header read, its pixels not yet decoded)."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise PixArtError(f"{what} is a data: URL without base64 data; send data:image/png;base64,…")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PixArtError(f"{what} is not valid base64; send the image file's bytes in base64") from None
    try:
        return Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError as err:  # PIL's own bound, far above any server's max pixels
        raise PixArtError(f"{what} is too large: {first_line(err)}") from None
    except (OSError, ValueError, SyntaxError):  # PIL's UnidentifiedImageError is an OSError
        raise PixArtError(f"{what} is not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image") from None


def editor_images(value: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The input image and mask of the page's ``gr.ImageEditor``: its background, and white wherever the brush
    painted (any layer's alpha); no paint means no mask (image-to-image)."""
    if not value or value.get("background") is None:
        return None, None
    image = value["background"].convert("RGB")
    painted = [layer.getchannel("A") for layer in value.get("layers") or [] if layer.mode == "RGBA"]
    if not painted:
        return image, None
    mask = painted[0]
    for alpha in painted[1:]:
        mask = ImageChops.lighter(mask, alpha)
    mask = mask.point(lambda a: 255 if a else 0)
    return image, mask if mask.getextrema()[1] else None
