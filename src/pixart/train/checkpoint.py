"""What a training run writes: resumable checkpoints (atomic, rotated, found by --resume) and final weights.

A checkpoint is a folder ``RUN/checkpoints/step-00001000/`` holding the trained weights
(``trainable.safetensors``: every parameter that trains, i.e. the whole model or only the LoRA adapters),
``ema.safetensors``, ``optimizer.pt``, ``lr_schedule.pt``, one ``rng-<process>.pt`` per process and
``state.json`` (step, data position, config); LCM runs add ``target.safetensors``, the target network's
copies of the trained parameters (its other weights are the frozen loaded model's). It is written under
``.tmp-step-…`` and renamed when complete, so a crash mid-write leaves only a temporary folder that resume
ignores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pixart.errors import PixArtError
from pixart.files import atomic_write, plain_modes

log = logging.getLogger(__name__)

NAME = re.compile(r"step-(\d+)")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of interrupted writes excluded)."""
    folder = checkpoints_dir(run_dir)
    found = [p for p in folder.glob("step-*") if NAME.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``resume`` names: 'latest' (None if the run has none yet) or a checkpoint folder."""
    if resume == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            log.warning("--resume latest: no complete checkpoint in %s; starting from step 0", checkpoints_dir(run_dir))
            return None
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise PixArtError(
            f"resume={resume!r}: not a checkpoint folder (no state.json); pass 'latest' or a step-N folder"
        )
    return path


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


def save_checkpoint(
    accelerator, run_dir, position, model, optimizer, lr_schedule, ema, trainable, config, target=None
) -> Path:
    """Write one checkpoint from every process (each adds its RNG state), then rotate old ones.

    target: the LCM target network (pixart.train.lcm), of which only the trained parameters' copies are saved."""
    folder = checkpoints_dir(run_dir)
    final = folder / f"step-{position['step']:08d}"
    tmp = folder / f".tmp-{final.name}"
    names = {n for n, _ in trainable}
    if accelerator.is_main_process:
        for stale in folder.glob(".tmp-step-*"):  # left by a run killed while writing; never complete
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    full_state = accelerator.get_state_dict(model)  # every process must take part under FSDP
    optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        weights = {k: v.detach().float().cpu().contiguous() for k, v in full_state.items() if k in names}
        save_file(weights, str(tmp / "trainable.safetensors"))
        if ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        if target is not None:
            target_weights = {k: v.detach().cpu().contiguous() for k, v in target.named_parameters() if k in names}
            save_file(target_weights, str(tmp / "target.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(lr_schedule.state_dict(), tmp / "lr_schedule.pt")
        state = {**position, "num_processes": accelerator.num_processes, "config": dataclasses.asdict(config)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        plain_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[: -config.checkpoint.keep_last]:
            shutil.rmtree(old)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, model, optimizer, lr_schedule, ema, process_index: int, target=None) -> dict:
    """Restore a checkpoint into the (not yet accelerate-prepared) model, optimizer, schedule, EMA and LCM target."""
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = trained - set(weights)
    if missing:
        raise PixArtError(
            f"checkpoint {path} lacks trained weights such as {sorted(missing)[0]}: another model/LoRA setup"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_schedule.load_state_dict(torch.load(path / "lr_schedule.pt", weights_only=True))
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise PixArtError(f"checkpoint {path} has no EMA weights but optim.ema_decay is set")
        ema.update(load_file(str(path / "ema.safetensors")))
    if target is not None:
        load_target(path, target, trained)
    rng = path / f"rng-{process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        log.warning("%s has no RNG state for process %d (saved with %d processes)", path, process_index,
                    state.get("num_processes", 1))  # fmt: skip
    return state


def load_target(path: Path, target, trained: set[str]) -> None:
    """Put a checkpoint's LCM target copies of the ``trained`` parameters into ``target``; refuse a checkpoint
    that has none."""
    file = path / "target.safetensors"
    if not file.is_file():
        # Written by a run without lcm.enabled, or by an LCM run before the target was saved: restarting the
        # target from the student would silently change the distillation, so there is nothing safe to resume.
        raise PixArtError(
            f"checkpoint {path} has no LCM target network (target.safetensors): it comes from a run without "
            "lcm.enabled or from an older LCM run; start the run anew instead of resuming it"
        )
    weights = load_file(str(file))
    missing = trained - set(weights)
    if missing:
        raise PixArtError(f"checkpoint {path} lacks target weights such as {sorted(missing)[0]}: another setup")
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


@contextlib.contextmanager
def ema_weights(model, ema, trainable):
    """Temporarily put the EMA weights into the model (for validation and the final EMA save)."""
    if ema is None:
        yield
        return
    backup = [p.detach().clone() for _, p in trainable]
    with torch.no_grad():
        for name, p in trainable:
            p.copy_(ema[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, p), saved in zip(trainable, backup, strict=True):
                p.copy_(saved)


def save_final(config, accelerator, model, ema, trainable, run_dir) -> None:
    """RUN/final.safetensors in our format (LoRA merged in), RUN/final-ema.safetensors, RUN/final-lora/."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    if ema is not None:
        with ema_weights(model, ema, trainable):
            save_final_weights(config, model, run_dir / "final-ema.safetensors")
    save_final_weights(config, model, run_dir / "final.safetensors")
    text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(text))


def save_final_weights(config, model, path: Path) -> None:
    """The model in our format at ``path``; for LoRA runs merged, with the adapter alone in ``<stem>-lora/``."""
    from pixart.checkpoints.convert import save_pixart

    if not config.lora.rank:
        save_pixart(model, path)
        return
    from pixart.checkpoints.lora import merge_lora, save_lora

    save_lora(model, path.with_suffix("").with_name(path.stem + "-lora"))
    save_pixart(merge_lora(copy.deepcopy(model)), path)
