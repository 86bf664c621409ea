"""The PixArt trainer on accelerate: one loop for one CPU, one GPU, multi-GPU DDP and FSDP.

Run it as ``pixart train CONFIG`` (one process) or ``accelerate launch [--config_file …] -m pixart train
CONFIG`` (several). Every sample's noise, timestep and caption-dropout decision comes from a generator
seeded by (seed, step, index in the global batch), and the data order is a pure function of (seed, epoch),
so a run gives the same weights on 1 or N processes (up to float reduction order) and a resumed run is
bit-identical to one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from pixart.errors import PixArtError
from pixart.train.checkpoint import ema_weights, find_checkpoint, load_checkpoint, save_checkpoint, save_final
from pixart.train.config import TrainConfig
from pixart.train.objective import Objective, load_frozen_encoders

log = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
    """The Accelerator of this process, after refusing settings this machine or install cannot honour."""
    precision, trackers = config.optim.mixed_precision, []
    # Without a GPU, accelerate must be told it runs on CPUs to join several processes with gloo.
    cpu_only = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if precision != "no" and cpu_only:
        raise PixArtError(
            f"optim.mixed_precision={precision!r} needs a GPU and this run is on the CPU; "
            "pass --optim.mixed_precision=no"
        )
    if config.logging.tensorboard:
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise PixArtError("logging.tensorboard=true needs tensorboard: pip install tensorboard, or set it false")
        trackers.append("tensorboard")
    if config.logging.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise PixArtError("logging.wandb=true needs wandb: pip install wandb, or set logging.wandb=false")
        trackers.append("wandb")
    accelerator = Accelerator(
        cpu=cpu_only, mixed_precision=precision, log_with=trackers or None, project_dir=str(run_dir / "logs")
    )
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
        pipeline = Path(config.model.pipeline or config.model.source).expanduser().resolve()
        if pipeline.is_dir() and (pipeline / "text_encoder").is_dir():  # refuse features of another T5 / VAE
            expect.update(text_encoder=component_fingerprint(pipeline, "text_encoder"))
            expect.update(vae=component_fingerprint(pipeline, "vae"))
        buckets = open_cache(config.data.cache, expect=expect)
    else:
        caption = config.dreambooth.instance_prompt or None  # DreamBooth: one caption for every image
        dataset = open_dataset(config.data.dataset, caption_column=config.data.caption_column or None, caption=caption)
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


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW or CAME over the parameters that train."""
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


def batch_stream(loader, epoch: int, skip: int):
    """(epoch, index, batch) forever from a data position, moving through epochs."""
    while True:
        for index, batch in enumerate(loader.epoch(epoch, skip=skip), start=skip):
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0


