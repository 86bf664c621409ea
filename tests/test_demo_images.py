"""The demo's image-conditioned numbers (pixart.demo.eval_images): held-out scenes, placement, inpainting."""

import numpy as np
import pytest
from PIL import Image

from pixart.demo.eval_images import img2img_scores, in_box, inpaint_scores, recoloured, rendered
from pixart.inference.pipeline import DEMO_MODEL, PixArtPipeline

needs_demo = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="no bundled demo model")


@pytest.fixture(scope="module")
def demo() -> PixArtPipeline:
    return PixArtPipeline.from_pretrained(None, device="cpu")


def test_rendered_scenes_are_held_out_and_their_shapes_sit_in_their_boxes():
    scenes = rendered(6, seed=1)
    assert [p.text for p, _ in scenes] == [p.text for p, _ in rendered(6, seed=1)]
    for prompt, image in scenes:
        assert image.size == (64, 64) and all(o.bbox is not None for o in prompt.scene.objects)
        assert in_box(image, prompt.scene)  # the renderer's own image is the checker's ground truth
        # Rolled by half the image, every shape leaves its box.
        moved = Image.fromarray(np.roll(np.asarray(image), 32, axis=(0, 1)))
        assert not in_box(moved, prompt.scene)
    pairs = rendered(5, seed=1, pairs_only=True)
    assert len(pairs) == 5 and all(len(p.scene.objects) == 2 for p, _ in pairs)


def test_recoloured_scene_takes_a_colour_none_of_its_shapes_has():
    for prompt, _ in rendered(20, seed=2):
        new = recoloured(prompt.scene, seed=3)
        assert new.objects[0].colour not in {o.colour for o in prompt.scene.objects}
        assert new.objects[0].bbox == prompt.scene.objects[0].bbox and new.objects[1:] == prompt.scene.objects[1:]


@needs_demo
def test_inpainting_keeps_every_pixel_outside_the_mask(demo):
    scores = inpaint_scores(demo, n=2, seed=0, steps=4)
    assert scores["kept"] == 100.0 and scores["n_pair"] == 2


@needs_demo
def test_img2img_scores_are_reproducible_and_judge_the_recoloured_scene(demo):
    scores = img2img_scores(demo, n=3, seed=0, steps=4)
    assert scores == img2img_scores(demo, n=3, seed=0, steps=4)  # seeded: the same numbers every run
    assert scores["n_single"] + scores["n_pair"] == 3
    # The input itself fails the recoloured target (its first shape has the old colour), passes its own scene.
    prompt, image = rendered(1, seed=0)[0]
    assert in_box(image, prompt.scene) and not in_box(image, recoloured(prompt.scene, seed=0))
