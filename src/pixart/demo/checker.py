"""Deterministic prompt-following checker for the shapes demo: colour and geometry, no learned model.

Pixels that are strongly saturated belong to objects (backgrounds of the dataset never are); hue names
their colour. Connected regions are objects; two moments of their pixels name the shape (skewness
singles out the apex-up triangle, weight off the axes orders square > circle > cross); bounding-box
centres give position and relation. Every threshold sits in the middle of a gap between the values
the generator's own images take, measured clean and blurred with noise, so the blur and noise of a
small generative model move the features without crossing it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pixart.demo.shapes import COLOURS, MIN_SIDE, SIZE_THRESHOLD, Scene
from pixart.errors import PixArtError

MIN_SATURATION, MIN_VALUE = 0.45, 0.3  # backgrounds stay below saturation 0.2, objects above 0.8, value 0.85
MIN_AREA = 0.004  # of the shorter side squared; the smallest object covers about 0.02
SINGLE_COLOUR_SHARE = 0.75  # a region with less of one colour is two touching objects, split by colour
CENTRE_RADIUS = 0.12  # offset / side below which a lone object is central; generator: centre ≤ 0.04, else ≥ 0.2
TRIANGLE_SKEW = -0.28  # skewness of y: apex-up triangle -0.57, symmetric shapes 0; seen ≤ -0.40 vs ≥ -0.15
SQUARE_CORNERS, CIRCLE_CORNERS = 0.80, 0.53  # E[x²y²]/(E[x²]E[y²]): square ≥ 0.88, circle 0.62-0.72, cross ≤ 0.45

_HUES = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class Blob:
    """An object found in an image."""

    colour: str
    shape: str
    size: str
    bbox: tuple[int, int, int, int]
    """(x0, y0, x1, y1) in pixels, x1 and y1 exclusive."""
    area: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass(frozen=True)
class Check:
    """Per-attribute verdict on one image. `position` is None for two objects, `relation` for one."""

    objects: int
    """How many objects were found (extra ones are reported, not penalised)."""
    colour: bool
    shape: bool
    size: bool
    position: bool | None
    relation: bool | None

    @property
    def correct(self) -> bool:
        """Colour, shape and position (one object) or relation (two) all right; size is scored apart."""
        placed = self.position if self.relation is None else self.relation
        return self.colour and self.shape and bool(placed)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value of an (H, W, 3) float image in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    spread = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, spread / np.maximum(value, 1e-6), 0)
    safe = np.maximum(spread, 1e-6)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    return (hue * 60) % 360, saturation, value


def _components(mask: np.ndarray) -> np.ndarray:
    """Labels 4-connected regions of `mask` 0..n-1 (-1 outside): min-label propagation with pointer jumping."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, none).ravel()
        # every label is the index of a pixel in the same region, so following it stays in the region
        inside = new < none
        new[inside] = new[new[inside]]
        new = new.reshape(h, w)
        if np.array_equal(new, labels):
            break
        labels = new
    out = np.full((h, w), -1)
    out[mask] = np.unique(labels[mask], return_inverse=True)[1]
    return out


def _shape(ys: np.ndarray, xs: np.ndarray) -> str:
    """Names the shape from moments of its pixels, which blur and ragged edges hardly move."""
    y, x = ys - ys.mean(), xs - xs.mean()
    vy, vx = (y * y).mean(), (x * x).mean()
    skew = (y**3).mean() / max(vy, 1e-6) ** 1.5  # apex-up triangle -0.57, symmetric shapes 0
    if skew <= TRIANGLE_SKEW:
        return "triangle"
    corners = (x * x * y * y).mean() / max(vx * vy, 1e-6)  # weight off the axes: square 1, disc 2/3, cross 0.32
    return "square" if corners >= SQUARE_CORNERS else "circle" if corners >= CIRCLE_CORNERS else "cross"


