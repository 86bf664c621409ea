"""The PixArt trainer on accelerate: one loop for one CPU, one GPU, multi-GPU DDP and FSDP.

Run it as ``pixart train CONFIG`` (one process) or ``accelerate launch [--config_file …] -m pixart train
CONFIG`` (several). Every sample's noise, timestep and caption-dropout decision comes from a generator
seeded by (seed, step, index in the global batch), and the data order is a pure function of (seed, epoch),
so a run gives the same weights on 1 or N processes (up to float reduction order) and a resumed run is
bit-identical to one that never stopped.

:func:`setup` builds the run (accelerator, data, model, LoRA, objective, optimizer, schedule, resume) into a
:class:`Run`; :func:`train_step` is one optimizer step over a :class:`pixart.train.state.TrainState`, whose
objective (:mod:`pixart.train.objective`, :mod:`pixart.train.lcm`, :mod:`pixart.train.dreambooth`) says what
each micro-batch's backward passes are.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from pixart.errors import PixArtError
from pixart.files import require_writable_folder
from pixart.inference.cpu_units import BF16_FLAGS, CPUINFO, cpu_units
from pixart.sampling.samplers import read_scheduler_config
from pixart.train.config import TrainConfig
from pixart.train.metrics import METRICS_FILE, JsonLinesTracker, tensorboard_installed
from pixart.train.objective import DiffusionObjective, Objective, load_frozen_encoders
from pixart.train.state import TrainState, batch_stream, find_checkpoint

if TYPE_CHECKING:
    from pixart.train.data import BatchLoader

log = logging.getLogger(__name__)


def check_cpu_precision(precision: str, cpuinfo: str | os.PathLike = CPUINFO) -> None:
    """Refuse mixed precision a CPU run cannot gain from: fp16 anywhere, bf16 without bf16 units.

    With ``avx512_bf16`` or AMX, accelerate's bf16 autocasts the forward and backward to bf16 matmuls, about
    twice fp32's speed; without them bf16 is emulated and far slower than fp32.
    """
    units = cpu_units(cpuinfo)
    if precision == "fp16":
        accepted = "bf16 (this CPU has bf16 units) or no" if units.has_bf16() else "no"
        raise PixArtError(
            f"optim.mixed_precision='fp16' needs a GPU; on this CPU pass --optim.mixed_precision={accepted}"
        )
    if precision == "bf16" and not units.has_bf16():
        raise PixArtError(
            f"optim.mixed_precision='bf16' needs a GPU or a CPU with bf16 units ({'/'.join(BF16_FLAGS)}), and this "
            f"CPU ({units.model}) has none; pass --optim.mixed_precision=no"
        )


def make_accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
    """The Accelerator of this process, after refusing settings this machine or install cannot honour."""
    precision, trackers = config.optim.mixed_precision, []
    # Without a GPU, accelerate must be told it runs on CPUs to join several processes with gloo.
    cpu_only = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if precision != "no" and cpu_only:
        check_cpu_precision(precision)
    fallback = config.logging.tensorboard and not tensorboard_installed()
    if fallback:  # the base install lacks tensorboard: a first run still records its metrics
        trackers.append(JsonLinesTracker(run_dir / "logs" / METRICS_FILE))
    elif config.logging.tensorboard:
        trackers.append("tensorboard")
    if config.logging.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise PixArtError("logging.wandb=true needs wandb: pip install wandb, or set logging.wandb=false")
        from accelerate.tracking import WandBTracker

        # A tracker object, not "wandb": init_trackers' project name is also TensorBoard's folder (logs/pixart).
        trackers.append(WandBTracker(config.logging.wandb_project))
    accelerator = Accelerator(
        cpu=cpu_only, mixed_precision=precision, log_with=trackers or None, project_dir=str(run_dir / "logs")
    )
    if fallback and accelerator.is_main_process:
        log.info("tensorboard is not installed: metrics go to %s (pip install tensorboard for TensorBoard logs)",
                 run_dir / "logs" / METRICS_FILE)  # fmt: skip
    # accelerate ignores an FSDP config on CPUs and runs the processes as DDP; say so instead of doing that.
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")
    if fsdp_asked and cpu_only and accelerator.distributed_type != DistributedType.FSDP:
        raise PixArtError(
            "the accelerate config asks for FSDP, but accelerate shards only on GPUs and would run these CPU "
            f"processes as plain DDP ({accelerator.distributed_type.value}): launch without the FSDP config, or on GPUs"
        )
    return accelerator


def open_batches(config: TrainConfig, accelerator: Accelerator):
    """The BatchLoader of this process: its slice of every global batch, from images or from the cache."""
    from pixart.train.data import BatchLoader, ImageBuckets, open_dataset

    n, batch_size = accelerator.num_processes, config.data.batch_size
    if batch_size % n:
        raise PixArtError(f"data.batch_size={batch_size} must be divisible by the number of processes ({n})")
    if config.data.cache:
        from pixart.train.cache import component_fingerprint, open_cache

        expect = {"resolution": config.data.image_size}
        if config.controlnet.enabled:  # the cache must hold control latents of this preprocessor
            expect["control"] = config.controlnet.preprocessor
        pipeline = Path(config.model.pipeline or config.model.source).expanduser().resolve()
        if pipeline.is_dir() and (pipeline / "text_encoder").is_dir():  # refuse features of another T5 / VAE
            expect.update(text_encoder=component_fingerprint(pipeline, "text_encoder"))
            expect.update(vae=component_fingerprint(pipeline, "vae"))
        buckets = open_cache(config.data.cache, expect=expect)
    else:
        caption = config.dreambooth.instance_prompt or None  # DreamBooth: one caption for every image
        dataset = open_dataset(config.data.dataset, caption_column=config.data.caption_column or None, caption=caption,
                               progress=config.logging.progress)  # fmt: skip
        buckets = ImageBuckets(dataset, config.data.image_size)
    return BatchLoader(
        buckets,
        batch_size // n,
        seed=config.run.seed,
        num_processes=n,
        process_index=accelerator.process_index,
        num_workers=config.data.num_workers,
    )


def load_model(config: TrainConfig):
    """The transformer to fine-tune (model.source) or a freshly initialised preset (model.preset)."""
    from pixart.checkpoints.convert import load_transformer
    from pixart.model.config import preset
    from pixart.model.transformer import PixArtTransformer

    if config.model.source:
        return load_transformer(config.model.source)
    torch.manual_seed(config.run.seed)  # the same initial weights on every process and every run
    return PixArtTransformer(preset(config.model.preset))


def make_optimizer(config: TrainConfig, params: list) -> torch.optim.Optimizer:
    """AdamW or CAME over the parameters that train (a list of parameters, or of param groups)."""
    o = config.optim
    if o.optimizer == "came":
        try:
            from came_pytorch import CAME
        except ImportError:
            raise PixArtError("optim.optimizer='came' needs came-pytorch: pip install came-pytorch") from None
        betas = tuple(o.betas) if o.betas else (0.9, 0.999, 0.9999)
        return CAME(params, lr=o.lr, weight_decay=o.weight_decay, betas=betas)
    betas = tuple(o.betas) if o.betas else (0.9, 0.999)
    return torch.optim.AdamW(params, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay)


def make_lr_schedule(config: TrainConfig, optimizer, total_steps: int):
    """Linear warmup, then constant or cosine decay (diffusers' schedules), stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    name = "cosine" if config.schedule.lr_schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.schedule.warmup_steps, num_training_steps=total_steps)


@dataclass
class Run:
    """A run ready to train: what :func:`setup` builds and the step loop works with."""

    config: TrainConfig
    accelerator: Accelerator
    loader: BatchLoader
    """This process's slice of every global batch."""
    state: TrainState
    encoders: DiffusionObjective
    """The diffusion objective, whose T5, VAE and token length validation images also use."""
    total_steps: int
    run_dir: Path


def train(config: TrainConfig) -> Path:
    """Train as the config says; returns the run folder, which ends up holding final.safetensors."""
    run = setup(config)
    state, accelerator = run.state, run.accelerator
    stream = batch_stream(run.loader, state.epoch, state.batch)
    main = accelerator.is_main_process
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not (main and config.logging.progress), unit="step")
    tick = time.perf_counter()
    while state.step < run.total_steps:
        loss, grad_norm = train_step(run, stream)
        now = time.perf_counter()
        speed, tick = config.data.batch_size * config.optim.grad_accum / (now - tick), now
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{speed:.1f}")
        last = state.step == run.total_steps
        if last or state.step % config.logging.every == 0:
            metrics = {"loss": accelerator.reduce(loss, "mean").item(), "lr": state.lr_schedule.get_last_lr()[0],
                       "samples_per_s": speed}  # fmt: skip
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            accelerator.log(metrics, step=state.step)
        if last or (config.checkpoint.every and state.step % config.checkpoint.every == 0):
            try:
                state.save(run.run_dir, accelerator, config)
            except PixArtError:  # a full disk: end the progress line and the trackers before the one-line error
                bar.close()
                accelerator.end_training()
                raise
        if last or (config.validation.every and state.step % config.validation.every == 0):
            render_validation(run)
    bar.close()
    state.save_final(run.run_dir, accelerator, config)
    accelerator.end_training()
    return run.run_dir


