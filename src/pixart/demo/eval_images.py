"""Demo numbers for image-conditioned generation: ControlNet placement, inpainting and image-to-image.

Every measurement starts from held-out scenes (:func:`pixart.demo.shapes.held_out_prompts`) drawn by the shapes
renderer, whose ground truth boxes say where each shape is, and scores the generated images with the deterministic
checker (:mod:`pixart.demo.checker`):

- ControlNet: the scene's caption alone, then with the control map of the rendered scene. Beside the checker's
  position and relation (coarse words a caption already states), ``in_box`` asks the finer question a control
  map answers: does each shape's centre land inside its box in the rendered scene? With ``--unplaced`` the
  captions leave out where the shapes are ("a red circle and a blue square"), so only the map can say it.
- inpainting: a two-shape scene with the first shape's box masked and the caption naming a new colour for it.
  The checker judges the repainted scene; ``kept`` counts images whose pixels outside the mask equal the input's
  byte for byte (mask_blur 0).
- image-to-image at strength 0.6: the rendered scene with a caption that recolours its first shape.

    python -m pixart.demo.eval_images [--controlnet demo-layout] [--control-type layout] [--unplaced] [--prompts 50]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from pixart.demo.checker import Check, check, detect, score
from pixart.demo.shapes import COLOURS, Prompt, Scene, caption, held_out_prompts, render

SIZE = 64
"""The demo model's training size: scenes are drawn and generated at 64 × 64 px."""
MEASUREMENTS = ("plain", "control", "inpaint", "img2img")
"""What main measures: captions alone (the ControlNet's baseline), with control maps, inpainting, image-to-image."""
MASK_MARGIN = 2
"""Pixels the inpainting mask adds around a shape's box, so its anti-aliased rim is repainted too."""


def rendered(n: int, seed: int, pairs_only: bool = False) -> list[tuple[Prompt, Image.Image]]:
    """Held-out prompts with their scenes drawn (the scenes carry their boxes); the same arguments, the same list."""
    prompts = held_out_prompts(n if not pairs_only else 4 * n, seed=seed)
    if pairs_only:
        prompts = [p for p in prompts if len(p.scene.objects) == 2][:n]
    out = []
    for i, p in enumerate(prompts):
        image, scene = render(p.scene, SIZE, SIZE, np.random.default_rng([seed, i, 0xD4A]))
        out.append((Prompt(p.text, scene), image))
    return out


def in_box(image: Image.Image, scene: Scene) -> bool:
    """Whether, for every shape of the scene, the largest found object of its colour has its centre in its box."""
    blobs = detect(image)
    for obj in scene.objects:
        blob = next((b for b in blobs if b.colour == obj.colour), None)
        x0, y0, x1, y1 = obj.bbox
        if blob is None or not (x0 <= blob.centre[0] <= x1 and y0 <= blob.centre[1] <= y1):
            return False
    return True


def recoloured(scene: Scene, seed: int) -> Scene:
    """The scene with its first shape in another colour than any of its shapes (drawn from the seed)."""
    used = {o.colour for o in scene.objects}
    colour = np.random.default_rng(seed).choice([c for c in COLOURS if c not in used])
    return replace(scene, objects=(replace(scene.objects[0], colour=str(colour)), *scene.objects[1:]))


def summary(checks: list[Check], placed: list[bool], **extra: float) -> dict[str, float]:
    """The checker's scores with the share of images whose shapes sit in their boxes, all in percent."""
    return {**score(checks), "in_box": 100.0 * sum(placed) / len(placed), **extra}


def control_scores(
    pipe,
    controlnet=None,
    n: int = 100,
    seed: int = 0,
    scale: float = 1.0,
    control_type: str = "canny",
    unplaced: bool = False,
    **options,
) -> dict[str, float]:
    """Checker scores of the scenes' captions, steered by the control maps of the rendered scenes through
    ``controlnet`` (None: the captions alone, the baseline); ``unplaced``: captions without position words."""
    checks, placed = [], []
    for i, (prompt, image) in enumerate(rendered(n, seed)):
        if controlnet is not None:
            options.update(control=image, controlnet=controlnet, control_scale=scale, control_type=control_type)
        text = caption(prompt.scene, np.random.default_rng([seed, i]), True, False) if unplaced else prompt.text
        result = pipe(text, seed=seed + i, show_progress=False, **options)[0]
        checks.append(check(result, prompt.scene))
        placed.append(in_box(result, prompt.scene))
    return summary(checks, placed)


def inpaint_scores(pipe, n: int = 100, seed: int = 0, **options) -> dict[str, float]:
    """Repaint the first shape of two-shape scenes in a new colour; score the new scene and the kept pixels."""
    checks, placed, kept = [], [], []
    for i, (prompt, image) in enumerate(rendered(n, seed, pairs_only=True)):
        target = recoloured(prompt.scene, seed + i)
        x0, y0, x1, y1 = target.objects[0].bbox
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).rectangle((x0 - MASK_MARGIN, y0 - MASK_MARGIN, x1 + MASK_MARGIN, y1 + MASK_MARGIN), 255)
        text = caption(target, np.random.default_rng([seed, i]), size_in_text=True)
        result = pipe(text, image=image, mask=mask, mask_blur=0, seed=seed + i, show_progress=False, **options)[0]
        outside = np.asarray(mask) == 0
        kept.append(bool(np.array_equal(np.asarray(result)[outside], np.asarray(image)[outside])))
        checks.append(check(result, target))
        placed.append(in_box(result, target))
    return summary(checks, placed, kept=100.0 * sum(kept) / len(kept))


def img2img_scores(pipe, n: int = 100, seed: int = 0, strength: float = 0.6, **options) -> dict[str, float]:
    """Image-to-image of rendered scenes with captions that recolour their first shape; the recoloured scene's
    checker scores (in_box: the shapes stayed where the input had them)."""
    checks, placed = [], []
    for i, (prompt, image) in enumerate(rendered(n, seed)):
        target = recoloured(prompt.scene, seed + i)
        text = caption(target, np.random.default_rng([seed, i]), size_in_text=True)
        result = pipe(text, image=image, strength=strength, seed=seed + i, show_progress=False, **options)[0]
        checks.append(check(result, target))
        placed.append(in_box(result, target))
    return summary(checks, placed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline folder (default: the bundled demo model)")
    parser.add_argument("--controlnet", help="ControlNet to measure (a file or a bundled name); omitted: skipped")
    parser.add_argument("--control-scale", type=float, default=1.0)
    parser.add_argument("--control-type", default="layout", help="how a scene becomes its control map (default layout)")
    parser.add_argument(
        "--unplaced", action="store_true", help="ControlNet prompts without position words: only the map says where"
    )
    parser.add_argument("--prompts", type=int, default=100, help="held-out scenes per measurement (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=MEASUREMENTS, action="append", help="(repeatable; default all)")
    args = parser.parse_args(argv)

    from pixart.inference.pipeline import PixArtPipeline

    pipe = PixArtPipeline.from_pretrained(args.model, device="cpu")
    only = set(args.only or MEASUREMENTS)
    results = {}
    if "plain" in only:
        results["plain"] = control_scores(pipe, None, args.prompts, args.seed, unplaced=args.unplaced)
    if "control" in only and args.controlnet:
        results["control"] = control_scores(
            pipe, args.controlnet, args.prompts, args.seed, args.control_scale, args.control_type, args.unplaced
        )
    if "inpaint" in only:
        results["inpaint"] = inpaint_scores(pipe, args.prompts, args.seed)
    if "img2img" in only:
        results["img2img"] = img2img_scores(pipe, args.prompts, args.seed)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
