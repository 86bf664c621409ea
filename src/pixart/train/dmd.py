"""Distribution matching distillation (DMD, Yin et al. 2024, arXiv 2311.18828) of a PixArt teacher into one step.

Three copies of the loaded model take part. The frozen teacher is the real score, guided as DMD guides it. The fake
score starts as the teacher and learns, by the plain ε denoising loss, the distribution the student makes now (from
the student's outputs, detached). The student starts as the teacher too and maps pure noise z, read at timestep 400
as ``--sampler dmd`` reads it, to x = x̂0(z) in one step. Its gradient is DMD's: noise x to a random time t, and
push x along μ_fake(x_t) − μ_real(x_t), the difference of the two scores' x̂0 predictions, divided per sample by
the mean |x − μ_real(x_t)| (the paper's weighting w_t, which evens out the gradient's size across noise
levels). Beside it a regression loss holds the student to the teacher's own noise → image pairs: the teacher
makes them once from the data's captions with dpm++ and fixed seeds (:func:`make_pairs`), and the trainer keeps
them in RUN/dmd-pairs.safetensors. DMD's regression loss is LPIPS on decoded images; here it is the MSE of the
latents, which needs no pretrained VGG/AlexNet weights (no download, nothing to decode); a VAE latent is a 4- or
8-fold downsampled image that decodes near-losslessly, so its MSE roughly follows the pixels'. That trades LPIPS's
perceptual weighting for what runs on any machine. ``dmd.regression_distance=ssim`` takes 1 − SSIM of the decoded
images instead (:func:`ssim_distance`; the VAE decoder frozen, gradients through it): structural like LPIPS, still
without pretrained weights, it counts a small object's blurred corners by the structure they break, not by their few
pixels. ``detail_ssim`` averages SSIM's map in weights of the reference's local variance, so an image's edges count as
a whole however small its object and however large the background.

One optimizer step: the student's pass over the micro-batch's captions (the distribution-matching loss; inside it
the fake score's denoising loss is backpropagated into the fake score alone), then a second pass of as many
teacher pairs (the regression loss, weight ``dmd.regression_weight``); after the step the fake score's optimizer
steps, ``dmd.fake_updates`` times (DMD2's two time-scale rule): each step after the first trains it on new
one-step images of the same captions, from the updated student and new noise. The fake score's weights and its
optimizer's state are checkpointed (``fake.safetensors``, ``fake_optimizer.safetensors``), and every draw is
seeded per sample by (seed, step, index), so a resumed run is bit-identical and 1 or N processes agree.

With ``dmd.gan_weight`` DMD2's GAN term joins (Yin et al. 2024b, arXiv 2405.14867): a classifier head
(:class:`Classifier`) on the fake score's last-block tokens gives a logit per image, "data" against "student". The
fake score's pass over the student's images above feeds it their tokens, one more pass of the fake score gives it
the micro-batch's own latents (the data), both noised to a random time, and its non-saturating loss, weighted
``dmd.gan_classifier_weight``, trains the head and the fake score's body with the denoising loss. The student's
loss gains ``gan_weight`` · softplus(−logit) of its images noised to a random time, through the fake score and head
held fixed. The head is checkpointed (``fake_head.safetensors``) and steps with the fake score's optimizer; a run
resumed from one without it starts a new head.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file

from pixart.errors import PixArtError
from pixart.files import atomic_write
from pixart.sampling.samplers import read_scheduler_config
from pixart.train.config import DMDConfig, TrainConfig
from pixart.train.diffusion import GaussianDiffusion, drop_captions, mean_flat
from pixart.train.lcm import Denoiser, predicted_x0
from pixart.train.objective import DiffusionObjective, Objective, per_sample, sample_generator

log = logging.getLogger(__name__)

DRAW_STREAM, PAIR_INDEX_STREAM = 2, 4
"""The sample generators' streams of DMD's own draws (student noise, timesteps, noise; the regression pass's pair),
apart from the base objective's (caption dropout, VAE posterior) and ControlNet's (1)."""
GAN_STREAM = 5
"""The stream of the GAN term's draws (generator timestep and noise, data timestep and noise)."""
PAIR_STREAM = 3
"""The stream of the pairs' noise: pair i's noise is stream 3 of (seed, 0, i), whatever the run's length."""
FAKE_STREAM = 100
"""Stream 100 + k: the draws of the fake score's extra update k (1, 2, …) of a step."""
PIXEL_RANGE = 2.0  # decoded pixels lie in [-1, 1]
SSIM_K = (0.01, 0.03)  # SSIM's constants: C1, C2 = (K1 · range)², (K2 · range)², as pytorch_msssim has them


class Classifier(torch.nn.Module):
    """DMD2's classification branch for a transformer: a logit per image (B,) from the fake score's last-block
    tokens (B, N, C), the mean of a small MLP's logit per token (a patch discriminator over the latent). The last
    layer starts at zero, so the student's GAN gradient starts at zero while the head learns."""

    def __init__(self, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 1)
        )
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.float()).mean(dim=(1, 2))


