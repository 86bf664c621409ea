"""The "shapes" demo dataset: procedural coloured shapes with captions and structured ground truth.

A sample holds one or two objects on a pale background. An object has a shape, a colour, a size and,
when alone, a position; two objects stand in a spatial relation. Every sample carries its ground truth,
so :mod:`pixart.demo.checker` can tell whether a generated image follows its prompt, and some
attribute combinations never appear in the training split, so evaluation can test compositional
generalisation (:func:`held_out_prompts`).

On disk it is a Hugging Face ``imagefolder``: PNGs plus ``metadata.jsonl`` with ``file_name``, the
caption ``text``, the class ``label`` for stage-1 pretraining and the structured fields.
"""

from __future__ import annotations

import colorsys
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pixart.errors import PixArtError
from pixart.files import disk_full_is_one_line, swap_into_place, temporary_folder

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": 0.0, "orange": 26.0, "yellow": 54.0, "green": 125.0, "blue": 220.0, "purple": 280.0}
"""Palette as HSV hue in degrees: at least 26° apart, so hue alone names the colour of a saturated pixel."""
SIZES = {"small": (0.20, 0.25), "large": (0.34, 0.40)}
"""Side of an object's square bounding box as a fraction of the image's shorter side."""
SIZE_THRESHOLD = 0.295
"""Where the checker splits small from large: the middle of the gap between the two ranges above."""
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "heldout")
FIELDS, VOCABULARY = ("shape", "colour", "size"), (SHAPES, tuple(COLOURS), tuple(SIZES))

HELD_OUT_OBJECTS = frozenset({("blue", "triangle"), ("yellow", "circle"), ("purple", "square"), ("orange", "cross")})
"""Colour × shape pairs never drawn in the training split. Each colour and shape still appears otherwise."""
HELD_OUT_SHAPE_PAIRS = frozenset({frozenset({"circle", "triangle"}), frozenset({"square", "cross"})})
"""Shapes that never share a two-object training image, in either order or relation."""

SUPERSAMPLE = 4  # shapes are drawn 4× larger and box-filtered down, for anti-aliased edges
MIN_SIDE, MAX_SIDE = 64, 1024  # below 64 px a small object is too few pixels for the checker
SIDE_MULTIPLE = 16  # VAE downsampling 8 × transformer patch 2
PAIR_PROBABILITY = 0.5
SIZE_IN_TEXT_PROBABILITY = 0.5

INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_WORDS = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the middle", "in the center"),
}
RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
SINGLE_TEMPLATES = (
    "{obj} {pos}",
    "there is {obj} {pos}",
    "{pos}, {obj}",
    "a picture of {obj} {pos}",
    "{obj} placed {pos}",
)
PAIR_TEMPLATES = (
    "{a} {rel} {b}",
    "there is {a} {rel} {b}",
    "two shapes: {a} {rel} {b}",
    "{a} and {b}, the {ca} one {rel} the {cb} one",
)
UNPLACED_SINGLE_TEMPLATES = ("{obj}", "there is {obj}", "a picture of {obj}")
UNPLACED_PAIR_TEMPLATES = ("{a} and {b}", "there is {a} and {b}", "two shapes: {a} and {b}")
"""Captions that leave out where the shapes are (no position or relation words): only a layout map can tell."""
POSITION_DROPOUT_STREAM = 0x9051
"""The random stream of a sample's position-dropout draw, apart from the one that draws its scene and caption, so
a data set written without position dropout is the one written before the option existed."""


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene: what it is and, once laid out, where it was drawn."""

    shape: str
    colour: str
    size: str
    position: str | None = None
    """Where a lone object sits (one of POSITIONS); None when the scene has two objects."""
    bbox: tuple[int, int, int, int] | None = None
    """(x0, y0, x1, y1) in pixels, x1 and y1 exclusive; None for a prompt that has not been drawn."""


@dataclass(frozen=True)
class Scene:
    """The structured ground truth of a sample, or the target of a prompt: validated on creation."""

    objects: tuple[SceneObject, ...]
    relation: str | None = None
    """How objects[0] stands to objects[1] (one of RELATIONS); None for one object."""

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise PixArtError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        for obj in self.objects:
            for field, value, accepted in zip(FIELDS, (obj.shape, obj.colour, obj.size), VOCABULARY, strict=True):
                if value not in accepted:
                    raise PixArtError(f"{field} {value!r} is not one of {', '.join(accepted)}")
        if len(self.objects) == 1:
            if self.objects[0].position not in POSITIONS:
                raise PixArtError(f"position {self.objects[0].position!r} is not one of {', '.join(POSITIONS)}")
            if self.relation is not None:
                raise PixArtError(f"relation {self.relation!r} needs two objects, the scene has one")
        else:
            if self.relation not in RELATIONS:
                raise PixArtError(f"relation {self.relation!r} is not one of {', '.join(RELATIONS)}")
            if any(o.position is not None for o in self.objects):
                raise PixArtError("position is for a lone object; two objects are placed by their relation")
            if self.objects[0].colour == self.objects[1].colour:
                raise PixArtError(f"two objects need different colours, both are {self.objects[0].colour!r}")

    @property
    def label(self) -> str:
        """The class name for stage-1 pretraining: colour and shape of the first object."""
        return f"{self.objects[0].colour} {self.objects[0].shape}"

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Reads the structured fields of a metadata row (extra keys such as ``text`` are ignored)."""
        objects = []
        try:
            for o in data["objects"]:
                bbox = tuple(int(v) for v in o["bbox"]) if o.get("bbox") is not None else None
                objects.append(SceneObject(o["shape"], o["colour"], o["size"], o.get("position"), bbox))
        except KeyError as err:
            raise PixArtError(f"scene {data!r} has no {err.args[0]!r}: need objects with shape, colour, size") from None
        return cls(tuple(objects), data.get("relation"))


@dataclass(frozen=True)
class Sample:
    """One generated image with its caption and ground truth."""

    image: Image.Image
    scene: Scene
    text: str
    size_in_text: bool
    """Whether the caption states the sizes; when it does not, any size follows the prompt."""
    position_in_text: bool = True
    """Whether the caption says where the shapes are (position or relation words)."""


@dataclass(frozen=True)
class Prompt:
    """An evaluation prompt and the scene the checker expects an image of it to show."""

    text: str
    scene: Scene


def is_held_out(scene: Scene) -> bool:
    """True if the scene uses a combination the training split never shows."""
    if any((o.colour, o.shape) in HELD_OUT_OBJECTS for o in scene.objects):
        return True
    return len(scene.objects) == 2 and frozenset(o.shape for o in scene.objects) in HELD_OUT_SHAPE_PAIRS


def sample_scene(rng: np.random.Generator, split: str, pairs: float = PAIR_PROBABILITY) -> Scene:
    """Draws a random scene (without layout) belonging to `split`, by rejection; two objects with probability
    `pairs`."""
    check_split(split)
    colours = list(COLOURS)
    while True:
        if rng.random() < pairs:
            ca, cb = rng.choice(len(colours), size=2, replace=False)
            objects = tuple(
                SceneObject(SHAPES[rng.integers(len(SHAPES))], colours[c], tuple(SIZES)[rng.integers(2)])
                for c in (ca, cb)
            )
            scene = Scene(objects, RELATIONS[rng.integers(len(RELATIONS))])
        else:
            obj = SceneObject(
                SHAPES[rng.integers(len(SHAPES))],
                colours[rng.integers(len(colours))],
                tuple(SIZES)[rng.integers(2)],
                POSITIONS[rng.integers(len(POSITIONS))],
            )
            scene = Scene((obj,))
        if is_held_out(scene) == (split == "heldout"):
            return scene


