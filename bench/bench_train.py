"""Training throughput (samples/s) of pixart's trainer step against a plain diffusers training loop.

1. ours vs diffusers: the same mid-size transformer (width 384, depth 8, 6 heads, T5-XXL-wide captions),
   identical weights (pixart.checkpoints.diffusers.to_diffusers_state_dict), batch 4 of 32×32 latents, fp32, AdamW,
   gradient clipping. Ours is the trainer's own step (pixart.train.objective.DiffusionObjective: per-sample
   seeded noise, caption dropout, hybrid ε-MSE + VLB loss); diffusers' is the loop of its training examples
   (DDPMScheduler.add_noise, ε-MSE). Steps of the two alternate so machine load hits both alike.
2. ours with vs without the feature cache: the same step fed cached latents/T5 features, or images and
   captions that go through the VAE and T5 first. CPU-sized stand-ins: an SD-VAE-shaped AutoencoderKL
   (random weights, 256-px images) and a T5-base-shaped encoder (768-d; T5-XXL is ~20× larger, so the
   real gap is wider).
3. with --bf16: the trainer step in fp32 against the same step under bf16 autocast, as accelerate runs
   ``optim.mixed_precision = "bf16"`` on a CPU (fp32 weights and optimizer, bf16 matmuls). Worth it only on a
   CPU with bf16 units (avx512_bf16, AMX); the header names this CPU's.

    python bench/bench_train.py --steps 6  # ≈15 min on a busy 2-core CPU (the README table)
    python bench/bench_train.py --steps 3  # smoke run
    python bench/bench_train.py --steps 6 --bf16  # also fp32 vs bf16 autocast
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from pixart.checkpoints.diffusers import diffusers_config, to_diffusers_state_dict
from pixart.inference.cpu_units import describe_cpu
from pixart.model.config import PixArtConfig
from pixart.model.text import TextEncoder
from pixart.model.transformer import PixArtTransformer
from pixart.train.config import load_config
from pixart.train.objective import DiffusionObjective

BATCH, SIDE, TEXT_TOKENS = 4, 32, 40


def model_config(caption_channels: int) -> PixArtConfig:
    return PixArtConfig(
        family="alpha", sample_size=SIDE, pe_scale=1.0, hidden_size=384, depth=8, num_heads=6,
        caption_channels=caption_channels, model_max_length=120,
    )  # fmt: skip


def trainer_objective(model, text=None, vae=None) -> DiffusionObjective:
    """The trainer's DiffusionObjective for a cached run; text/vae switch it to encoding images and captions."""
    config = load_config(
        None, ["--model.preset=debug-alpha", "--data.cache=unused", "--diffusion.null_caption=embedding"]
    )
    cache = SimpleNamespace(data=SimpleNamespace(scaling_factor=0.18215, shift_factor=None))
    objective = DiffusionObjective(config, model, cache, torch.device("cpu"))
    objective.text, objective.vae = text, vae
    return objective


def cached_batch(caption_channels: int) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(BATCH, 120, dtype=torch.long)
    mask[:, :TEXT_TOKENS] = 1
    return {
        "latent_mean": torch.randn(BATCH, 4, SIDE, SIDE, generator=g),
        "latent_std": torch.full((BATCH, 4, SIDE, SIDE), 0.05),
        "text_features": torch.randn(BATCH, 120, caption_channels, generator=g) * mask[..., None],
        "text_mask": mask,
        "resolution": torch.tensor([[SIDE * 8.0] * 2] * BATCH),
        "aspect_ratio": torch.ones(BATCH),
    }


def image_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.rand(BATCH, 3, SIDE * 8, SIDE * 8, generator=g) * 2 - 1,
        "caption": [
            f"a photo of a small {c} house by a lake at dusk, oil painting" for c in ("red", "blue", "tan", "grey")
        ],
        "resolution": torch.tensor([[SIDE * 8.0] * 2] * BATCH),
        "aspect_ratio": torch.ones(BATCH),
    }