class LastTokens:
    """A block hook (:data:`pixart.model.transformer.BlockHook`) keeping the last block's output tokens."""

    def __init__(self, depth: int):
        self.depth, self.tokens = depth, None

    def __call__(self, i: int, x: torch.Tensor, run) -> torch.Tensor:
        x = run(x)
        if i == self.depth - 1:
            self.tokens = x
        return x


def load_student(source: str, teacher: torch.nn.Module) -> torch.nn.Module:
    """The student's start from ``dmd.student`` (any form load_transformer reads), which must have the teacher's
    architecture: the fake score and the student take turns on the same images and captions."""
    from pixart.checkpoints.convert import load_transformer

    student = load_transformer(source)
    differ = [f.name for f in dataclasses.fields(student.config)
              if getattr(student.config, f.name) != getattr(teacher.config, f.name)]  # fmt: skip
    if differ:
        raise PixArtError(f"dmd.student={source!r} is not the teacher's architecture (it differs in "
                          f"{', '.join(differ)}); DMD's student starts with the teacher's shape")  # fmt: skip
    return student.to(next(teacher.parameters()).dtype).train()


def one_step(student: Denoiser, diffusion: GaussianDiffusion, z: torch.Tensor, start: int, text) -> torch.Tensor:
    """The student's image x̂0 (B, C, h, w) from pure noise z read at timestep ``start``, as ``--sampler dmd``
    samples: one ε prediction, x̂0 unclipped."""
    t = torch.full((len(z),), start, dtype=torch.long, device=z.device)
    return predicted_x0(diffusion, z, t, student(z, t, *text)[:, : z.shape[1]].float())