def _layout(scene: Scene, width: int, height: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(centre x, centre y, side) of each object, far enough from the decision boundaries of the checker."""
    m = min(width, height)
    margin, gap, jitter = 0.04 * m, 0.08 * m, 0.04 * m
    sides = [rng.uniform(*SIZES[o.size]) * m for o in scene.objects]
    if len(scene.objects) == 1:
        s = sides[0]
        cx = width / 2 + rng.uniform(-jitter, jitter)
        cy = height / 2 + rng.uniform(-jitter, jitter)
        position = scene.objects[0].position
        if position in ("left", "right"):
            cx = rng.uniform(margin + s / 2, 0.3 * width)
            cx = width - cx if position == "right" else cx
        elif position in ("top", "bottom"):
            cy = rng.uniform(margin + s / 2, 0.3 * height)
            cy = height - cy if position == "bottom" else cy
        return [(cx, cy, s)]
    horizontal = scene.relation in ("left of", "right of")
    length = width if horizontal else height
    first_low = scene.relation in ("left of", "above")  # objects[0] has the smaller coordinate
    low, high = (sides[0], sides[1]) if first_low else (sides[1], sides[0])
    a_low = rng.uniform(margin + low / 2, length / 2 - gap / 2 - low / 2)
    a_high = length - rng.uniform(margin + high / 2, length / 2 - gap / 2 - high / 2)
    along = (a_low, a_high) if first_low else (a_high, a_low)
    across_mid = (height if horizontal else width) / 2
    boxes = []
    for a, s in zip(along, sides, strict=True):
        b = across_mid + rng.uniform(-jitter, jitter)
        boxes.append((a, b, s) if horizontal else (b, a, s))
    return boxes


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A pale, desaturated (H, W, 3) float image: flat, a linear or radial gradient, with light noise."""

    def tint() -> np.ndarray:
        return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.12), rng.uniform(0.7, 0.97)), np.float32)

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        t = np.zeros((height, width), np.float32)
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        t = x / width * np.cos(angle) + y / height * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        t = np.hypot(x - cx, y - cy)
        t = t / max(float(t.max()), 1e-6)
    image = tint() * (1 - t[..., None]) + tint() * t[..., None]
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0, 3) / 255)
    return np.clip(image, 0, 1)


def _coverage(shape: str, cx: float, cy: float, side: float, width: int, height: int) -> np.ndarray:
    """How much of each pixel the shape covers, (H, W) in [0, 1]."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (width * k, height * k), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (cx - side / 2) * k, (cy - side / 2) * k, (cx + side / 2) * k, (cy + side / 2) * k
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx * k, y0)], fill=255)
    else:  # cross: arms a third of the side thick, so it is clearly concave even when blurred
        t = side * k / 6
        draw.rectangle((cx * k - t, y0, cx * k + t, y1), fill=255)
        draw.rectangle((x0, cy * k - t, x1, cy * k + t), fill=255)
    return np.asarray(canvas.resize((width, height), Image.BOX), dtype=np.float32) / 255


def render(scene: Scene, width: int, height: int, rng: np.random.Generator) -> tuple[Image.Image, Scene]:
    """Draws `scene` at width × height; returns the image and the scene with each object's bbox."""
    check_size(width, height)
    canvas = _background(width, height, rng)
    placed = []
    for obj, (cx, cy, side) in zip(scene.objects, _layout(scene, width, height, rng), strict=True):
        hue = (COLOURS[obj.colour] + rng.uniform(-3, 3)) % 360 / 360
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0)), np.float32)
        alpha = _coverage(obj.shape, cx, cy, side, width, height)[..., None]
        canvas = canvas * (1 - alpha) + colour * alpha
        x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
        bbox = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
        placed.append(replace(obj, bbox=bbox))
    image = Image.fromarray(np.round(canvas * 255).astype(np.uint8), "RGB")
    return image, replace(scene, objects=tuple(placed))


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, rng: np.random.Generator, size_in_text: bool, position_in_text: bool = True) -> str:
    """One of several phrasings of `scene`; sizes are named only when `size_in_text`, the position of a lone shape
    or the relation of two only when `position_in_text`."""

    def noun(o: SceneObject) -> str:
        words = [SIZE_WORDS[o.size][rng.integers(2)]] if size_in_text else []
        return " ".join([*words, o.colour, o.shape])

    if not position_in_text:
        if len(scene.objects) == 1:
            template = UNPLACED_SINGLE_TEMPLATES[rng.integers(len(UNPLACED_SINGLE_TEMPLATES))]
            return template.format(obj=_a(noun(scene.objects[0])))
        a, b = scene.objects if rng.random() < 0.5 else scene.objects[::-1]
        template = UNPLACED_PAIR_TEMPLATES[rng.integers(len(UNPLACED_PAIR_TEMPLATES))]
        return template.format(a=_a(noun(a)), b=_a(noun(b)))
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        words = POSITION_WORDS[obj.position]
        template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
        return template.format(obj=_a(noun(obj)), pos=words[rng.integers(len(words))])
    a, b, relation = scene.objects[0], scene.objects[1], scene.relation
    if rng.random() < 0.5:  # say it the other way round: "B below A" for "A above B"
        a, b, relation = b, a, INVERSE[relation]
    template = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))]
    rel = RELATION_WORDS[relation][rng.integers(len(RELATION_WORDS[relation]))]
    rel = f"is {rel}" if "{ca}" in template else rel
    return template.format(a=_a(noun(a)), b=_a(noun(b)), rel=rel, ca=a.colour, cb=b.colour)


