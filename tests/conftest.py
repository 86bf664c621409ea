"""Fixtures shared by test files."""

import numpy as np
import pytest
import torch
from PIL import Image

from pixart.cache import build_cache
from pixart.data import open_dataset
from tiny import save_pipeline


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one torch thread.

    Tiny models gain nothing from threads, and on a busy machine OpenMP spin-waiting makes them ~10× slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny α pipeline folder, 8 captioned images (two colours × four shades) and their feature cache."""
    root = tmp_path_factory.mktemp("train")
    pipe = save_pipeline(root / "pipe", "alpha")
    images = root / "images"
    images.mkdir()
    for i in range(8):
        colour = "red" if i % 2 else "blue"
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[..., 0 if colour == "red" else 2] = 120 + 30 * (i // 2)
        pixels[8:24, 8:24] = 255 - pixels[8:24, 8:24]  # some structure, not a flat field
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square, shade {i // 2}")
    cache = root / "cache"
    build_cache(pipe, open_dataset(images), cache, resolution=256, max_tokens=16, batch_size=8)
    return root, pipe, images, cache