def distribution_matching_loss(
    x: torch.Tensor,
    real: Denoiser,
    fake: Denoiser,
    diffusion: GaussianDiffusion,
    t: torch.Tensor,
    noise: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor],
    null: tuple[torch.Tensor, torch.Tensor],
    guidance: float,
) -> torch.Tensor:
    """Per-sample loss (B,) whose gradient in x is DMD's: (μ_fake − μ_real) / mean|x − μ_real|, over the C·h·w
    elements of each sample (the mean's 1/N, as the official loss's). The real score is guided, uncond + g ·
    (cond − uncond), against ``null`` (batched like ``text``); the fake one is not."""
    channels = x.shape[1]
    with torch.no_grad():
        xt = diffusion.q_sample(x.detach(), t, noise)
        eps_real = real(xt, t, *text)[:, :channels].float()
        if guidance != 1.0:  # 1 is the conditional score itself (and saves a pass)
            uncond = real(xt, t, *null)[:, :channels].float()
            eps_real = uncond + guidance * (eps_real - uncond)
        mu_real = predicted_x0(diffusion, xt, t, eps_real)
        mu_fake = predicted_x0(diffusion, xt, t, fake(xt, t, *text)[:, :channels].float())
        scale = (x.detach() - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        grad = torch.nan_to_num((mu_fake - mu_real) / scale)
    return 0.5 * mean_flat((x - (x - grad).detach()) ** 2)


def ssim_distance(vae, shift: float, scale: float, x: torch.Tensor, target: torch.Tensor, detail: bool = False
                  ) -> torch.Tensor:  # fmt: skip
    """:func:`dissimilarity` (B,) of the decoded latents x and target; gradients reach x through the frozen
    decoder."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.float() / scale + shift).sample.float()

    with torch.no_grad():
        reference = decode(target)
    return dissimilarity(decode(x), reference, detail)


def dissimilarity(image: torch.Tensor, reference: torch.Tensor, detail: bool = False) -> torch.Tensor:
    """1 − SSIM (B,) of images against references (pixels in [-1, 1], data range 2, SSIM's 11-px Gaussian window).
    With ``detail`` the SSIM map is averaged with weights σ² + C2, σ² the reference's local variance (its channels'
    mean) and C2 SSIM's own constant, in the manner of variance-weighted SSIM pooling: flat areas keep a little
    weight each and the edges carry the rest, so an image whose only object is small counts its edges as a whole,
    as an image with a large object does, where the plain mean dilutes them by the background's area."""
    import pytorch_msssim

    if not detail:
        return 1 - pytorch_msssim.ssim(image, reference, data_range=PIXEL_RANGE, K=SSIM_K, size_average=False)
    similarity, variance = ssim_map(image, reference, data_range=PIXEL_RANGE)
    weight = variance.mean(dim=1) + (SSIM_K[1] * PIXEL_RANGE) ** 2
    return 1 - (similarity.mean(dim=1) * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM's map (B, C, H − 10, W − 10) of x against y, as pytorch_msssim computes it (11-px Gaussian window, σ
    1.5, K = SSIM_K, no padding; its mean is pytorch_msssim.ssim), and y's local variance on the same grid."""
    from pytorch_msssim.ssim import gaussian_filter

    c1, c2 = ((k * data_range) ** 2 for k in SSIM_K)
    coords = torch.arange(11, dtype=torch.float32, device=x.device) - 5
    win = torch.exp(-(coords**2) / (2 * 1.5**2))
    win = (win / win.sum()).view(1, 1, -1).repeat(x.shape[1], 1, 1).unsqueeze(1).to(x.dtype)  # (C, 1, 1, 11)
    mu_x, mu_y = gaussian_filter(x, win), gaussian_filter(y, win)
    var_x = gaussian_filter(x * x, win) - mu_x**2
    var_y = gaussian_filter(y * y, win) - mu_y**2
    cov = gaussian_filter(x * y, win) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return luminance * (2 * cov + c2) / (var_x + var_y + c2), var_y


def fake_score_loss(
    fake: Denoiser, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, text, **kw
) -> torch.Tensor:
    """Per-sample ε-MSE (B,) of the fake score on the student's images x noised to t, x detached: the fake score
    learns the student's distribution without its loss reaching the student. ``kw`` goes to the fake score (a
    ``block_hook`` collecting the tokens the classifier reads)."""
    xt = diffusion.q_sample(x.detach(), t, noise)
    return mean_flat((fake(xt, t, *text, **kw)[:, : x.shape[1]].float() - noise) ** 2)


def classify(fake: Denoiser, head: Classifier, depth: int, diffusion, x, t, noise, text) -> torch.Tensor:
    """The classifier's logit (B,) of images x noised to t (gradients reach x if it has them)."""
    tokens = LastTokens(depth)
    fake(diffusion.q_sample(x, t, noise), t, *text, block_hook=tokens)
    return head(tokens.tokens)


def classifier_loss(logit_data: torch.Tensor, logit_student: torch.Tensor) -> torch.Tensor:
    """The classifier's non-saturating loss per sample (B,): data scores high, the student's images low."""
    return F.softplus(-logit_data) + F.softplus(logit_student)


def draw(seed: int, step: int, indices, shape, settings: DMDConfig) -> list[torch.Tensor]:
    """Per-sample (student noise, DM timestep, DM noise, fake timestep, fake noise) for these global indices of
    ``step``'s batch."""
    low, high = settings.min_timestep, settings.max_timestep + 1

    def draws(gen):
        return (torch.randn(shape, generator=gen), torch.randint(low, high, (), generator=gen),
                torch.randn(shape, generator=gen), torch.randint(low, high, (), generator=gen),
                torch.randn(shape, generator=gen))  # fmt: skip

    return per_sample(seed, step, indices, DRAW_STREAM, draws)


def draw_fake(seed: int, step: int, indices, shape, settings: DMDConfig, update: int) -> list[torch.Tensor]:
    """Per-sample (student noise, fake timestep, fake noise) of the fake score's extra update ``update`` (≥ 1), and
    with the GAN term (data timestep, data noise) after them."""
    low, high = settings.min_timestep, settings.max_timestep + 1

    def draws(gen):
        drawn = (torch.randn(shape, generator=gen), torch.randint(low, high, (), generator=gen),
                 torch.randn(shape, generator=gen))  # fmt: skip
        if settings.gan_weight:
            drawn += (torch.randint(low, high, (), generator=gen), torch.randn(shape, generator=gen))
        return drawn

    return per_sample(seed, step, indices, FAKE_STREAM + update, draws)


def draw_gan(seed: int, step: int, indices, shape, settings: DMDConfig) -> list[torch.Tensor]:
    """Per-sample (generator timestep, generator noise, data timestep, data noise) of the GAN term."""
    low, high = settings.min_timestep, settings.max_timestep + 1

    def draws(gen):
        return (torch.randint(low, high, (), generator=gen), torch.randn(shape, generator=gen),
                torch.randint(low, high, (), generator=gen), torch.randn(shape, generator=gen))  # fmt: skip

    return per_sample(seed, step, indices, GAN_STREAM, draws)


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """Parameters without gradients inside (a frozen judge whose input still gets its gradient)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def draw_pairs(seed: int, step: int, indices, num_pairs: int) -> torch.Tensor:
    """The teacher pair (index into the pairs) of each of these global indices of ``step``'s regression pass."""
    gens = (sample_generator(seed, step, index, PAIR_INDEX_STREAM) for index in indices)
    return torch.stack([torch.randint(0, num_pairs, (), generator=gen) for gen in gens])


@torch.no_grad()
def make_pairs(
    teacher,
    batches,
    null,
    scheduler_config: dict,
    settings: DMDConfig,
    seed: int,
    device,
    progress: bool = False,
    start: int = 0,
) -> dict:
    """The teacher's noise → image pairs ``start`` to ``settings.num_pairs`` of the data order, from ``batches``, an
    iterable of (text features, mask, resolution, aspect ratio, latent shape) beginning at sample ``start`` (see
    :func:`pair_batches`), one shape throughout: dpm++ ``pair_steps`` steps at ``pair_guidance`` from the noise of
    :data:`PAIR_STREAM`. Returns the tensors of RUN/dmd-pairs.safetensors (with ``start``, its pairs from index
    ``start`` on: each pair's noise is seeded by its index, so the pairs of a file extended this way are those of one
    made whole)."""
    from tqdm.auto import tqdm

    from pixart.sampling.samplers import Conditioning, denoise, make_scheduler

    out = {k: [] for k in ("noise", "latents", "text_features", "text_mask", "resolution", "aspect_ratio")}
    made, channels = start, teacher.config.in_channels
    bar = tqdm(total=settings.num_pairs, initial=start, desc="teacher pairs", unit="pair", disable=not progress)
    batches = iter(batches)
    while made < settings.num_pairs:  # asks for no batch beyond the last pair (each is encoded when asked for)
        features, mask, resolution, aspect_ratio, shape = next(batches)
        n = min(len(features), settings.num_pairs - made)
        features, mask, resolution, aspect_ratio = (v[:n] for v in (features, mask, resolution, aspect_ratio))
        noise = torch.stack([torch.randn((channels, *shape), generator=sample_generator(seed, 0, made + i, PAIR_STREAM))
                             for i in range(n)])  # fmt: skip
        every, none = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        negative, positive = drop_captions(features, mask, every, *null), drop_captions(features, mask, none, *null)
        # Guided: negative rows first, as the pipeline batches them.
        rows = [negative, positive] if settings.pair_guidance > 1.0 else [positive]
        text, text_mask = (torch.cat([r[k] for r in rows]).to(device) for k in (0, 1))
        conditioning = Conditioning(text, text_mask, resolution[:1].to(device), aspect_ratio[:1].to(device))
        scheduler = make_scheduler("dpm++", scheduler_config)
        latents = denoise(teacher, scheduler, noise.to(device), conditioning, steps=settings.pair_steps,
                          guidance=settings.pair_guidance)  # fmt: skip
        values = (noise, latents.float().cpu(), features.float(), mask, resolution.float(), aspect_ratio.float())
        for key, value in zip(out, values, strict=True):
            out[key].append(value)
        made += n
        bar.update(n)
    bar.close()
    return {k: torch.cat(v).contiguous() for k, v in out.items()}


def pair_batches(config: TrainConfig, base: DiffusionObjective, loader, skip: int = 0):
    """(features, mask, resolution, aspect ratio, latent shape) of the data order's square-bucket batches, for the
    pairs: one latent shape, so the pairs stack. The first ``skip`` samples (pairs made already) are left out before
    their captions or images are encoded."""
    from pixart.train.data import BatchLoader

    size = config.data.batch_size  # one process reading whole global batches: the same pairs on 1 or N processes
    if len(loader.data.groups.get(1.0, ())) < size:
        raise PixArtError(
            f"dmd: the teacher pairs are made at the square bucket, and the data has fewer than a batch "
            f"({size}) of square images; add square images or lower data.batch_size"
        )
    order = BatchLoader(loader.data, size, seed=config.run.seed)
    epoch = 0
    while True:  # captions repeat with other noise if the data has fewer than dmd.num_pairs
        for batch in order.epoch(epoch):
            if float(batch["aspect_ratio"][0]) != 1.0:
                continue
            if skip >= len(batch["aspect_ratio"]):
                skip -= len(batch["aspect_ratio"])
                continue
            x0, _, _, features, mask, _ = base.inputs(batch, 0, 0)
            yield (features.cpu()[skip:], mask.cpu()[skip:], batch["resolution"][skip:], batch["aspect_ratio"][skip:],
                   tuple(x0.shape[2:]))  # fmt: skip
            skip = 0
        epoch += 1


def open_pairs(config: TrainConfig, base: DiffusionObjective, teacher, loader, accelerator) -> dict:
    """The teacher's pairs for this run, made by the main process (or taken from dmd.pairs if made with the same
    settings) and read by every process."""
    s = config.dmd
    path = Path(s.pairs or Path(config.run.output_dir) / "dmd-pairs.safetensors")
    settings = {"source": str(config.model.source), "data": config.data.cache or config.data.dataset,
                "seed": config.run.seed, "num_pairs": s.num_pairs,
                "pair_steps": s.pair_steps, "pair_guidance": s.pair_guidance}  # fmt: skip
    found = _pairs_settings(path)
    # A file made with these settings but another number of pairs holds this run's first pairs (per-index seeds).
    kept = found["num_pairs"] if found and {**found, "num_pairs": s.num_pairs} == settings else 0
    if accelerator.is_main_process and kept < s.num_pairs:
        log.info("making %d teacher pairs (dpm++ %d steps, guidance %g) in %s%s", s.num_pairs - kept, s.pair_steps,
                 s.pair_guidance, path, f", after the {kept} made" if kept else "")  # fmt: skip
        scheduler = read_scheduler_config(config.model.pipeline or config.model.source)
        batches = pair_batches(config, base, loader, skip=kept)
        pairs = make_pairs(teacher, batches, base.null, scheduler, s, config.run.seed, base.device,
                           progress=config.logging.progress, start=kept)  # fmt: skip
        if kept:
            pairs = {k: torch.cat([v, pairs[k]]).contiguous() for k, v in load_file(str(path)).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(pairs, str(tmp), metadata={"dmd": json.dumps(settings)}))
    accelerator.wait_for_everyone()
    return {k: v[: s.num_pairs] for k, v in load_file(str(path)).items()}  # a larger file: its first pairs


def _pairs_settings(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("dmd", "null"))


class DMDObjective(Objective):
    """The trainer's loss for DMD: per micro-batch the distribution-matching pass (which also trains the fake score)
    and a regression pass on teacher pairs; the fake score and its optimizer live here."""

    def __init__(self, base: DiffusionObjective, teacher: torch.nn.Module, config: TrainConfig, loader, accelerator):
        """base gives the captions and the null caption; teacher is the loaded model before training, which the
        fake score copies."""
        from pixart.train.loop import make_optimizer

        self.base, self.settings, self.accelerator = base, config.dmd, accelerator
        self.seed, self.grad_accum, self.grad_clip = config.run.seed, config.optim.grad_accum, config.optim.grad_clip
        self.teacher = teacher.to(base.device).eval().requires_grad_(False)
        self.fake = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.fake.gradient_checkpointing = config.model.gradient_checkpointing
        self.depth = len(self.fake.blocks)
        self.head = Classifier(self.fake.config.hidden_size).to(base.device) if self.settings.gan_weight else None
        groups = [{"params": list(self.fake.parameters())}]
        if self.head is not None:  # its own group: a new head may learn faster than the pretrained body
            groups.append({"params": list(self.head.parameters())})
        self.fake_optimizer = make_optimizer(config, groups)
        fake_lr = self.settings.fake_lr or config.optim.lr
        rates = [fake_lr, self.settings.gan_head_lr or fake_lr][: len(groups)]
        for group, lr in zip(self.fake_optimizer.param_groups, rates, strict=True):
            group["lr"] = lr
        self.pairs = open_pairs(config, base, self.teacher, loader, accelerator)
        self.vae = None
        if self.settings.regression_distance in ("ssim", "detail_ssim"):
            from pixart.train.objective import load_frozen_encoders

            self.vae = base.vae
            if self.vae is None:  # a feature cache: the base objective loaded none
                self.vae = load_frozen_encoders(config, teacher, base.device, need_text=False, need_vae=True)[1]
        self.captions: list[tuple] = []  # this step's micro-batches, for the fake score's extra updates

    def passes(self, batch: dict, first: int, step: int) -> list[tuple[dict, int, float]]:
        """The captions' distribution-matching pass, then as many teacher pairs for the regression loss."""
        if not self.settings.regression_weight:
            return [(batch, first, 1.0)]
        size = len(batch["resolution"])
        return [(batch, first, 1.0), ({"pairs_of": size}, first, self.settings.regression_weight)]

    def loss(self, model, batch: dict, first: int, step: int) -> torch.Tensor:
        """The distribution-matching loss of a micro-batch's captions (backpropagating the fake score's denoising
        loss into the fake score on the way), or for a regression pass its regression loss."""
        if "pairs_of" in batch:
            return self.regression_loss(model, batch["pairs_of"], first, step)
        base, s, diffusion = self.base, self.settings, self.base.diffusion
        x0, _, _, features, mask, _ = base.inputs(batch, first, step)
        device = x0.device
        indices = range(first, first + len(x0))
        z, t_dm, noise_dm, t_fake, noise_fake = (v.to(device) for v in draw(self.seed, step, indices, x0.shape[1:], s))
        # drop_captions pads caption and null caption to one length (α's null caption has 120 tokens).
        every, none = torch.ones(len(x0), dtype=torch.bool), torch.zeros(len(x0), dtype=torch.bool)
        null = drop_captions(features, mask, every, *base.null)
        text = drop_captions(features, mask, none, *base.null)
        resolution, aspect_ratio = batch["resolution"].to(device), batch["aspect_ratio"].to(device)

        def denoiser(net) -> Denoiser:
            return lambda x, t, f, m, **kw: net(x, t, f, m, resolution, aspect_ratio, **kw)

        x = one_step(denoiser(model), diffusion, z, s.start_timestep, text)
        fake = denoiser(self.fake)
        with self.accelerator.autocast():
            losses = distribution_matching_loss(x, denoiser(self.teacher), fake, diffusion, t_dm, noise_dm, text,
                                                null, s.guidance)  # fmt: skip
            data = ()
            if self.head is not None:
                t_gen, noise_gen, t_data, noise_data = (
                    v.to(device) for v in draw_gan(self.seed, step, indices, x0.shape[1:], s)
                )
                with frozen(self.fake, self.head):  # the student's GAN gradient reaches the student alone
                    logit = classify(fake, self.head, self.depth, diffusion, x, t_gen, noise_gen, text)
                losses = losses + s.gan_weight * F.softplus(-logit)
                data = (x0, t_data, noise_data)
            # The fake score trains on the same images, after they served the step above (the fake score that
            # judged them is this step's, as in DMD); its gradients accumulate until after_step.
            fake_loss = self.fake_loss(fake, x, t_fake, noise_fake, text, *data)
        (fake_loss / self.grad_accum).backward()
        if s.fake_updates > 1:
            self.captions.append((step, indices, x0.shape[1:], text, denoiser, x0))
        return losses.mean()

    def fake_loss(self, fake: Denoiser, x, t, noise, text, data=None, t_data=None, noise_data=None) -> torch.Tensor:
        """The fake score's loss on the student's images x: its denoising loss, and with the GAN term the
        classifier's, on x's tokens from that same pass against the data's latents noised to t_data."""
        if self.head is None:
            return fake_score_loss(fake, self.base.diffusion, x, t, noise, text).mean()
        tokens = LastTokens(self.depth)
        denoising = fake_score_loss(fake, self.base.diffusion, x, t, noise, text, block_hook=tokens)
        logit_data = classify(fake, self.head, self.depth, self.base.diffusion, data, t_data, noise_data, text)
        classifier = classifier_loss(logit_data, self.head(tokens.tokens))
        return (denoising + self.settings.gan_classifier_weight * classifier).mean()

    def regression_loss(self, model, size: int, first: int, step: int) -> torch.Tensor:
        """Mean regression distance (dmd.regression_distance) of the student's one-step images of ``size`` seeded
        teacher pairs from the teacher's."""
        device, pairs = self.base.device, self.pairs
        index = draw_pairs(self.seed, step, range(first, first + size), len(pairs["noise"]))
        z, target = pairs["noise"][index].to(device), pairs["latents"][index].to(device)
        none = torch.zeros(size, dtype=torch.bool)
        text = drop_captions(pairs["text_features"][index], pairs["text_mask"][index], none, *self.base.null)
        text = tuple(v.to(device) for v in text)
        resolution, aspect_ratio = pairs["resolution"][index].to(device), pairs["aspect_ratio"][index].to(device)
        student = lambda x, t, f, m: model(x, t, f, m, resolution, aspect_ratio)  # noqa: E731
        x = one_step(student, self.base.diffusion, z, self.settings.start_timestep, text)
        if self.vae is None:
            return mean_flat((x - target) ** 2).mean()
        detail = self.settings.regression_distance == "detail_ssim"
        return ssim_distance(self.vae, self.base.vae_shift, self.base.vae_scale, x, target, detail).mean()

    def after_step(self, model) -> None:
        """Step the fake score on its gradients of the whole global batch; then, for dmd.fake_updates > 1, train it
        further on new one-step images of the step's captions from the student just updated."""
        self.step_fake()
        for update in range(1, self.settings.fake_updates):
            for step, indices, shape, text, denoiser, data in self.captions:
                device = self.base.device
                z, t, noise, *gan = (
                    v.to(device) for v in draw_fake(self.seed, step, indices, shape, self.settings, update)
                )
                with torch.no_grad():
                    x = one_step(denoiser(model), self.base.diffusion, z, self.settings.start_timestep, text)
                with self.accelerator.autocast():
                    loss = self.fake_loss(denoiser(self.fake), x, t, noise, text, data, *gan)
                (loss / self.grad_accum).backward()
            self.step_fake()
        self.captions.clear()

    def step_fake(self) -> None:
        """One optimizer step of the fake score on its gradients, averaged over the processes."""
        params = [p for p in self.fake.parameters() if p.grad is not None]
        if self.accelerator.num_processes > 1:
            for p in params:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.fake_optimizer.step()
        self.fake_optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        weights = {k: v.detach().cpu().contiguous() for k, v in self.fake.state_dict().items()}
        optimizer = {}
        for index, values in self.fake_optimizer.state_dict()["state"].items():
            for key, value in values.items():
                optimizer[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        state = {"fake": weights, "fake_optimizer": optimizer}
        if self.head is not None:
            state["fake_head"] = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], checkpoint: Path) -> None:
        if "fake" not in state or "fake_optimizer" not in state:
            raise PixArtError(
                f"checkpoint {checkpoint} has no DMD fake score (fake.safetensors, fake_optimizer.safetensors): it "
                "comes from a run without dmd.enabled; start the run anew instead of resuming it"
            )
        self.fake.load_state_dict(state["fake"])
        if self.head is not None:
            if "fake_head" in state:
                self.head.load_state_dict(state["fake_head"])
            else:
                log.info("checkpoint %s has no GAN classifier (fake_head.safetensors): starting a new one", checkpoint)
        saved: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in state["fake_optimizer"].items():
            index, key = name.split(".", 1)
            saved.setdefault(int(index), {})[key] = value
        groups = self.fake_optimizer.state_dict()["param_groups"]  # the settings are the config's, not saved
        self.fake_optimizer.load_state_dict({"state": saved, "param_groups": groups})