PLACES = ("none", "left", "right", "top", "bottom", "centre")
"""Where an object sits, as :func:`place_labels` tags a caption's bytes: "none" for bytes naming no object."""
RELATION_PLACES = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
                   "below": ("bottom", "top")}  # fmt: skip
"""The places of objects[0] and objects[1] a relation puts them in."""


def place_labels(text: str, scene: Scene) -> list[int]:
    """For each character of the caption `text` of `scene`, the index in PLACES of where the object it names sits.

    The words of an object's noun phrase ("small red circle", and "red" in "the red one") get its
    position when alone, or the side its relation gives it when paired ("above": first object top,
    second bottom); every other character gets "none". Colours differ within a scene, so the colour
    finds the object whatever the phrasing. Captions are ASCII, so characters are ByT5's byte tokens.
    """
    labels = [0] * len(text)
    if len(scene.objects) == 1:
        places = (scene.objects[0].position,)
    else:
        places = RELATION_PLACES[scene.relation]
    sizes = "|".join(word for words in SIZE_WORDS.values() for word in words)
    for obj, place in zip(scene.objects, places, strict=True):
        pattern = rf"\b(?:(?:{sizes}) )?{obj.colour} {obj.shape}\b|\bthe {obj.colour}(?= one\b)"
        for match in re.finditer(pattern, text):
            labels[match.start() : match.end()] = [PLACES.index(place)] * (match.end() - match.start())
    return labels


def make_sample(
    seed: int,
    index: int,
    sizes: tuple[tuple[int, int], ...],
    split: str = "train",
    pairs: float = PAIR_PROBABILITY,
    position_dropout: float = 0.0,
) -> Sample:
    """Sample `index` of the dataset with `seed`: the same arguments always give the same sample. Its caption
    leaves out where the shapes are with probability `position_dropout`; the image is the same either way."""
    rng = np.random.default_rng([seed, index])
    width, height = sizes[rng.integers(len(sizes))]
    image, scene = render(sample_scene(rng, split, pairs), width, height, rng)
    size_in_text = bool(rng.random() < SIZE_IN_TEXT_PROBABILITY)
    dropped = position_dropout > 0 and np.random.default_rng([seed, index, POSITION_DROPOUT_STREAM]).random() < (
        position_dropout
    )
    return Sample(image, scene, caption(scene, rng, size_in_text, not dropped), size_in_text, not dropped)


