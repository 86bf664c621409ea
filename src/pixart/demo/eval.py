"""Prompt-following score of a pipeline on the shapes demo: held-out prompts in, checker accuracies out.

The prompts (:func:`pixart.demo.shapes.held_out_prompts`) use only colour × shape pairs and shape pairs
the training split never shows, so the score measures composition, not memory. Images come from the
ordinary :class:`pixart.inference.pipeline.PixArtPipeline`; the deterministic checker judges them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from pixart.demo.checker import Check, check, score
from pixart.demo.shapes import Prompt, held_out_prompts

TARGETS = {"single_colour": 95.0, "single_shape": 90.0, "single_position": 90.0, "pair_full": 70.0}
"""What the bundled demo model should reach (percent): the bar in docs/demo.md."""

ROWS = (
    ("single_colour", "one object: colour"),
    ("single_shape", "one object: shape"),
    ("single_position", "one object: position"),
    ("single_size", "one object: size"),
    ("single_all", "one object: all of colour, shape, position"),
    ("pair_colour", "two objects: both colours"),
    ("pair_shape", "two objects: both shapes"),
    ("pair_relation", "two objects: relation"),
    ("pair_full", "two objects: fully correct"),
)


@dataclass(frozen=True)
class Evaluation:
    """The scores of one evaluation and what produced them."""

    scores: dict[str, float]
    """Accuracies in percent and counts, as :func:`pixart.demo.checker.score` returns them."""
    prompts: list[Prompt]
    images: list[Image.Image]
    checks: list[Check]

    def meets_targets(self) -> bool:
        return all(self.scores.get(k, 0.0) >= v for k, v in TARGETS.items())


def evaluate(pipe, n_prompts: int = 200, *, seed: int = 0, progress: Callable[[int, int], None] | None = None,
             processes=None, **options) -> Evaluation:  # fmt: skip
    """Generate one image per held-out prompt (image i with seed + i) and score them.

    ``options`` are :class:`pixart.inference.options.GenerationOptions` fields (steps, sampler, guidance,
    batch_size, …). The same (pipeline, n_prompts, seed, options) always give the same scores.
    ``processes`` (:func:`pixart.inference.distributed.join`): each launched process makes and checks its share
    of the images, and every process gets the whole evaluation, as one process makes it.
    """
    prompts = held_out_prompts(n_prompts, seed=seed)
    # The model's own text length: padding further changes nothing (padding is masked) but costs time.
    options.setdefault("max_tokens", pipe.model_config.model_max_length)
    texts = [p.text for p in prompts]
    if processes is None:
        images = pipe(texts, seed=seed, progress=progress, show_progress=False, **options)
        checks = [check(image, p.scene) for image, p in zip(images, prompts, strict=True)]
    else:
        from pixart.inference.distributed import generate_share
        from pixart.inference.options import GenerationOptions

        run = GenerationOptions(seed=seed, **options)
        share, images = generate_share(pipe, texts, run, processes, progress=progress, show_progress=False)
        # Each process checks its own images (the checker is deterministic), then each has every verdict.
        checks = [check(image, p.scene) for image, p in zip(images, prompts[share.start : share.stop], strict=True)]
        images, checks = processes.gather(images), processes.gather(checks)
    return Evaluation(score(checks), prompts, images, checks)


def format_table(scores: dict[str, float]) -> str:
    """The scores as an aligned text table, with the demo's targets beside the scores that have one."""
    lines = [f"{'metric':<44} {'score':>7}  target"]
    for key, label in ROWS:
        if key in scores:
            target = f">= {TARGETS[key]:.0f}%" if key in TARGETS else ""
            lines.append(f"{label:<44} {scores[key]:>6.1f}%  {target}")
    lines.append(f"{'prompts (one object / two objects)':<44} {int(scores['n_single'])} / {int(scores['n_pair'])}")
    return "\n".join(lines)
