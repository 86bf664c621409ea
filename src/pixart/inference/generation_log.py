"""A generation run logged to Weights & Biases or TensorBoard: `pixart generate|eval --log wandb|tensorboard`.

The W&B layout is the one W&B's own diffusers autolog (``wandb.integration.diffusers``) gives a pipeline call, so
runs of both sit side by side in a project: the run config holds ``workflow``, a list of {pipeline, params, stage}
with the pipeline's settings and the call's parameters; every image is logged as ``Generated-Image/<stage>`` with
its prompt as caption, and ``Result-Table/<stage>`` is a ``wandb.Table`` of one row per image. We add the seed,
sampler, steps, guidance, size and model to the autolog's Prompt and Negative-Prompt columns, and the timings (and
the scores of `pixart eval`) as ``Timing/…`` and ``Eval/…`` values. TensorBoard gets the same under the same tags:
each image with ``add_image``, the table and the settings as markdown text, timings and scores as scalars.

W&B's environment variables keep their meaning (WANDB_MODE=offline logs with no network; WANDB_DIR and
WANDB_PROJECT apply unless --log-dir and --wandb-project are given). Nothing here imports wandb, tensorboard or
torch at import time: `pixart generate --help` stays fast.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import time
from pathlib import Path

from pixart.errors import PixArtError, first_line

BACKENDS = {"wandb": "wandb", "tensorboard": "tensorboard"}
"""The --log choices and the package each needs (torch.utils.tensorboard writes with the tensorboard package)."""
STAGE = "Pipeline-Call-1"
"""The autolog's name for a pipeline's first call; a pixart command makes one call."""
COLUMNS = ("Prompt", "Negative-Prompt", "Seed", "Sampler", "Steps", "Guidance", "Size", "Model", "Generated-Image")
DEFAULT_PROJECT = "pixart"
"""The W&B project when neither --wandb-project nor WANDB_PROJECT names one (the trainer's default too)."""


def check_log_flags(backend: str | None, folder: Path | None, project: str | None) -> None:
    """Refuse --log-dir or --wandb-project without the backend they apply to, and a backend not installed."""
    if backend is None:
        if folder is not None or project is not None:
            given = "--log-dir" if folder is not None else "--wandb-project"
            raise PixArtError(f"{given} applies to a log; add --log wandb or --log tensorboard")
        return
    if backend not in BACKENDS:
        raise PixArtError(f"--log {backend!r} is not a logger; choose one of {', '.join(BACKENDS)}")
    if project is not None and backend != "wandb":
        raise PixArtError(f"--wandb-project applies to --log wandb, not --log {backend}")
    package = BACKENDS[backend]
    if importlib.util.find_spec(package) is None:
        raise PixArtError(f"--log {backend} needs {package}, which is not installed: pip install {package}")


def open_generation_log(
    backend: str, folder: Path | None, *, default_folder: Path, command: str, project: str | None = None
) -> GenerationLog:
    """Start a run of ``backend`` for one command; :meth:`GenerationLog.finish` logs the results and ends it.

    Opened before the model loads, so a W&B login problem or an unwritable folder is refused before the work.
    ``folder`` is --log-dir (None: WANDB_DIR for W&B if set, else ``default_folder``).
    """
    from pixart.files import require_writable_folder

    check_log_flags(backend, folder, project)
    if folder is None and not (backend == "wandb" and os.environ.get("WANDB_DIR")):
        folder = default_folder
    if folder is not None:
        require_writable_folder(folder, "--log-dir")
    if backend == "wandb":
        return WandbLog(folder, command, project)
    return TensorBoardLog(folder, command)


class GenerationLog:
    """One command's run in a logger: opened by :func:`open_generation_log`, written and closed by ``finish``."""

    def __init__(self, command: str):
        self.command = command

    def finish(self, pipe, images: list, *, load_seconds: float, batch_size: int, scores: dict | None = None) -> None:
        """Log what ``pipe`` made (its last call's ``images``, their settings, timings, scores) and end the run."""
        rows = [row(image.info) for image in images]
        config = {"command": self.command, "workflow": [workflow(pipe, images, batch_size)]}
        self._write(config, rows, images, timings(pipe.last_run, load_seconds), scores or {})

    def _write(self, config: dict, rows: list[dict], images: list, timings: dict, scores: dict) -> None:
        raise NotImplementedError


class WandbLog(GenerationLog):
    """A W&B run (online, or offline under WANDB_MODE=offline) laid out as the diffusers autolog's."""

    def __init__(self, folder: Path | None, command: str, project: str | None):
        super().__init__(command)
        import wandb

        if project is None and not os.environ.get("WANDB_PROJECT"):
            project = DEFAULT_PROJECT
        try:
            self.run = wandb.init(project=project, dir=folder, job_type=command)
        except wandb.errors.Error as err:
            raise PixArtError(
                f"--log wandb could not start a run: {first_line(err).rstrip('.')}; "
                "or set WANDB_MODE=offline to log to local files only"
            ) from None

    def _write(self, config: dict, rows: list[dict], images: list, timings: dict, scores: dict) -> None:
        import wandb

        self.run.config.update(config)
        table = wandb.Table(columns=list(COLUMNS))
        for values, image in zip(rows, images, strict=True):
            self.run.log({f"Generated-Image/{STAGE}": wandb.Image(image, caption=values["Prompt"])})
            table.add_data(*values.values(), wandb.Image(image))
        results = {f"Timing/{k}": v for k, v in timings.items()} | {f"Eval/{k}": v for k, v in scores.items()}
        self.run.log({f"Result-Table/{STAGE}": table, **results})
        self.run.finish()


class TensorBoardLog(GenerationLog):
    """An event file in a fresh ``<command>-<time>`` folder: images, the table and settings as text, scalars."""

    def __init__(self, folder: Path, command: str):
        super().__init__(command)
        from torch.utils.tensorboard import SummaryWriter

        stamp = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
        for path in (folder / (f"{stamp}-{n}" if n else stamp) for n in itertools.count()):
            try:
                path.mkdir()
                break
            except FileExistsError:  # another run started within the same second
                pass
        self.writer = SummaryWriter(log_dir=str(path))

    def _write(self, config: dict, rows: list[dict], images: list, timings: dict, scores: dict) -> None:
        import numpy as np

        [call] = config["workflow"]
        settings = {"command": config["command"]}
        for part in ("pipeline", "params"):
            settings |= {f"{part}.{k}": v for k, v in call[part].items()}
        self.writer.add_text("Run-Config", markdown_table(["setting", "value"], settings.items()))
        for i, image in enumerate(images):
            self.writer.add_image(f"Generated-Image/{i:04d}", np.asarray(image.convert("RGB")), 0, dataformats="HWC")
        table = [[f"Generated-Image/{i:04d}", *list(values.values())] for i, values in enumerate(rows)]
        self.writer.add_text(f"Result-Table/{STAGE}", markdown_table(["Tag", *COLUMNS[:-1]], table))
        for name, value in [*((f"Timing/{k}", v) for k, v in timings.items()),
                            *((f"Eval/{k}", v) for k, v in scores.items())]:  # fmt: skip
            self.writer.add_scalar(name, value, 0)
        self.writer.close()


def row(info: dict[str, str]) -> dict:
    """One table row (the columns but the image) from a generated image's PNG metadata."""
    return {
        "Prompt": info["prompt"],
        "Negative-Prompt": info.get("negative_prompt", ""),
        "Seed": int(info["seed"]),
        "Sampler": info["sampler"],
        "Steps": int(info["steps"]),
        "Guidance": float(info["guidance"]),
        "Size": f"{info['width']}x{info['height']}",
        "Model": model_name(info),
    }


def model_name(info: dict[str, str]) -> str:
    """The weights an image's metadata names: the model, and the transformer that replaced its own if any."""
    return " + ".join(filter(None, [info.get("model") or "bundled demo", info.get("transformer")]))


def workflow(pipe, images: list, batch_size: int) -> dict:
    """The autolog's workflow entry: the pipeline's settings and the call's, from the pipe and the first image."""
    info = images[0].info
    pipeline = {
        "pipeline-name": type(pipe).__name__,
        "model": info.get("model") or "bundled demo",
        "transformer": info.get("transformer", ""),
        "loras": info.get("loras", "[]"),
        "cache_steps": int(info.get("cache_steps", 0)),
        "cache_threshold": float(info.get("cache_threshold", 0)),
        "transformer_options": info.get("transformer_options", "{}"),
        "family": pipe.model_config.family,
        "device": str(pipe.device),
        "dtype": info.get("dtype", ""),
        "generator": info.get("generator", ""),
    }
    params = {
        "sampler": info["sampler"],
        "steps": int(info["steps"]),
        "guidance": float(info["guidance"]),
        "width": int(info["width"]),
        "height": int(info["height"]),
        "max_tokens": int(info["max_tokens"]),
        "negative_prompt": info.get("negative_prompt", ""),
        "binning": info.get("binning") == "true",
        "clean": info.get("clean") == "true",
        "seed": int(info["seed"]),
        "images": len(images),
        "batch_size": batch_size,
    }
    return {"pipeline": pipeline, "params": params, "stage": STAGE}


def timings(stats, load_seconds: float) -> dict[str, float]:
    """Load time, generation time per image and steps per second of a pipeline's last call (its RunStats)."""
    values = {
        "load_seconds": load_seconds,
        "generation_seconds": stats.seconds,
        "seconds_per_image": stats.seconds / stats.images,
        "steps_per_second": stats.steps / stats.seconds if stats.seconds > 0 else 0.0,
        "peak_memory_gib": stats.peak_memory_bytes / 2**30,
    }
    if stats.compile_seconds is not None:
        values["compile_seconds"] = stats.compile_seconds
    return values


def markdown_table(header: list[str], rows) -> str:
    """A markdown table (TensorBoard's text plugin renders markdown), with | and line breaks escaped in cells."""

    def cell(value) -> str:
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])
