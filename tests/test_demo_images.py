"""The demo's image-conditioned numbers (pixart.demo.eval_images) and the shipped demo ControlNet."""

import numpy as np
import pytest
from PIL import Image

from pixart.demo import BUNDLED_CONTROLNETS
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
def test_img2img_scores_each_scene(demo):
    scores = img2img_scores(demo, n=2, seed=0, steps=4)
    assert scores["n_single"] + scores["n_pair"] == 2 and 0 <= scores["in_box"] <= 100


@needs_demo
@pytest.mark.skipif(not BUNDLED_CONTROLNETS["demo-canny"].is_file(), reason="the demo ControlNet is not shipped")
def test_shipped_controlnet_loads_by_name_and_steers(demo):
    from pixart.checkpoints.controlnet import load_controlnet

    net = load_controlnet("demo-canny", demo.model_config)
    assert net.config == demo.model_config
    prompt, scene = rendered(1, seed=0)[0]
    run = {"seed": 0, "steps": 4, "show_progress": False, "control": scene, "control_type": "canny"}
    steered = demo(prompt.text, controlnet="demo-canny", **run)[0]
    unsteered = demo(prompt.text, controlnet="demo-canny", control_scale=0, **run)[0]
    plain = demo(prompt.text, seed=0, steps=4, show_progress=False)[0]
    assert unsteered.tobytes() == plain.tobytes()  # scale 0 is the base model
    assert steered.tobytes() != plain.tobytes()
    assert steered.info["controlnet"] == "demo-canny"