def train_step(run: Run, stream) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over grad_accum micro-batches from ``stream``; (summed loss, gradient norm or None)."""
    config, accelerator, state = run.config, run.accelerator, run.state
    accum, loss = config.optim.grad_accum, 0.0
    for micro in range(accum):
        state.epoch, index, batch = next(stream)
        state.batch = index + 1
        first = micro * config.data.batch_size + accelerator.process_index * run.loader.batch_size
        passes = state.objective.passes(batch, first, state.step)
        for k, (part_batch, part_first, weight) in enumerate(passes):
            # Gradients are all-reduced once per optimizer step, in its last backward pass.
            last = micro == accum - 1 and k == len(passes) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(state.model):
                part = weight * state.objective.loss(state.model, part_batch, part_first, state.step)
                accelerator.backward(part / accum)
            loss = loss + part.detach()
    params = [p for _, p in state.trainable]
    grad_norm = accelerator.clip_grad_norm_(params, config.optim.grad_clip) if config.optim.grad_clip else None
    state.optimizer.step()
    state.lr_schedule.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.objective.after_step(accelerator.unwrap_model(state.model))
    if state.ema is not None:
        state.update_ema(config.optim.ema_decay)
    state.step += 1
    return loss, grad_norm


def setup(config: TrainConfig) -> Run:
    """Build the run: accelerator, data, model (+ LoRA), objective, optimizer and schedule, resumed if asked."""
    run_dir = Path(config.run.output_dir)
    require_writable_folder(run_dir, "run.output_dir")  # before anything loads, not at the first checkpoint
    accelerator = make_accelerator(config, run_dir)
    device = accelerator.device
    resume_from = find_checkpoint(run_dir, config.run.resume) if config.run.resume else None
    if config.dreambooth.prior:
        from pixart.train import dreambooth

        dreambooth.class_folder(config)  # refuses a file before anything loads
    loader = open_batches(config, accelerator)  # validates the dataset before the model loads
    preserved = None
    if config.lora.preserve_data:  # so is the dataset whose outputs a LoRA keeps
        from pixart.train.preserve import open_preserve_batches

        preserved = open_preserve_batches(config, accelerator, loader.batch_size)
    model = load_model(config)
    # LCM and DMD distil the loaded model into itself: a frozen copy, taken before any LoRA, is the teacher.
    distils = config.lcm.enabled or config.dmd.enabled
    if config.dmd.enabled and config.dmd.student:  # the student comes from elsewhere: the loaded model is the teacher
        from pixart.train.dmd import load_student

        teacher, model = model.requires_grad_(False), load_student(config.dmd.student, model)
    else:
        teacher = copy.deepcopy(model).requires_grad_(False) if distils else None
    encoders = DiffusionObjective(config, model, loader, device)
    if config.dreambooth.prior:  # the class images come from the base model, before any LoRA or training
        make_pipeline = lambda: training_pipeline(config, model, encoders, device)
        dreambooth.make_class_images(config, accelerator, model, make_pipeline, encoders.max_length)
    if config.lora.rank:
        from pixart.checkpoints.lora import add_lora

        torch.manual_seed(config.run.seed)  # peft draws lora_A from the global generator: the same adapters every run
        add_lora(model, config.lora.rank, config.lora.alpha or None, config.lora.targets)
    model.gradient_checkpointing = config.model.gradient_checkpointing
    if config.controlnet.enabled:  # the base freezes; a branch beside it trains
        from pixart.train.controlnet import with_controlnet

        model = with_controlnet(config, model)
    objective = make_objective(config, encoders, model, teacher, accelerator, loader, preserved)
    steps_per_epoch = max(1, len(loader) // config.optim.grad_accum)
    total_steps = config.schedule.max_steps or config.schedule.epochs * steps_per_epoch
    state = make_state(config, accelerator, model, objective, total_steps)
    if resume_from is not None:
        state.load(resume_from, accelerator.process_index)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch, state.batch)
    state.ema = {n: v.to(device) for n, v in state.ema.items()} if state.ema is not None else None
    model.train()
    state.model, state.optimizer = accelerator.prepare(state.model, state.optimizer)
    run = Run(config, accelerator, loader, state, encoders, total_steps, run_dir)
    start_logging(run, steps_per_epoch)
    return run


def make_objective(config: TrainConfig, base: DiffusionObjective, model, teacher, accelerator, loader,
                   preserved=None) -> Objective:  # fmt: skip
    """The objective the config asks for: LCM or DMD distillation, a LoRA keeping the base's outputs on ``preserved``
    (this process's BatchLoader of lora.preserve_data), DreamBooth prior preservation, ControlNet or plain
    diffusion."""
    if config.controlnet.enabled:
        from pixart.train.controlnet import ControlNetObjective

        return ControlNetObjective(base, config.controlnet)
    if config.lcm.enabled:
        from pixart.train.lcm import LCMObjective

        return LCMObjective(base, teacher, model, config.lcm)
    if config.dmd.enabled:
        from pixart.train.dmd import DMDObjective

        return DMDObjective(base, teacher, config, loader, accelerator)
    if config.lora.preserve_data:
        from pixart.train.preserve import BasePreservation

        return BasePreservation(base, config, preserved, config.lora.preserve_weight)
    if config.dreambooth.prior:
        from pixart.train.dreambooth import PriorPreservation, open_class_batches

        n, index = accelerator.num_processes, accelerator.process_index
        return PriorPreservation(base, config, open_class_batches(config, n, index, loader.batch_size))
    return base


def make_state(config: TrainConfig, accelerator, model, objective: Objective, total_steps: int) -> TrainState:
    """The TrainState at step 0: optimizer and LR schedule over what trains, EMA weights if kept."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(config, [p for _, p in trainable])
    lr_schedule = make_lr_schedule(config, optimizer, total_steps)
    ema = {n: p.detach().clone().float() for n, p in trainable} if config.optim.ema_decay else None
    if ema is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise PixArtError("optim.ema_decay is not supported with FSDP yet; set --optim.ema_decay=0")
    return TrainState(model, optimizer, lr_schedule, objective, ema)


def start_logging(run: Run, steps_per_epoch: int) -> None:
    """Say what trains and open the trackers with the config (main process)."""
    if not run.accelerator.is_main_process:
        return
    state, config = run.state, run.config
    log.info("training %.2f M parameters for %d steps (%d per epoch) on %d process(es), %s",
             sum(p.numel() for _, p in state.trainable) / 1e6, run.total_steps, steps_per_epoch,
             run.accelerator.num_processes, run.accelerator.device)  # fmt: skip
    flat = {f"{s}.{k}": str(v) if isinstance(v, list) else v for s, d in config.to_dict().items() for k, v in d.items()}
    run.accelerator.init_trackers("pixart", config=flat)


def render_validation(run: Run) -> None:
    """Render the validation prompts to RUN/validation/step-N-i.png (main process only, EMA weights if kept)."""
    config, accelerator, encoders = run.config, run.accelerator, run.encoders
    if not config.validation.prompts or not accelerator.is_main_process:
        return
    try:
        import pixart.inference.pipeline  # noqa: F401 (training_pipeline builds one)
    except ImportError:
        log.warning("validation skipped: pixart.inference.pipeline is not available in this install")
        return
    v, model = config.validation, accelerator.unwrap_model(run.state.model)
    if encoders.vae is None:  # cached training has no VAE until the first validation
        encoders.vae = load_frozen_encoders(config, model, accelerator.device, False, True)[1]
    pipe = training_pipeline(config, model, encoders, accelerator.device)
    size = v.image_size or config.data.image_size
    model.eval()
    with run.state.ema_weights(), torch.no_grad():
        images = pipe(v.prompts, seed=v.seed, steps=v.steps, guidance=v.guidance_scale, width=size, height=size,
                      max_tokens=encoders.max_length, show_progress=False)  # fmt: skip
    model.train()
    out = run.run_dir / "validation"
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"step-{run.state.step:08d}-{i}.png")
    log.info("validation images of step %d in %s", run.state.step, out)


def training_pipeline(config: TrainConfig, model, encoders: DiffusionObjective, device):
    """A PixArtPipeline over the (unwrapped) model and the trainer's T5 and VAE, in fp32."""
    from pixart.inference.pipeline import PixArtPipeline

    scheduler = read_scheduler_config(config.model.pipeline or config.model.source)
    return PixArtPipeline(encoders.text, model, encoders.vae, scheduler, device=device, dtype=torch.float32)
