"""A second stream of batches beside the data, and the LoRA objective that uses it to keep the base model's skills.

:class:`Interleaved` follows every micro-batch of ``data.dataset`` by a micro-batch of a second dataset, each
in its own backward pass; DreamBooth's class images use it (:mod:`pixart.train.dreambooth`), and so does
:class:`BasePreservation`. Which side batch comes at a step is a pure function of (seed, step) and its
per-sample noise comes from ``sample_generator(seed, step, SIDE_INDEX + i)``, so without saving any state a
resumed run stays bit-identical and 1 or N processes train the same weights.

:class:`BasePreservation` (``lora.preserve_data``) is for a LoRA taught something new from a few images: on the
side batches its loss is the distance between the adapted model's prediction and the base model's (the same
network with its adapters off) at the same noisy latent, timestep and caption. Replaying the base's own data
with the usual diffusion loss keeps skills only as far as the data's noise lets it, and the adapters fit the
replayed images; this target is exactly what the model did before training, so it pays for any change on the
prompts the new images do not touch and for nothing else.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pixart.errors import PixArtError
from pixart.train.objective import DiffusionObjective, Objective
from pixart.train.state import batch_stream

log = logging.getLogger(__name__)

SIDE_INDEX = 2**32
"""Where side samples' indices start in ``sample_generator``: data indices stay below batch_size × grad_accum,
so the two never share a generator."""

DEMO = "demo"
"""``lora.preserve_data`` naming the bundled demo's own scenes, rendered into the run folder."""

DEMO_SCENES = 200
"""Scenes rendered for ``lora.preserve_data = "demo"``."""

DEMO_SEED = 7
"""Their seed: the same scenes for every run."""

PRESERVE_STREAM = 2
"""Mixed into the run seed for the preservation data's shuffle (DreamBooth's class data uses 1)."""


class Interleaved(Objective):
    """Each micro-batch of the data, then a micro-batch of a side stream whose loss counts ``weight`` times, each
    with the base objective's loss in its own backward pass."""

    def __init__(self, base: DiffusionObjective, config, side, weight: float):
        """side: this process's BatchLoader of the side data (:func:`open_side_batches`)."""
        self.base, self.side, self.weight = base, side, weight
        self.batch_size, self.accum = config.data.batch_size, config.optim.grad_accum
        self.stream, self.position = None, -1

    def passes(self, batch: dict, first: int, step: int) -> list[tuple[dict, int, float]]:
        # first // batch_size is the micro-batch: the processes' slices of one micro-batch lie below batch_size.
        side = self.side_batch(step * self.accum + first // self.batch_size)
        return [(batch, first, 1.0), (side, SIDE_INDEX + first, self.weight)]

    def side_batch(self, position: int) -> dict:
        """The side batch at a position of the side stream (step × grad_accum + micro-batch), so a resumed run
        needs no saved state; the stream is reopened only when the position jumps (at the start)."""
        if position != self.position:
            self.stream = batch_stream(self.side, *divmod(position, len(self.side)))
        self.position = position + 1
        return next(self.stream)[2]

    def loss(self, model, batch: dict, first: int, step: int) -> torch.Tensor:
        return self.base.loss(model, batch, first, step)


class BasePreservation(Interleaved):
    """The data's diffusion loss, and on the side batches the mean squared distance between the model's output
    and the base model's (adapters off), eps and variance channels alike."""

    def loss(self, model, batch: dict, first: int, step: int) -> torch.Tensor:
        if first < SIDE_INDEX:
            return self.base.loss(model, batch, first, step)
        inputs = self.base.noisy_inputs(batch, first, step)
        with torch.no_grad(), adapters_off(model):
            target = model(*inputs).float()
        return F.mse_loss(model(*inputs).float(), target)


@contextmanager
def adapters_off(model):
    """The model with its peft LoRA layers switched off: the base network's output (under no_grad here)."""
    from pixart.checkpoints.lora import lora_layers

    layers = list(lora_layers(model).values())
    if not layers:
        raise PixArtError("lora.preserve_data needs LoRA layers to switch off (set lora.rank)")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # peft makes the adapters trainable again


def side_order_seed(seed: int, stream: int) -> int:
    """A side loader's shuffle seed for a run seed, so its order is not the data's permutation."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint32)[0])


def open_side_batches(config, spec, caption: str | None, stream: int, num_processes: int, process_index: int,
                      batch_size: int):  # fmt: skip
    """The BatchLoader of a side dataset for this process, ``batch_size`` per process like the data. ``caption``
    replaces every image's caption if given. A bucket's last incomplete batch is filled up by cycling, so any
    number of images works."""
    from pixart.train.data import BatchLoader, ImageBuckets, open_dataset

    return BatchLoader(
        ImageBuckets(open_dataset(spec, caption=caption, progress=config.logging.progress), config.data.image_size),
        batch_size,
        seed=side_order_seed(config.run.seed, stream),
        num_processes=num_processes,
        process_index=process_index,
        drop_last=False,
        num_workers=config.data.num_workers,
    )


def preserve_source(config) -> str | Path:
    """What ``lora.preserve_data`` names: a dataset as data.dataset takes, or for ``demo`` the folder of the demo's
    own scenes in the run folder."""
    spec = config.lora.preserve_data
    return Path(config.run.output_dir) / "preserve-demo" if spec == DEMO else spec


def open_preserve_batches(config, accelerator, batch_size: int):
    """This process's BatchLoader of ``lora.preserve_data``. For ``demo`` the main process first renders the demo's
    scenes into the run folder (once: they are kept there and are the same every time) while the others wait."""
    folder = preserve_source(config)
    if config.lora.preserve_data == DEMO:
        if accelerator.is_main_process and not (Path(folder) / "metadata.jsonl").is_file():
            from pixart.demo.shapes import write_dataset

            log.info("rendering %d of the demo's scenes to preserve into %s", DEMO_SCENES, folder)
            write_dataset(folder, DEMO_SCENES, seed=DEMO_SEED, progress=False, force=True)
        accelerator.wait_for_everyone()
    return open_side_batches(config, folder, None, PRESERVE_STREAM, accelerator.num_processes,
                             accelerator.process_index, batch_size)  # fmt: skip
