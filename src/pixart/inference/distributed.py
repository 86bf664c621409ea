"""Generation over several processes: each makes its share of a run's images, the bytes one process makes.

``accelerate launch -m pixart generate …`` and ``torchrun … -m pixart eval …`` start the processes and say so in
the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). :func:`join` then joins them through accelerate's
``PartialState`` (NCCL on GPUs, gloo on CPUs), as the trainer's ``Accelerator`` does, and each process takes one
contiguous run of the run's batches (accelerate's ``split_between_processes``). Image k of a run still uses
seed + k and is denoised and decoded in the same batch as in one process, so it comes out the same, whichever
process makes it; a process's images are numbered from the run's first free number (``NNNNN-SEED.png``), which the
main process reads before anyone writes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pixart.inference.devices import RunStats
from pixart.inference.options import GenerationOptions, check_seed_range, next_free_index, save_image


def launched_processes() -> int:
    """How many processes the launcher started (accelerate launch, torchrun); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Processes:
    """The processes of one launched run, joined; ``state`` is accelerate's ``PartialState``."""

    state: object

    @property
    def count(self) -> int:
        return self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def device(self) -> str | None:
        """This process's GPU (cuda:LOCAL_RANK), or None where there is none (the usual default then)."""
        return str(self.state.device) if self.state.device.type == "cuda" else None

    def share(self, count: int, batch_size: int) -> range:
        """This process's items of ``count`` taken in batches: whole batches, contiguous, the main process first."""
        batches = [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
        with self.state.split_between_processes(batches) as mine:
            return range(mine[0].start, mine[-1].stop) if mine else range(0)

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in process order, on every process."""
        from accelerate.utils import gather_object

        return gather_object(items)

    def broadcast(self, value):
        """The main process's ``value``, on every process."""
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


def join() -> Processes:
    """Join the processes a launcher started (call only when :func:`launched_processes` > 1).

    pixart's info lines then come from the main process only: the others would repeat each one.
    """
    import torch
    from accelerate import PartialState

    # Without a GPU accelerate must be told it runs on CPUs to join the processes with gloo (as the trainer does).
    processes = Processes(PartialState(cpu=not torch.cuda.is_available()))
    if not processes.is_main:
        logging.getLogger("pixart").setLevel(logging.WARNING)
    return processes


def generate_share(
    pipe,
    prompts: list[str],
    options: GenerationOptions,
    processes: Processes,
    progress=None,
    show_progress=True,
    **inputs,
):
    """This process's part of ``pipe(prompts, options, **inputs)``: (the indices of its images in the whole run, the
    images). ``inputs`` are the pipeline's image inputs (a control image, ...), the same for every image.

    Every process must call it with the same arguments. A seed left to chance is drawn by the main process;
    ``progress`` and the progress bar (main process only) follow this process's share.
    """
    options = options.replace(seed=processes.broadcast(pipe.resolve(options).seed))
    jobs = [prompt for prompt in prompts for _ in range(options.num_images)]  # the order one process makes them in
    check_seed_range(options.seed, len(jobs))  # refused by all, not only by the process with the last images
    share = processes.share(len(jobs), options.batch_size)
    if not share:  # more processes than batches
        return share, []
    # Image k of the run is image k - share.start of this call: the same prompt, seed and batch companions.
    mine = options.replace(seed=options.seed + share.start, num_images=1)
    return share, pipe(
        jobs[share.start : share.stop],
        mine,
        progress=progress,
        show_progress=show_progress and processes.is_main,
        **inputs,
    )


def generate_and_save(pipe, prompts: list[str], options: GenerationOptions, out: Path, processes: Processes, **inputs):
    """Generate a run across the processes, each writing its images to ``out``; the main process gets every path.

    Returns the paths of the whole run in order and the combined :class:`RunStats` on the main process, and
    ``([], None)`` on the others.
    """
    first = processes.broadcast(next_free_index(out) if processes.is_main else None)  # before anyone writes
    share, images = generate_share(pipe, prompts, options, processes, **inputs)
    paths = [str(save_image(image, out, index=first + k)) for k, image in zip(share, images, strict=True)]
    paths = processes.gather(paths)
    stats = processes.gather([pipe.last_run] if images else [])
    if not processes.is_main:
        return [], None
    return paths, combined(stats)


def combined(stats: list[RunStats]) -> RunStats:
    """One run's cost over processes that ran side by side: the slowest one's time, every image and step, the
    largest peak memory of one process."""
    compiled = [s.compile_seconds for s in stats if s.compile_seconds is not None]
    return RunStats(
        max(s.seconds for s in stats),
        sum(s.images for s in stats),
        sum(s.steps for s in stats),
        max(s.peak_memory_bytes for s in stats),
        compile_seconds=max(compiled) if compiled else None,
    )