def train(config: TrainConfig) -> Path:
    """Train as the config says; returns the run folder, which ends up holding final.safetensors."""
    run_dir = Path(config.run.output_dir)
    accelerator = make_accelerator(config, run_dir)
    device, main, accum = accelerator.device, accelerator.is_main_process, config.optim.grad_accum
    resume_from = find_checkpoint(run_dir, config.run.resume) if config.run.resume else None
    prior = config.dreambooth.prior  # DreamBooth prior preservation: pixart.train.dreambooth
    if prior:
        from pixart.train import dreambooth

        dreambooth.class_folder(config)  # refuses a file
    loader = open_batches(config, accelerator)  # validates the dataset before the model loads
    model = load_model(config)
    # LCM distils the loaded model into itself: a frozen copy, taken before any LoRA, is the teacher.
    teacher = copy.deepcopy(model).requires_grad_(False) if config.lcm.enabled else None
    objective = loss_fn = Objective(config, model, loader, device)
    if prior and main:  # the class images come from the base model, before any LoRA or training
        model.eval()
        # Only this process generates, and every process must keep the same global random state.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            dreambooth.generate_class_images(config, lambda: training_pipeline(config, model, objective, device),
                                             objective.max_length, show_progress=config.logging.progress)  # fmt: skip
    if prior:
        accelerator.wait_for_everyone()
    if config.lora.rank:
        from pixart.checkpoints.lora import add_lora

        torch.manual_seed(config.run.seed)  # peft draws lora_A from the global generator: the same adapters every run
        add_lora(model, config.lora.rank, config.lora.alpha or None, config.lora.targets)
    model.gradient_checkpointing = config.model.gradient_checkpointing
    if config.lcm.enabled:
        from pixart.train.lcm import LCMObjective

        loss_fn = LCMObjective(objective, teacher, model, config.lcm)
    lcm_target = loss_fn.target if config.lcm.enabled else None  # checkpointed: resume must not restart it

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    optimizer = make_optimizer(config, params)
    steps_per_epoch = max(1, len(loader) // accum)
    total_steps = config.schedule.max_steps or config.schedule.epochs * steps_per_epoch
    lr_schedule = make_lr_schedule(config, optimizer, total_steps)
    ema = {n: p.detach().clone().float() for n, p in trainable} if config.optim.ema_decay else None
    if ema is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise PixArtError("optim.ema_decay is not supported with FSDP yet; set --optim.ema_decay=0")
    step, epoch, batch_index = 0, 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, lr_schedule, ema, accelerator.process_index,
                                lcm_target)  # fmt: skip
        step, epoch, batch_index = state["step"], state["epoch"], state["batch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, batch_index)
    ema = {n: v.to(device) for n, v in ema.items()} if ema is not None else None
    class_stream = None
    if prior:  # one class batch per micro-batch: the class position is step × grad_accum, a function of the step
        classes = dreambooth.open_class_batches(config, accelerator.num_processes, accelerator.process_index,
                                                loader.batch_size)  # fmt: skip
        class_stream = batch_stream(classes, *divmod(step * accum, len(classes)))
        prior_weight = config.dreambooth.prior_loss_weight
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        log.info("training %.2f M parameters for %d steps (%d per epoch) on %d process(es), %s",
                 sum(p.numel() for p in params) / 1e6, total_steps, steps_per_epoch, accelerator.num_processes,
                 device)  # fmt: skip
        flat = {
            f"{s}.{k}": str(v) if isinstance(v, list) else v for s, d in config.to_dict().items() for k, v in d.items()
        }
        accelerator.init_trackers("pixart", config=flat)
    stream = batch_stream(loader, epoch, batch_index)
    bar = tqdm(total=total_steps, initial=step, disable=not (main and config.logging.progress), unit="step")
    tick = time.perf_counter()
    while step < total_steps:
        for micro in range(accum):
            epoch, batch_index, batch = next(stream)
            first = micro * config.data.batch_size + accelerator.process_index * loader.batch_size
            parts = [(batch, first, 1.0)]
            if class_stream is not None:
                parts.append((next(class_stream)[2], dreambooth.CLASS_INDEX + first, prior_weight))
            loss = 0.0
            for k, (part_batch, part_first, weight) in enumerate(parts):
                # Gradients are all-reduced once per optimizer step, in its last backward pass.
                last = micro == accum - 1 and k == len(parts) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    part = weight * loss_fn(model, part_batch, part_first, step)
                    accelerator.backward(part / accum)
                loss = loss + part.detach()
        grad_norm = accelerator.clip_grad_norm_(params, config.optim.grad_clip) if config.optim.grad_clip else None
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if config.lcm.enabled:
            loss_fn.update_target(accelerator.unwrap_model(model))
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.values()), [p.float() for p in params], 1 - config.optim.ema_decay)
        step += 1
        now = time.perf_counter()
        speed, tick = config.data.batch_size * accum / (now - tick), now
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{speed:.1f}")
        if step % config.logging.every == 0 or step == total_steps:
            metrics = {"loss": accelerator.reduce(loss.detach(), "mean").item(), "lr": lr_schedule.get_last_lr()[0],
                       "samples_per_s": speed}  # fmt: skip
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            accelerator.log(metrics, step=step)
        if step == total_steps or (config.checkpoint.every and step % config.checkpoint.every == 0):
            position = {"step": step, "epoch": epoch, "batch": batch_index + 1}
            save_checkpoint(accelerator, run_dir, position, model, optimizer, lr_schedule, ema, trainable, config,
                            lcm_target)  # fmt: skip
        if step == total_steps or (config.validation.every and step % config.validation.every == 0):
            render_validation(config, accelerator, model, objective, ema, trainable, step, run_dir)
    bar.close()
    save_final(config, accelerator, model, ema, trainable, run_dir)
    accelerator.end_training()
    return run_dir


def render_validation(config, accelerator, model, objective, ema, trainable, step, run_dir) -> None:
    """Render the validation prompts to RUN/validation/step-N-i.png (main process only, EMA weights if kept)."""
    if not config.validation.prompts or not accelerator.is_main_process:
        return
    try:
        import pixart.inference.pipeline  # noqa: F401 (training_pipeline builds one)
    except ImportError:
        log.warning("validation skipped: pixart.inference.pipeline is not available in this install")
        return
    v, model = config.validation, accelerator.unwrap_model(model)
    if objective.vae is None:  # cached training has no VAE until the first validation
        objective.vae = load_frozen_encoders(config, model, accelerator.device, False, True)[1]
    pipe = training_pipeline(config, model, objective, accelerator.device)
    size = v.image_size or config.data.image_size
    model.eval()
    with ema_weights(model, ema, trainable), torch.no_grad():
        images = pipe(v.prompts, seed=v.seed, steps=v.steps, guidance=v.guidance_scale, width=size, height=size,
                      max_tokens=objective.max_length, show_progress=False)  # fmt: skip
    model.train()
    out = run_dir / "validation"
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / f"step-{step:08d}-{i}.png")
    log.info("validation images of step %d in %s", step, out)


def training_pipeline(config: TrainConfig, model, objective: Objective, device):
    """A PixArtPipeline over the (unwrapped) model and the trainer's T5 and VAE, in fp32."""
    from pixart.inference.pipeline import PixArtPipeline

    scheduler_file = Path(config.model.pipeline or config.model.source) / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    return PixArtPipeline(objective.text, model, objective.vae, scheduler, device=device, dtype=torch.float32)
