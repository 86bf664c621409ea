"""DreamBooth prior preservation (Ruiz et al. 2022, arXiv 2208.12242): class images and class batches.

Before training, the main process tops ``dreambooth.class_data`` up to ``num_class_images`` with images
the *base* model generates from ``class_prompt``: ``class-K.png`` from seed ``run.seed + K``, next to
``class-K.txt`` holding the prompt. Images already there are kept. During training every micro-batch of
instance images is followed by a class batch of the same size whose loss, times ``prior_loss_weight``,
is backpropagated in its own pass (:class:`PriorPreservation`, an :class:`pixart.train.preserve.Interleaved`
stream: a resumed run stays bit-identical and 1 or N processes train the same weights).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from pixart.errors import PixArtError
from pixart.files import atomic_write
from pixart.train.objective import DiffusionObjective
from pixart.train.preserve import Interleaved, open_side_batches

log = logging.getLogger(__name__)

CLASS_ORDER_STREAM = 1
"""Mixed into the run seed for the class data's shuffle, so it is not the instance order's permutation."""

NAME = re.compile(r"class-(\d+)\.png")


def class_folder(config) -> Path:
    """The class image folder, refused if it names a file."""
    folder = Path(config.dreambooth.class_data).expanduser()
    if folder.exists() and not folder.is_dir():
        raise PixArtError(
            f"dreambooth.class_data={config.dreambooth.class_data!r} is a file; expected a folder of class images "
            "(created if missing)"
        )
    return folder


def class_images(folder: Path) -> list[Path]:
    """The images in a class folder, as the dataset reader finds them (recursively, by extension)."""
    from pixart.train.data import IMAGE_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def make_class_images(config, accelerator, model, make_pipeline: Callable, max_tokens: int) -> None:
    """Top the class folder up with images of the base ``model`` on the main process while the others wait."""
    if accelerator.is_main_process:
        model.eval()
        # Only this process generates, and every process must keep the same global random state.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            generate_class_images(config, make_pipeline, max_tokens, show_progress=config.logging.progress)
    accelerator.wait_for_everyone()


def generate_class_images(config, make_pipeline: Callable, max_tokens: int, show_progress: bool = True) -> list[Path]:
    """Generate the class images ``class_data`` lacks with the pipeline ``make_pipeline()`` builds (called only
    if some are missing); returns the new PNG files. Each PNG and its caption appear atomically."""
    b = config.dreambooth
    folder = class_folder(config)
    folder.mkdir(parents=True, exist_ok=True)
    missing = b.num_class_images - len(class_images(folder))
    if missing <= 0:
        return []
    taken = [int(m.group(1)) for p in folder.glob("class-*.png") if (m := NAME.fullmatch(p.name))]
    start = max(taken, default=-1) + 1
    log.info("generating %d class images for %r into %s", missing, b.class_prompt, folder)
    pipe, size, written = make_pipeline(), config.data.image_size, []
    with tqdm(total=missing, desc="class images", unit="img", disable=not show_progress) as bar:
        for first in range(start, start + missing, b.sample_batch_size):
            count = min(b.sample_batch_size, start + missing - first)
            # Image k of a call uses seed + k, so class-K.png always comes from seed run.seed + K.
            images = pipe([b.class_prompt] * count, seed=config.run.seed + first, steps=b.sample_steps,
                          guidance=b.guidance_scale, width=size, height=size, binning=False, max_tokens=max_tokens,
                          batch_size=count, show_progress=False)  # fmt: skip
            for k, image in enumerate(images):
                written.append(write_class_image(image, folder / f"class-{first + k:05d}.png", b.class_prompt))
                bar.update(1)
    return written


def write_class_image(image, path: Path, caption: str) -> Path:
    """Write the caption, then the PNG (with its generation metadata), each under a temporary name renamed
    into place: an interrupted run leaves no half-written image, and every image has its caption."""
    atomic_write(path.with_suffix(".txt"), lambda tmp: tmp.write_text(caption, encoding="utf-8"))
    info = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def open_class_batches(config, num_processes: int, process_index: int, batch_size: int):
    """The BatchLoader of the class images for this process, ``batch_size`` per process like the instances; every
    image gets the class prompt as caption."""
    b = config.dreambooth
    loader = open_side_batches(config, class_folder(config), b.class_prompt, CLASS_ORDER_STREAM, num_processes,
                               process_index, batch_size)  # fmt: skip
    if len(loader.data.dataset) < b.num_class_images:
        log.warning("%s: %d usable class images, fewer than num_class_images=%d", b.class_data,
                    len(loader.data.dataset), b.num_class_images)  # fmt: skip
    return loader


class PriorPreservation(Interleaved):
    """DreamBooth's objective: each micro-batch of instance images, then a class batch weighted by
    ``prior_loss_weight``, each with the diffusion loss in its own backward pass."""

    def __init__(self, base: DiffusionObjective, config, classes):
        """classes: this process's class BatchLoader (:func:`open_class_batches`)."""
        super().__init__(base, config, classes, config.dreambooth.prior_loss_weight)
