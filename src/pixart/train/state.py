"""What a training run resumes from (:class:`TrainState`) and what it leaves: checkpoints and final weights.

A checkpoint is a folder ``RUN/checkpoints/step-00001000/`` holding the trained weights
(``trainable.safetensors``: every parameter that trains, i.e. the whole model or only the LoRA adapters),
``ema.safetensors``, ``optimizer.pt``, ``lr_schedule.pt``, one ``rng-<process>.pt`` per process and
``state.json`` (step, data position, config), plus one ``<stem>.safetensors`` per part of the objective's
state (LCM: ``target.safetensors``, the target network's copies of the trained parameters), and last
``manifest.json``: every other file's size and SHA-256. It is written under ``.tmp-step-…``, flushed to the
disk and renamed when complete, so a crash mid-write leaves only a temporary folder that resume ignores; a
disk that fills up mid-write ends the run with one line and no temporary folder. ``--resume latest`` skips a
checkpoint damaged later (truncated, corrupt) with a warning and resumes from the newest whole one.

Checking the SHA-256 of a checkpoint reads all of it (GBs for a large model), so only the checkpoint about to
be resumed is hashed, once; listing and rotating checkpoints compare file sizes only. Checkpoints written
before manifests existed are trusted, as they were.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pixart.errors import PixArtError
from pixart.files import atomic_write, disk_full_is_one_line, fsync_path, fsync_tree, plain_modes
from pixart.train.objective import Objective

log = logging.getLogger(__name__)

NAME = re.compile(r"step-(\d+)")
MANIFEST = "manifest.json"


@dataclass
class TrainState:
    """Everything a run needs to continue bit-identically, saved and loaded as one checkpoint folder.

    ``model`` and ``optimizer`` are the accelerate-prepared ones once training starts; ``trainable`` keeps the
    unwrapped model's names of the parameters that train (the whole model, or only the LoRA adapters)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    objective: Objective
    ema: dict[str, torch.Tensor] | None = None
    """fp32 exponential moving average of the trainable parameters, by name; None without optim.ema_decay."""
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    batch: int = 0
    """The data position: the next batch is batch ``batch`` of epoch ``epoch`` (a function of seed and epoch)."""
    trainable: list[tuple[str, torch.nn.Parameter]] = field(init=False)

    def __post_init__(self) -> None:
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema ← decay · ema + (1 − decay) · weights, after an optimizer step."""
        torch._foreach_lerp_(list(self.ema.values()), [p.float() for _, p in self.trainable], 1 - decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily put the EMA weights into the model (for validation and the final EMA save)."""
        if self.ema is None:
            yield
            return
        backup = [p.detach().clone() for _, p in self.trainable]
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(self.ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(self.trainable, backup, strict=True):
                    p.copy_(saved)

    def save(self, run_dir: Path, accelerator, config) -> Path:
        """Write RUN/checkpoints/step-N from every process (each adds its RNG state), then rotate old ones."""
        folder = checkpoints_dir(run_dir)
        final = folder / f"step-{self.step:08d}"
        tmp = folder / f".tmp-{final.name}"
        with out_of_space_is_one_line(f"checkpoint {final.name}", folder, run_dir, tmp):
            if accelerator.is_main_process:
                for stale in folder.glob(".tmp-step-*"):  # left by a run killed while writing; never complete
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            self._write(tmp, accelerator, config)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                plain_modes(tmp)
                write_manifest(tmp)
                fsync_tree(tmp)
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(folder)  # keeps the rename itself across a power cut
            for old in complete_checkpoints(run_dir)[: -config.checkpoint.keep_last]:
                shutil.rmtree(old)
            log.info("checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    def _write(self, tmp: Path, accelerator, config) -> None:
        _torch_save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        full_state = accelerator.get_state_dict(self.model)  # every process must take part under FSDP
        optimizer_state = self.optimizer.state_dict()
        if not accelerator.is_main_process:
            return
        names = {n for n, _ in self.trainable}
        weights = {k: v.detach().float().cpu().contiguous() for k, v in full_state.items() if k in names}
        save_file(weights, str(tmp / "trainable.safetensors"))
        if self.ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, str(tmp / "ema.safetensors"))
        for stem, tensors in self.objective.state_dict().items():
            save_file(tensors, str(tmp / f"{stem}.safetensors"))
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(self.lr_schedule.state_dict(), tmp / "lr_schedule.pt")
        position = {"step": self.step, "epoch": self.epoch, "batch": self.batch}
        state = {**position, "num_processes": accelerator.num_processes, "config": dataclasses.asdict(config)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    def load(self, path: Path, process_index: int) -> None:
        """Restore a checkpoint into the (not yet accelerate-prepared) model, optimizer, schedule, EMA, objective
        and this process's random state."""
        saved = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        missing = {n for n, _ in self.trainable} - set(weights)
        if missing:
            raise PixArtError(
                f"checkpoint {path} lacks trained weights such as {sorted(missing)[0]}: another model/LoRA setup"
            )
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for name, value in weights.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.lr_schedule.load_state_dict(torch.load(path / "lr_schedule.pt", weights_only=True))
        if self.ema is not None:
            if not (path / "ema.safetensors").is_file():
                raise PixArtError(f"checkpoint {path} has no EMA weights but optim.ema_decay is set")
            self.ema.update(load_file(str(path / "ema.safetensors")))
        extra = [f for f in sorted(path.glob("*.safetensors")) if f.stem not in ("trainable", "ema")]
        self.objective.load_state_dict({f.stem: load_file(str(f)) for f in extra}, path)
        rng = path / f"rng-{process_index}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))
        else:
            log.warning("%s has no RNG state for process %d (saved with %d processes)", path, process_index,
                        saved.get("num_processes", 1))  # fmt: skip
        self.step, self.epoch, self.batch = saved["step"], saved["epoch"], saved["batch"]

    def save_final(self, run_dir: Path, accelerator, config) -> None:
        """RUN/final.safetensors in our format (LoRA merged in; a ControlNet's branch alone, and final.pth),
        RUN/final-ema.safetensors, RUN/final-lora/."""
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(self.model)
        with out_of_space_is_one_line("the final weights", run_dir, run_dir):  # atomic_write removes its own leftovers
            if self.ema is not None:
                with self.ema_weights():
                    save_final_weights(config, model, run_dir / "final-ema.safetensors")
            save_final_weights(config, model, run_dir / "final.safetensors")
            text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
            atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(text))


def save_final_weights(config, model, path: Path) -> None:
    """The model in our format at ``path``; for LoRA runs merged, with the adapter alone in ``<stem>-lora/``; for
    ControlNet runs the branch alone, also as ``<stem>.pth`` in the released layout."""
    from pixart.checkpoints.ours import save_pixart

    if config.controlnet.enabled:
        from pixart.train.controlnet import save_branch

        save_branch(model, path)
        return
    if not config.lora.rank:
        save_pixart(model, path)
        return
    from pixart.checkpoints.lora import merge_lora, save_lora

    save_lora(model, path.with_suffix("").with_name(path.stem + "-lora"))
    save_pixart(merge_lora(copy.deepcopy(model)), path)


def batch_stream(loader, epoch: int, skip: int):
    """(epoch, index, batch) forever from a data position, moving through epochs."""
    while True:
        for index, batch in enumerate(loader.epoch(epoch, skip=skip), start=skip):
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def published_checkpoints(run_dir: Path) -> list[Path]:
    """The step-N folders of a run, whole or not, oldest first (temporary folders of interrupted writes excluded)."""
    found = [p for p in checkpoints_dir(run_dir).glob("step-*") if NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run whose files have the sizes their manifest lists, oldest first."""
    return [p for p in published_checkpoints(run_dir) if damage(p, hashes=False) is None]


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``resume`` names: 'latest' (the newest whole one; None if the run has none yet) or a
    checkpoint folder, refused if damaged."""
    if resume == "latest":
        for path in reversed(published_checkpoints(run_dir)):
            problem = damage(path, hashes=True)
            if problem is None:
                return path
            log.warning("--resume latest: skipping damaged checkpoint %s (%s)", path, problem)
        log.warning("--resume latest: no complete checkpoint in %s; starting from step 0", checkpoints_dir(run_dir))
        return None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise PixArtError(
            f"resume={resume!r}: not a checkpoint folder (no state.json); pass 'latest' or a step-N folder"
        )
    problem = damage(path, hashes=True)
    if problem is not None:
        raise PixArtError(f"resume={resume!r}: damaged checkpoint ({problem}); pass 'latest' or another step-N folder")
    return path


def write_manifest(folder: Path) -> None:
    """Record every file's size and SHA-256 in ``folder/manifest.json``, so a damaged checkpoint can be told apart."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    entries = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=2) + "\n")


def damage(folder: Path, hashes: bool) -> str | None:
    """What is wrong with a checkpoint folder (a file missing, or of another size or SHA-256 than its manifest
    says), or None if nothing is. ``hashes=False`` compares sizes only: hashing reads every byte."""
    if not (folder / "state.json").is_file():
        return "no state.json"
    if not (folder / MANIFEST).is_file():
        return None  # written before checkpoints carried a manifest: trusted, as it was then
    try:
        entries = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, (size, _) in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    if hashes:
        for name, (_, digest) in expected.items():
            if sha256(folder / name) != digest:
                return f"{name} does not match its SHA-256 in the manifest"
    return None


def checkpoint_transformer(folder: Path, ema: bool = False) -> torch.nn.Module:
    """The transformer a full-model training checkpoint holds: the run's starting model (its model.source or
    model.preset, loaded as the run loaded it) with the checkpoint's trained weights put in, or with ``ema`` their
    EMA. What ``--transformer RUN/checkpoints/step-N`` samples, so a run can be looked at before it ends."""
    from pixart.train.config import from_dict
    from pixart.train.loop import load_model

    problem = damage(folder, hashes=False)
    if problem is not None:
        raise PixArtError(f"{folder}: damaged checkpoint ({problem})")
    try:
        config = from_dict(json.loads((folder / "state.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PixArtError(f"{folder}/state.json is unreadable ({err})") from None
    for kind, on in [("LoRA", config.lora.rank), ("ControlNet", config.controlnet.enabled)]:
        if on:
            raise PixArtError(
                f"{folder} is a {kind} run's checkpoint: it holds the {kind}'s weights, not a transformer's"
            )
    name = "ema.safetensors" if ema else "trainable.safetensors"
    if not (folder / name).is_file():
        missing = "no EMA weights (its run had no optim.ema_decay)" if ema else f"no {name}"
        raise PixArtError(f"{folder} has {missing}")
    model = load_model(config)
    weights = load_file(str(folder / name))
    params = dict(model.named_parameters())
    alien = sorted(k for k, v in weights.items() if k not in params or params[k].shape != v.shape)
    if alien:
        raise PixArtError(f"{folder}'s weights do not fit its run's model {config.model.source or config.model.preset} "
                          f"(such as {alien[0]})")  # fmt: skip
    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value)
    return model.eval()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def out_of_space_is_one_line(what: str, folder: Path, run_dir: Path, tmp: Path | None = None):
    """Turn a full disk (or quota, or file size limit) while writing ``what`` into ``folder`` into one PixArtError
    line naming the newest intact checkpoint of ``run_dir``, after removing the temporary folder ``tmp`` (other
    failures remove it too, and keep their traceback)."""

    def intact() -> str:
        kept = complete_checkpoints(run_dir)  # the one being written is not there yet (or still the old one)
        return f"the previous checkpoint {kept[-1].name} is intact" if kept else "there is no earlier checkpoint"

    try:
        with disk_full_is_one_line(what, folder, advice=intact):
            yield
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _torch_save(obj, path: Path) -> None:
    # Through a Python file, so that a full disk surfaces as its OSError (torch's own writer hides the errno).
    with open(path, "wb") as file:
        torch.save(obj, file)


def _rng_state() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": torch.tensor(state, dtype=torch.int64),
        "python_meta": [version, gauss],
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": [kind, int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict) -> None:
    version, gauss = state["python_meta"]
    random.setstate((version, tuple(state["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state((kind, state["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