def ours_step(model, objective, optimizer, batch, step):
    loss = objective.loss(model, batch, 0, step)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def diffusers_step(model, scheduler, optimizer, batch, step):
    x0 = (batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_mean"])) * 0.18215
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (len(x0),))
    noisy = scheduler.add_noise(x0, noise, t)
    out = model(noisy, batch["text_features"], t, encoder_attention_mask=batch["text_mask"],
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample  # fmt: skip
    F.mse_loss(out[:, :4], noise).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def interleaved(runs: dict, steps: int, warmup: int = 2) -> dict[str, float]:
    """Median samples/s of each named step function, their steps alternating."""
    times = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run(i)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: BATCH / statistics.median(t) for name, t in times.items()}


def ours_vs_diffusers(steps: int) -> dict[str, float]:
    cfg = model_config(4096)
    torch.manual_seed(0)
    ours = PixArtTransformer(cfg)
    ref = PixArtTransformer2DModel(**diffusers_config(cfg))
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict(), cfg))
    ours.train(), ref.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, eps=1e-10, weight_decay=0.03)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-5, eps=1e-10, weight_decay=0.03)
    objective, scheduler, batch = trainer_objective(ours), DDPMScheduler(), cached_batch(4096)
    return interleaved(
        {
            "pixart trainer step": lambda i: ours_step(ours, objective, opt_ours, batch, i),
            "diffusers plain loop": lambda i: diffusers_step(ref, scheduler, opt_ref, batch, i),
        },
        steps,
    )


def cache_vs_no_cache(steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, vocab_size=384,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()  # fmt: skip
    text = TextEncoder(ByT5Tokenizer(), t5)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
    ).eval().requires_grad_(False)  # fmt: skip
    model = PixArtTransformer(model_config(768)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cached = trainer_objective(model)
    uncached = trainer_objective(model, text, vae)
    batch, images = cached_batch(768), image_batch()
    return interleaved(
        {
            "with feature cache": lambda i: ours_step(model, cached, optimizer, batch, i),
            "without cache (VAE + T5 each step)": lambda i: ours_step(model, uncached, optimizer, images, i),
        },
        steps,
        warmup=1,
    )


def fp32_vs_bf16(steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = PixArtTransformer(model_config(4096)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-10, weight_decay=0.03)
    objective, batch = trainer_objective(model), cached_batch(4096)

    def bf16_step(i: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate's mixed_precision="bf16" does on CPU
            loss = objective.loss(model, batch, 0, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return interleaved(
        {"fp32": lambda i: ours_step(model, objective, optimizer, batch, i), "bf16 autocast": bf16_step}, steps
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--bf16", action="store_true", help="also time the trainer step in fp32 vs bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {describe_cpu()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {BATCH}, latents {SIDE}×{SIDE}")
    speed = ours_vs_diffusers(args.steps)
    mine, theirs = speed["pixart trainer step"], speed["diffusers plain loop"]
    print("\n| width 384, depth 8, 6 heads, captions 4096-d | samples/s |")
    print("|---|---|")
    for name, value in speed.items():
        print(f"| {name} | {value:.2f} |")
    print(f"| **ratio ours / diffusers** | **{mine / theirs:.2f}×** |")
    speed = cache_vs_no_cache(max(2, args.steps // 3))
    cached, uncached = speed["with feature cache"], speed["without cache (VAE + T5 each step)"]
    print("\n| trainer step, width 384, depth 8, captions 768-d | samples/s |")
    print("|---|---|")
    for name, value in speed.items():
        print(f"| {name} | {value:.2f} |")
    print(f"| **speed-up from the cache** | **{cached / uncached:.1f}×** |")
    if args.bf16:
        speed = fp32_vs_bf16(args.steps)
        print("\n| trainer step, width 384, depth 8, captions 4096-d | samples/s |")
        print("|---|---|")
        for name, value in speed.items():
            print(f"| {name} | {value:.2f} |")
        print(f"| **bf16 / fp32** | **{speed['bf16 autocast'] / speed['fp32']:.2f}×** |")


if __name__ == "__main__":
    main()