def detect(image: Image.Image) -> list[Blob]:
    """The objects in `image`, largest first."""
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise PixArtError(f"image size {width}x{height} is too small to check: each side must be ≥ {MIN_SIDE}")
    hue, saturation, value = _hsv(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    mask = (saturation >= MIN_SATURATION) & (value >= MIN_VALUE)
    distance = np.abs(hue[..., None] - _HUES)
    colour = np.argmin(np.minimum(distance, 360 - distance), axis=-1)
    side = min(width, height)
    min_area = MIN_AREA * side * side

    regions = []
    labels = _components(mask)
    for k in np.flatnonzero(np.bincount(labels[mask]) >= min_area):
        region = labels == k
        votes = np.bincount(colour[region], minlength=len(_NAMES))
        if votes.max() >= SINGLE_COLOUR_SHARE * votes.sum():
            regions.append((region, int(votes.argmax())))
            continue
        for c in np.flatnonzero(votes >= min_area):
            sub = _components(region & (colour == c))
            regions += [(sub == j, int(c)) for j in np.flatnonzero(np.bincount(sub[sub >= 0]) >= min_area)]

    blobs = []
    for region, c in regions:
        ys, xs = np.nonzero(region)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1]) / side
        size = "large" if extent >= SIZE_THRESHOLD else "small"
        blobs.append(Blob(_NAMES[c], _shape(ys, xs), size, bbox, len(ys)))
    return sorted(blobs, key=lambda b: -b.area)


def position_of(blob: Blob, width: int, height: int) -> str:
    """Where a lone object sits: its dominant offset from the image centre, or the centre."""
    cx, cy = blob.centre
    u, v = cx / width - 0.5, cy / height - 0.5
    if max(abs(u), abs(v)) < CENTRE_RADIUS:
        return "centre"
    if abs(u) >= abs(v):
        return "left" if u < 0 else "right"
    return "top" if v < 0 else "bottom"


def relation_of(a: Blob, b: Blob) -> str:
    """How `a` stands to `b`, along the axis where their centres differ most."""
    dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def check(image: Image.Image, target: Scene) -> Check:
    """Whether `image` shows `target`, attribute by attribute.

    One object: the largest object found is judged. Two: each target object is the largest object of
    its colour; colour is right when both colours are found, shape and size when both match too.
    """
    blobs = detect(image)
    if len(target.objects) == 1:
        want = target.objects[0]
        if not blobs:
            return Check(0, False, False, False, False, None)
        got = blobs[0]
        at = position_of(got, *image.size)
        right = (got.colour == want.colour, got.shape == want.shape, got.size == want.size, at == want.position)
        return Check(len(blobs), *right, None)
    found = [next((b for b in blobs if b.colour == o.colour), None) for o in target.objects]
    if None in found:
        return Check(len(blobs), False, False, False, None, False)
    shape = all(b.shape == o.shape for b, o in zip(found, target.objects, strict=True))
    size = all(b.size == o.size for b, o in zip(found, target.objects, strict=True))
    return Check(len(blobs), True, shape, size, None, relation_of(*found) == target.relation)


def score(results: Iterable[Check]) -> dict[str, float]:
    """Accuracies in percent: ``single_*`` over one-object checks, ``pair_*`` over two-object checks.

    ``single_all`` and ``pair_full`` need colour, shape and position/relation right together. Size is
    reported apart; it means something only for prompts that state sizes. Counts are ``n_single`` and
    ``n_pair``; the keys of a kind with no checks are left out.
    """
    results = list(results)
    single = [r for r in results if r.relation is None]
    pair = [r for r in results if r.relation is not None]

    def pct(rs: list[Check], attribute: str) -> float:
        return 100.0 * sum(bool(getattr(r, attribute)) for r in rs) / len(rs)

    out: dict[str, float] = {"n_single": len(single), "n_pair": len(pair)}
    if single:
        for attribute in ("colour", "shape", "size", "position"):
            out[f"single_{attribute}"] = pct(single, attribute)
        out["single_all"] = pct(single, "correct")
    if pair:
        for attribute in ("colour", "shape", "size", "relation"):
            out[f"pair_{attribute}"] = pct(pair, attribute)
        out["pair_full"] = pct(pair, "correct")
    return out
