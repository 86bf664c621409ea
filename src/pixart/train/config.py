"""`TrainConfig`: everything a training run needs, as typed sections loaded from a TOML file.

A run is described by one TOML file (a recipe) with one table per section, plus ``--section.key=value``
overrides from the command line. Shipped recipes live in ``pixart/recipes/*.toml``; a recipe is a
file, not a registry entry, so it can be copied and edited.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pixart.demo import DEMO_NAME, resolve_demo
from pixart.errors import PixArtError
from pixart.model.resolution import BUCKET_RESOLUTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class RunConfig:
    """Where the run writes and how it is seeded."""

    output_dir: str = "runs/pixart"
    """Run directory: checkpoints/, validation/, logs/ and final.safetensors are written here."""

    seed: int = 0
    """Seeds the data order and every sample's noise, timestep and caption dropout."""

    resume: str = ""
    """'' to start fresh, 'latest' for the newest complete checkpoint in output_dir, or a checkpoint path."""


@dataclass
class ModelConfig:
    """The transformer to train and where the text encoder and VAE come from."""

    source: str = ""
    """Checkpoint to fine-tune: a hub id, a diffusers pipeline or transformer folder, an official .pth or
    our .safetensors, or "demo" for the bundled demo pipeline. Leave empty to train from scratch from `preset`."""

    preset: str = ""
    """Preset name (see `pixart.model.config.PRESETS`) for training from scratch; empty when fine-tuning."""

    pipeline: str = ""
    """Pipeline folder or hub id holding tokenizer/, text_encoder/ and vae/ ("demo": the bundled one). Empty: use
    `source`."""

    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass: less memory, about 30% more compute."""


@dataclass
class DataConfig:
    """What to train on and how it is batched."""

    dataset: str = ""
    """Image folder, Hugging Face dataset id, or webdataset tar path/pattern. Not needed with `cache`."""

    cache: str = ""
    """Feature-cache folder made by `pixart cache`: precomputed T5 features and VAE latents."""

    image_size: int = 1024
    """Training resolution: the aspect-ratio bucket table (256, 512, 1024 or 2048; 64 and 128 for the demo)."""

    batch_size: int = 1
    """Samples per micro-step summed over all processes (each process gets batch_size / processes)."""

    caption_column: str = ""
    """Caption column of a dataset with metadata or a Hugging Face dataset; empty tries text, caption, prompt."""

    num_workers: int = 0
    """Data-loader worker processes per training process."""


@dataclass
class DiffusionConfig:
    """The training objective."""

    caption_dropout: float = 0.1
    """Probability of replacing a caption by the null caption, so the model learns classifier-free guidance."""

    null_caption: str = "auto"
    """What a dropped caption becomes: 'embedding' (the model's learned y_embedding, α-style), 't5' (the T5
    features of ""), or 'auto' (embedding for the alpha family, t5 for sigma)."""

    snr_gamma: float = 0.0
    """Min-SNR-γ weighting of the ε-MSE term (5.0 is the paper's value); 0 turns it off."""


@dataclass
class OptimConfig:
    """Optimizer, precision and the update step."""

    optimizer: str = "adamw"
    """'adamw' (torch) or 'came' (pip install came-pytorch; the Σ recipe)."""

    lr: float = 2e-5
    """Peak learning rate, reached after the warmup."""

    weight_decay: float = 0.03
    """Decoupled weight decay."""

    betas: list[float] = field(default_factory=list)
    """Optimizer betas; empty for the defaults: AdamW (0.9, 0.999), CAME (0.9, 0.999, 0.9999)."""

    eps: float = 1e-10
    """AdamW epsilon (official 1e-10). CAME keeps its own (1e-30, 1e-16)."""

    grad_clip: float = 0.01
    """Clip the global gradient norm to this (official 0.01); 0 disables clipping."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16'. On a CPU only bf16, and only where the CPU has bf16 units (avx512_bf16, AMX)."""

    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (official α 0.9999); 0 disables."""


@dataclass
class ScheduleConfig:
    """How long to train and the learning-rate curve."""

    max_steps: int = 0
    """Optimizer steps to run; 0 means run `epochs` epochs."""

    epochs: int = 1
    """Passes over the data when max_steps is 0."""

    warmup_steps: int = 0
    """Linear warmup from 0 to `lr` over this many steps (official 1000)."""

    lr_schedule: str = "constant"
    """After warmup: 'constant' or 'cosine' (decays to 0 at the last step)."""


@dataclass
class CheckpointConfig:
    """Resumable checkpoints."""

    every: int = 500
    """Write a checkpoint every this many optimizer steps (and at the end); 0 only at the end."""

    keep_last: int = 3
    """Keep only the newest this many checkpoints."""


@dataclass
class LoggingConfig:
    """Metrics and progress."""

    every: int = 10
    """Log loss, learning rate and samples/s every this many steps."""

    tensorboard: bool = True
    """Write TensorBoard event files to RUN/logs/pixart; without tensorboard installed, the metrics go to
    RUN/logs/metrics.jsonl instead (one JSON object per logged step) and one line says so."""

    wandb: bool = False
    """Also log to Weights & Biases (pip install wandb)."""

    wandb_project: str = "pixart"
    """Weights & Biases project name."""

    progress: bool = True
    """Show a progress bar with loss and samples/s."""


@dataclass
class ValidationConfig:
    """Images rendered from fixed prompts during training, written as PNGs to RUN/validation."""

    prompts: list[str] = field(default_factory=list)
    """Prompts to render; empty disables validation."""

    every: int = 0
    """Render every this many steps (and at the end); 0 only at the end."""

    steps: int = 20
    """Sampler steps per image."""

    guidance_scale: float = 4.5
    """Classifier-free guidance scale."""

    image_size: int = 0
    """Image side in pixels; 0 means data.image_size."""

    seed: int = 0
    """Seed of the initial noise, so images are comparable across steps."""


@dataclass
class LoraConfig:
    """LoRA fine-tuning: only the adapters are trained, optimized and checkpointed."""

    rank: int = 0
    """Adapter rank; 0 trains the full model."""

    alpha: float = 0.0
    """Adapter scaling numerator (scale = alpha / rank); 0 means alpha = rank."""

    targets: list[str] = field(default_factory=lambda: ["attn", "cross_attn"])
    """Layers to adapt: groups 'attn', 'cross_attn', 'mlp' or module-name patterns (see pixart.checkpoints.lora).
    The default is diffusers' to_q/to_k/to_v/to_out.0 of both attentions."""

    preserve_data: str = ""
    """Images with captions on which the base model's outputs are kept (a dataset as data.dataset takes; "demo":
    200 of the bundled demo's own scenes, rendered into the run folder). Each micro-batch is followed by one of
    these, whose loss is the distance between the adapted model's prediction and the base's (adapters off): what
    keeps a fine-tune on a few images from forgetting the rest (pixart.train.preserve). Empty: off."""

    preserve_weight: float = 1.0
    """Weight of the preservation batch's loss, added to the data's at every micro-step."""


@dataclass
class LCMConfig:
    """Latent consistency distillation (pixart.train.lcm): model.source is the teacher and the student's start."""

    enabled: bool = False
    """Train the LCM consistency loss instead of the diffusion loss; sample the result with --sampler lcm."""

    ddim_steps: int = 50
    """Points on the teacher's DDIM grid (official 50: the teacher jumps 20 timesteps)."""

    guidance: float = 4.5
    """Classifier-free guidance w of the teacher's DDIM step, in the LCM paper's form cond + w · (cond − uncond)
    (official 4.5, i.e. 5.5 on the usual uncond + g · (cond − uncond) scale)."""

    huber_c: float = 0.001
    """Pseudo-Huber loss constant (official 0.001)."""

    target_ema: float = 0.95
    """EMA decay of the target network that follows the student (official 0.95)."""


@dataclass
class DMDConfig:
    """Distribution matching distillation (pixart.train.dmd): model.source is the frozen teacher (the real score),
    the fake score's start and the one-step student's start."""

    enabled: bool = False
    """Train the one-step student by DMD instead of the diffusion loss; sample the result with --sampler dmd."""

    start_timestep: int = 400
    """The timestep the student reads pure noise at (the official PixArt DMD: 400; ``--sampler dmd`` runs 400)."""

    guidance: float = 4.5
    """Classifier-free guidance of the real score, uncond + g · (cond − uncond); the fake score runs unguided."""

    min_timestep: int = 20
    max_timestep: int = 980
    """The range the distribution-matching and fake-score timesteps are drawn from (DMD: 0.02 T to 0.98 T)."""

    regression_weight: float = 0.25
    """Weight of the regression loss on the teacher's noise-image pairs (DMD and the official PixArt DMD: 0.25)."""

    regression_distance: str = "mse"
    """The regression loss's distance: "mse", of the latents; "ssim", 1 − SSIM of the decoded images (the VAE
    decoder frozen, gradients through it): a structural distance that needs no pretrained weights, in place of
    DMD's LPIPS, which weighs a small object's edges by their structure, not by their few pixels; "detail_ssim",
    1 − SSIM with its map averaged in weights of the reference's local variance (plus SSIM's C2), so the edges of
    an image whose only object is small count as much as a large object's instead of being diluted by the
    background."""

    fake_lr: float = 0.0
    """The fake score's learning rate; 0: optim.lr (the official PixArt DMD's lr_fake_multiplier 1)."""

    fake_updates: int = 1
    """Fake-score optimizer steps per student step (DMD: 1; DMD2: 5, so the fake score keeps up with the student).
    The extra steps train it on new one-step images of the step's captions, from new noise."""

    gan_weight: float = 0.0
    """Weight of DMD2's GAN loss in the student's (Yin et al. 2024b, arXiv 2405.14867; its SDXL run: 5e-3); 0: off,
    plain DMD. A classifier on the fake score's last-block tokens learns to tell the data's own latents from the
    student's, both noised to a random time, and the student learns to pass as data: images, not only the
    teacher's scores, then shape the student."""

    gan_classifier_weight: float = 0.01
    """Weight of the classifier's loss in the fake score's (DMD2: 1e-2); it trains the fake score's body too."""

    gan_head_lr: float = 0.0
    """The classifier head's learning rate; 0: the fake score's. The head starts from nothing while the fake score's
    body is pretrained, and at the fake score's rate (1e-4 here) it takes hundreds of steps to say anything."""

    num_pairs: int = 1024
    """Teacher noise-image pairs made for the regression loss (from the first captions of the data order)."""

    pair_steps: int = 20
    """dpm++ steps of the teacher making each pair."""

    pair_guidance: float = 4.5
    """Guidance of the teacher making the pairs (as it samples by default)."""

    pairs: str = ""
    """Where the pairs are kept (a .safetensors file, made if absent or made with other settings); empty:
    RUN/dmd-pairs.safetensors. A file of the same settings but fewer pairs is extended (only the new pairs are made),
    one with more is read up to num_pairs."""

    student: str = ""
    """Where the student starts: any transformer --transformer reads with the teacher's architecture, such as an
    earlier DMD run's final.safetensors or its checkpoints/step-N folder, to go on from it with other settings (a
    new batch size, say) and fresh optimizers; empty: model.source, as the teacher."""


@dataclass
class DreamBoothConfig:
    """DreamBooth (Ruiz et al. 2022, arXiv 2208.12242): one caption for the instance images, and prior
    preservation: the diffusion loss on class images made by the base model keeps the class from drifting."""

    instance_prompt: str = ""
    """Caption of every instance image (data.dataset), e.g. 'a photo of sks dog'; the images then need no
    caption files. Empty: the dataset's own captions."""

    class_prompt: str = ""
    """Caption of the class images, e.g. 'a photo of dog'. Setting it turns prior preservation on."""

    class_data: str = ""
    """Folder of class images. Before training, the base model generates the missing ones into it (PNG with a
    same-name .txt caption) until it holds num_class_images; images already there are used as they are."""

    num_class_images: int = 100
    """Class images to have (diffusers' default 100)."""

    prior_loss_weight: float = 1.0
    """Weight of the class batch's loss, added to the instance loss at every micro-step (diffusers' 1.0)."""

    sample_steps: int = 20
    """Sampler steps per generated class image (the default sampler, DPM-Solver++)."""

    guidance_scale: float = 4.5
    """Classifier-free guidance of the generated class images."""

    sample_batch_size: int = 4
    """Class images generated together (diffusers' 4); more is faster on a GPU and needs more memory."""

    @property
    def prior(self) -> bool:
        """Whether prior preservation is on."""
        return bool(self.class_prompt)


@dataclass
class ControlNetConfig:
    """ControlNet training (pixart.train.controlnet): model.source stays frozen and a PixArt-δ branch of its first
    blocks learns to steer it by control maps that a preprocessor makes from the training images."""

    enabled: bool = False
    """Train a ControlNet branch instead of the model; the run saves the branch alone (final.safetensors in our
    format, final.pth in the released layout)."""

    preprocessor: str = "canny"
    """How a training image becomes its control map: 'canny' (OpenCV edges, as ``--control-type canny``),
    'layout' (where it differs from its plain background) or 'none' (the image itself). With data.cache, the cache
    must hold this preprocessor's maps (``pixart cache --control``)."""

    num_blocks: int = 13
    """Base blocks the branch copies (the released α ControlNets: 13 of 28)."""

    conditioning_dropout: float = 0.0
    """Probability of training a sample on a zero control latent (no control), seeded per sample like caption
    dropout. The official recipe uses none; some lets the branch learn to stay quiet without a map."""

    init: str = ""
    """An existing ControlNet (.safetensors or released .pth) to continue from; empty: a new branch (the base's
    first blocks copied, the projections zero)."""


@dataclass
class TrainConfig:
    """A whole training run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check values the types alone do not constrain; raise PixArtError naming the first bad one."""
        m, d, o, s = self.model, self.data, self.optim, self.schedule
        if bool(m.source) == bool(m.preset):
            raise PixArtError("model: set exactly one of model.source (fine-tune) or model.preset (from scratch)")
        if m.preset and not m.pipeline and not d.cache:
            raise PixArtError("model.pipeline is required with model.preset: the folder holding text_encoder/ and vae/")
        if not d.dataset and not d.cache:
            raise PixArtError("data: set data.dataset (images + captions) or data.cache (a feature cache folder)")
        if d.dataset and d.cache:
            raise PixArtError("data: set only one of data.dataset and data.cache")
        _choice("data.image_size", d.image_size, BUCKET_RESOLUTIONS)
        _choice("diffusion.null_caption", self.diffusion.null_caption, ("auto", "embedding", "t5"))
        _choice("optim.optimizer", o.optimizer, ("adamw", "came"))
        _choice("optim.mixed_precision", o.mixed_precision, ("no", "fp16", "bf16"))
        _choice("schedule.lr_schedule", s.lr_schedule, ("constant", "cosine"))
        _in_range("diffusion.caption_dropout", self.diffusion.caption_dropout, 0.0, 1.0)
        _in_range("optim.ema_decay", o.ema_decay, 0.0, 1.0, high_open=True)
        for name, value in [
            ("diffusion.snr_gamma", self.diffusion.snr_gamma),
            ("optim.weight_decay", o.weight_decay),
            ("optim.grad_clip", o.grad_clip),
            ("lora.alpha", self.lora.alpha),
            ("validation.guidance_scale", self.validation.guidance_scale),
        ]:
            _in_range(name, value, 0.0, math.inf)
        if not (o.lr > 0 and math.isfinite(o.lr)):
            raise PixArtError(f"optim.lr={o.lr!r}: expected a positive number")
        if not o.eps > 0:
            raise PixArtError(f"optim.eps={o.eps!r}: expected a positive number")
        want_betas = 3 if o.optimizer == "came" else 2
        if o.betas and (len(o.betas) != want_betas or not all(0 <= b < 1 for b in o.betas)):
            raise PixArtError(f"optim.betas={o.betas!r}: {o.optimizer} takes {want_betas} values in [0, 1)")
        for name, value, low in [
            ("data.batch_size", d.batch_size, 1),
            ("data.num_workers", d.num_workers, 0),
            ("optim.grad_accum", o.grad_accum, 1),
            ("schedule.max_steps", s.max_steps, 0),
            ("schedule.epochs", s.epochs, 1),
            ("schedule.warmup_steps", s.warmup_steps, 0),
            ("checkpoint.every", self.checkpoint.every, 0),
            ("checkpoint.keep_last", self.checkpoint.keep_last, 1),
            ("logging.every", self.logging.every, 1),
            ("validation.every", self.validation.every, 0),
            ("validation.steps", self.validation.steps, 1),
            ("validation.image_size", self.validation.image_size, 0),
            ("lora.rank", self.lora.rank, 0),
        ]:
            if value < low:
                raise PixArtError(f"{name}={value!r}: expected an integer >= {low}")
        if self.validation.image_size % 8:
            raise PixArtError(f"validation.image_size={self.validation.image_size}: expected a multiple of 8")
        if self.lora.rank and not self.lora.targets:
            raise PixArtError("lora.targets is empty: name the layers to adapt, e.g. to_q,to_k,to_v,to_out.0")
        if self.lcm.enabled:
            self.validate_lcm()
        if self.dmd.enabled:
            self.validate_dmd()
        elif self.dmd.student:
            raise PixArtError("dmd.student is where a DMD student starts; set dmd.enabled=true or drop it")
        self.validate_dreambooth()
        if self.lora.preserve_data:
            self.validate_preserve()
        if self.controlnet.enabled:
            self.validate_controlnet()

    def validate_lcm(self) -> None:
        c = self.lcm
        if not self.model.source:
            raise PixArtError("lcm.enabled needs model.source: the trained model to distil (it is also the teacher)")
        if not 1 <= c.ddim_steps <= 1000:
            raise PixArtError(f"lcm.ddim_steps={c.ddim_steps!r}: expected an integer from 1 to 1000")
        _in_range("lcm.guidance", c.guidance, 0.0, math.inf)
        _in_range("lcm.target_ema", c.target_ema, 0.0, 1.0, high_open=True)
        if not (c.huber_c > 0 and math.isfinite(c.huber_c)):
            raise PixArtError(f"lcm.huber_c={c.huber_c!r}: expected a positive number")

    def validate_dmd(self) -> None:
        c = self.dmd
        if not self.model.source:
            raise PixArtError("dmd.enabled needs model.source: the trained model to distil (it is also the teacher)")
        for name, on in [("lcm.enabled", self.lcm.enabled), ("lora.rank", self.lora.rank),
                         ("controlnet.enabled", self.controlnet.enabled),
                         ("dreambooth.class_prompt", self.dreambooth.prior)]:  # fmt: skip
            if on:
                raise PixArtError(f"dmd.enabled trains the whole student; it does not combine with {name}")
        if self.optim.mixed_precision == "fp16":  # the fake score's backward runs outside accelerate's loss scaling
            raise PixArtError("dmd.enabled does not train in fp16; set --optim.mixed_precision=bf16 or no")
        for name, value, low in [("dmd.start_timestep", c.start_timestep, 0), ("dmd.min_timestep", c.min_timestep, 0),
                                 ("dmd.max_timestep", c.max_timestep, c.min_timestep)]:  # fmt: skip
            if not low <= value <= 999:
                raise PixArtError(f"{name}={value!r}: expected an integer from {low} to 999")
        for name, value in [("dmd.num_pairs", c.num_pairs), ("dmd.pair_steps", c.pair_steps),
                            ("dmd.fake_updates", c.fake_updates)]:  # fmt: skip
            if value < 1:
                raise PixArtError(f"{name}={value!r}: expected an integer >= 1")
        weights = ("guidance", "regression_weight", "fake_lr", "pair_guidance", "gan_weight", "gan_classifier_weight",
                   "gan_head_lr")  # fmt: skip
        for name in weights:
            _in_range(f"dmd.{name}", getattr(c, name), 0.0, math.inf)
        _choice("dmd.regression_distance", c.regression_distance, ("mse", "ssim", "detail_ssim"))

    def validate_dreambooth(self) -> None:
        b = self.dreambooth
        if b.class_prompt and not b.class_data:
            raise PixArtError(
                "dreambooth.class_prompt needs dreambooth.class_data: the folder of class images "
                "(missing ones are generated into it)"
            )
        if b.class_data and not b.class_prompt:
            raise PixArtError("dreambooth.class_data needs dreambooth.class_prompt: the caption of the class images")
        _in_range("dreambooth.prior_loss_weight", b.prior_loss_weight, 0.0, math.inf)
        _in_range("dreambooth.guidance_scale", b.guidance_scale, 0.0, math.inf)
        for name, value in [
            ("dreambooth.num_class_images", b.num_class_images),
            ("dreambooth.sample_steps", b.sample_steps),
            ("dreambooth.sample_batch_size", b.sample_batch_size),
        ]:
            if value < 1:
                raise PixArtError(f"{name}={value!r}: expected an integer >= 1")
        if not (b.instance_prompt or b.prior):
            return
        if self.data.cache:
            raise PixArtError(
                "dreambooth needs data.dataset, not data.cache: a feature cache holds the images' own captions "
                "and the class images are encoded during training"
            )
        if b.prior and self.lcm.enabled:
            raise PixArtError("dreambooth.class_prompt (prior preservation) is not supported with lcm.enabled")

    def validate_preserve(self) -> None:
        _in_range("lora.preserve_weight", self.lora.preserve_weight, 0.0, math.inf)
        if not self.lora.rank:
            raise PixArtError(
                "lora.preserve_data keeps the base model's outputs by switching the adapters off; set lora.rank"
            )
        if self.data.cache:
            raise PixArtError(
                "lora.preserve_data needs data.dataset, not data.cache: its images are encoded as it trains"
            )
        for name, on in [("lcm.enabled", self.lcm.enabled), ("dmd.enabled", self.dmd.enabled),
                         ("controlnet.enabled", self.controlnet.enabled),
                         ("dreambooth.class_prompt", self.dreambooth.prior)]:  # fmt: skip
            if on:
                raise PixArtError(f"lora.preserve_data does not combine with {name}")

    def validate_controlnet(self) -> None:
        from pixart.inference.control import CONTROL_TYPES

        c = self.controlnet
        if not self.model.source:
            raise PixArtError("controlnet.enabled needs model.source: the trained model the branch steers (frozen)")
        _choice("controlnet.preprocessor", c.preprocessor, tuple(CONTROL_TYPES))
        _in_range("controlnet.conditioning_dropout", c.conditioning_dropout, 0.0, 1.0)
        if c.num_blocks < 1:
            raise PixArtError(f"controlnet.num_blocks={c.num_blocks!r}: expected an integer >= 1")
        for name, on in [("lora.rank", self.lora.rank), ("lcm.enabled", self.lcm.enabled),
                         ("dreambooth.class_prompt", self.dreambooth.prior)]:  # fmt: skip
            if on:
                raise PixArtError(f"controlnet.enabled trains the branch alone; it does not combine with {name}")
        if self.validation.prompts:
            raise PixArtError(
                "validation.prompts is not supported with controlnet.enabled (validation has no control image); "
                "set --validation.prompts=[] and generate with the saved branch"
            )


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise PixArtError(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")


def _in_range(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    if not (math.isfinite(value) and low <= value and (value < high if high_open else value <= high)):
        what = f"a number >= {low}" if high == math.inf else f"a number in [{low}, {high}{')' if high_open else ']'}"
        raise PixArtError(f"{name}={value!r}: expected {what}")


def recipes_dir() -> Path:
    """The folder of recipes shipped with the package."""
    return Path(str(resources.files("pixart") / "recipes"))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A TOML file path as given, or the shipped recipe of that name (``pokemon-lora``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = recipes_dir() / f"{name_or_path}.toml"
    if path.suffix == "" and shipped.is_file():
        return shipped
    known = ", ".join(recipe_names())
    raise PixArtError(f"config {str(name_or_path)!r} is neither a TOML file nor a shipped recipe; recipes: {known}")


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML recipe (file path or shipped recipe name), apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_recipe(name_or_path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise PixArtError(f"config {path}: not valid TOML: {err}") from None
    config = from_dict(data)
    for item in overrides:
        apply_override(config, item)
    for key in ("source", "pipeline"):  # a recipe cannot know where the package, and so the bundle, is installed
        if getattr(config.model, key) == DEMO_NAME:
            setattr(config.model, key, str(resolve_demo(DEMO_NAME)))
    config.validate()
    return config


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from nested dicts, checking every key and type (not the ranges)."""
    config = TrainConfig()
    sections = _fields(TrainConfig)
    for section_name, values in data.items():
        if section_name not in sections:
            raise PixArtError(f"unknown config section {section_name!r}; known sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise PixArtError(f"config section {section_name!r} must be a table ([{section_name}])")
        section = getattr(config, section_name)
        for key, value in values.items():
            _set(section, section_name, key, value, from_text=False)
    return config


def apply_override(config: TrainConfig, item: str) -> None:
    """Apply one ``section.key=value`` override, parsing value to the field's type."""
    name, sep, text = item.removeprefix("--").partition("=")
    section_name, dot, key = name.partition(".")
    if not sep or not dot:
        raise PixArtError(f"override {item!r}: expected --section.key=value, e.g. --optim.lr=1e-5")
    sections = _fields(TrainConfig)
    if section_name not in sections:
        raise PixArtError(f"override {item!r}: unknown section {section_name!r}; known sections: {', '.join(sections)}")
    _set(getattr(config, section_name), section_name, key, text, from_text=True)


def _fields(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set(section: Any, section_name: str, key: str, value: Any, from_text: bool) -> None:
    fields = _fields(type(section))
    if key not in fields:
        raise PixArtError(f"unknown key {section_name}.{key!r}; known keys of [{section_name}]: {', '.join(fields)}")
    kind = fields[key]
    try:
        parsed = _parse_text(kind, value) if from_text else _check_type(kind, value)
    except (TypeError, ValueError):
        raise PixArtError(f"{section_name}.{key}={value!r}: expected {_type_name(kind)}") from None
    setattr(section, key, parsed)


def _parse_text(kind: Any, text: str) -> Any:
    if kind is str:
        return text
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    item = typing.get_args(kind)[0]
    if text.strip().startswith("["):  # a TOML array, for values that contain commas
        try:
            return _check_type(kind, tomllib.loads(f"v = {text}")["v"])
        except tomllib.TOMLDecodeError:
            raise ValueError(text) from None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return [_parse_text(item, p) for p in parts]


def _check_type(kind: Any, value: Any) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, bool, str):
        if type(value) is not kind:
            raise TypeError(value)
        return value
    origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(value)
        item = typing.get_args(kind)[0]
        return [_check_type(item, v) for v in value]
    raise TypeError(f"unsupported field type {kind}")  # pragma: no cover


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) in (list, types.GenericAlias):
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