def held_out_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """`n` evaluation prompts built only from held-out combinations, each naming every attribute."""
    if not isinstance(n, int) or n < 1:
        raise PixArtError(f"number of prompts {n!r} must be a positive integer")
    if not isinstance(seed, int) or seed < 0:
        raise PixArtError(f"seed {seed!r} must be a non-negative integer")
    rng = np.random.default_rng([seed, 0x5EED])
    prompts = []
    for _ in range(n):
        scene = sample_scene(rng, "heldout")
        prompts.append(Prompt(caption(scene, rng, size_in_text=True), scene))
    return prompts


def example_prompts(n: int = 4, seed: int = 0) -> list[str]:
    """Prompts the demo learned to draw (captions of training-split scenes): the web page's examples."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng, "train"), rng, size_in_text=True) for _ in range(n)]


def check_size(width: int, height: int) -> None:
    for side in (width, height):
        if not (MIN_SIDE <= side <= MAX_SIDE and side % SIDE_MULTIPLE == 0):
            raise PixArtError(
                f"image size {width}x{height} is not accepted: each side must be a multiple of {SIDE_MULTIPLE} "
                f"from {MIN_SIDE} to {MAX_SIDE}"
            )


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise PixArtError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """Reads "64x64,128x96" (WIDTHxHEIGHT, comma-separated) into ((64, 64), (128, 96))."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise PixArtError(f"size {item.strip()!r} is not WIDTHxHEIGHT, e.g. 64x64 or 128x96")
        check_size(int(parts[0]), int(parts[1]))
        sizes.append((int(parts[0]), int(parts[1])))
    return tuple(sizes)


def metadata_row(sample: Sample, file_name: str, split: str) -> dict:
    """One line of metadata.jsonl: imagefolder's file_name and text, the class label, the ground truth."""
    width, height = sample.image.size
    row = {"file_name": file_name, "text": sample.text, "label": sample.scene.label, "width": width, "height": height}
    row |= sample.scene.to_dict() | {"size_in_text": sample.size_in_text, "position_in_text": sample.position_in_text}
    return row | {"split": split}


def write_dataset(
    out: str | os.PathLike,
    count: int,
    *,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((64, 64),),
    split: str = "train",
    pairs: float = PAIR_PROBABILITY,
    position_dropout: float = 0.0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Writes `count` samples as an imagefolder at `out`, all at once: a reader never sees half a dataset.
    Each drawn scene has two objects with probability `pairs`, else one. The split's rejection of
    combinations it must not show discards more pairs than single objects, so the written share of pairs
    is lower: about 38% for the default 0.5 and 65% for 0.75 in the train split. A caption leaves out where its
    shapes are with probability `position_dropout` (for a layout ControlNet: then only the image tells)."""
    if not isinstance(count, int) or count < 1:
        raise PixArtError(f"count {count!r} must be a positive integer")
    for name, value in (("pairs", pairs), ("position dropout", position_dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise PixArtError(f"{name} {value!r} must be a fraction from 0 to 1")
    if not isinstance(seed, int) or seed < 0:
        raise PixArtError(f"seed {seed!r} must be a non-negative integer")
    if not sizes:
        raise PixArtError("sizes is empty: give at least one WIDTHxHEIGHT, e.g. 64x64")
    for width, height in sizes:
        check_size(width, height)
    check_split(split)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PixArtError(f"output {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PixArtError(f"output folder {str(out)!r} is not empty: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(out.parent, f".{out.name}.")
    try:
        with disk_full_is_one_line(f"the shapes data set {out.name}", out.parent):
            digits = max(6, len(str(count - 1)))
            with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
                for i in tqdm(range(count), desc="shapes", unit="img", disable=not progress):
                    sample = make_sample(seed, i, tuple(sizes), split, pairs, position_dropout)
                    name = f"{i:0{digits}d}.png"
                    sample.image.save(tmp / name, compress_level=1)  # noisy backgrounds barely compress: save time
                    meta.write(json.dumps(metadata_row(sample, name, split)) + "\n")
            swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
