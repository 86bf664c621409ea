"""Layout control maps: the map marks the foreground of a plain-background image and a feature cache holds its
latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw

from pixart.demo.shapes import make_sample
from pixart.inference.control import control_map
from pixart.train.cache import build_cache, open_cache
from pixart.train.data import open_dataset, to_tensor
from tiny import save_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def gradient(width: int = 64, height: int = 64) -> Image.Image:
    """A pale background that darkens by 30 levels from left to right, like the shapes data's gradients."""
    ramp = np.linspace(235, 205, width)[None, :, None]
    return Image.fromarray(np.broadcast_to(ramp, (height, width, 3)).round().astype(np.uint8))


def test_layout_marks_the_foreground_white_on_black_and_a_bare_background_black():
    scene = gradient()
    ImageDraw.Draw(scene).rectangle((10, 20, 29, 39), fill=(40, 90, 220))  # 20 × 20 px, corners inclusive
    layout = np.asarray(control_map(scene, "layout", 64, 64))
    assert layout.shape == (64, 64, 3) and set(np.unique(layout)) == {0, 255}
    assert (layout[..., 0] == layout[..., 2]).all()
    white = layout[..., 0] == 255
    grown = np.zeros((64, 64), bool)
    grown[19:41, 9:31] = True  # the rectangle and one more pixel around it (LAYOUT_DILATION at 64 px)
    assert white[20:40, 10:30].all() and not white[~grown].any()
    assert not np.asarray(control_map(gradient(), "layout", 64, 64)).any()  # a 30-level gradient is no shape


def test_layout_of_rendered_scenes_covers_each_shape_and_nothing_outside_its_box():
    for i in range(60):
        sample = make_sample(11, i, ((64, 64), (96, 64)), pairs=0.75)
        width, height = sample.image.size
        white = np.asarray(control_map(sample.image, "layout", width, height))[..., 0] == 255
        boxes = np.zeros_like(white)
        for obj in sample.scene.objects:
            x0, y0, x1, y1 = obj.bbox
            boxes[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
            inside = white[y0:y1, x0:x1].mean()
            assert inside > 0.4, (i, obj, inside)  # a triangle fills half its box, a cross 5/9
            assert white[(y0 + y1) // 2, (x0 + x1) // 2] or obj.shape == "triangle", (i, obj)
        assert not white[~boxes].any(), (i, sample.text)


def test_a_feature_cache_holds_the_layout_maps_latents(tmp_path):
    pipe = save_pipeline(tmp_path / "alpha", "alpha")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        sample = make_sample(4, i, ((64, 64),))
        sample.image.save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(sample.text)
    build_cache(pipe, open_dataset(images), tmp_path / "cache", resolution=256, max_tokens=120, control="layout")
    cache = open_cache(tmp_path / "cache")
    batch, _ = cache.load_batch(1.0, cache.groups[1.0], [False] * 3)
    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae").eval()
    maps = []
    for key in batch["key"]:  # the cache sees each 64-px image at its 256-px bucket size
        image = Image.open(images / key).convert("RGB").resize((256, 256), Image.BICUBIC)
        maps.append(to_tensor(control_map(image, "layout", 256, 256)))
        assert maps[-1].max() == 1 and maps[-1].min() == -1  # a map with both foreground and background
    with torch.no_grad():
        expected = vae.encode(torch.stack(maps)).latent_dist.mean
    torch.testing.assert_close(batch["control_mean"], expected, rtol=1e-4, atol=1e-5)
