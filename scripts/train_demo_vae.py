"""Retrain the bundled demo VAE to draw any colour while the shapes data keeps today's latents.

    python scripts/train_demo_vae.py --workdir runs/demo-vae            # the run behind the bundled VAE
    python scripts/train_demo_vae.py --workdir /tmp/vae --steps 2 --images 16 --check 8   # smoke
    python scripts/train_demo_vae.py --report src/pixart/assets/demo/vae                  # measure a VAE

Today's VAE learnt from shapes images only, and its encoder already maps black, grey and green to
nearly the same latent, so no decoder can tell them apart again. This trains encoder and decoder from
today's weights on colour-rich images (:mod:`pixart.demo.colours`: random flat colours and procedural
scenes, plus shapes images) while a second loss holds the encoder's latents of shapes images to today's
encoder's: the bundled transformer, which only ever saw those latents, keeps working unchanged. The hold covers
the layout maps of those images too (white shapes on black, :func:`pixart.inference.control.layout_map`), which
the bundled ``demo-layout`` ControlNet reads through the encoder. The ``scaling_factor`` stays today's for the
same reason. Writes WORKDIR/vae (the latest checkpoint, a
diffusers folder) and WORKDIR/report.json (PSNR on each test set for today's VAE and the new one,
the checker on round-tripped shapes images, the latent drift on shapes images and layout maps, the wall time).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pixart.demo import checker, colours, components
from pixart.demo.shapes import Scene, write_dataset

log = logging.getLogger("train_demo_vae")
BUNDLED = Path(__file__).resolve().parents[1] / "src" / "pixart" / "assets" / "demo" / "vae"


def test_sets(work: Path, check: int) -> dict[str, torch.Tensor]:
    """The fixed images every VAE is measured on: the 32 flat colours, the chart, 200 unseen procedural
    scenes, the sample photos' crops when scikit-learn is installed, and `check` unseen shapes images."""
    write_dataset(work / "shapes-check", check, seed=102, force=True, progress=False)
    sets = {"flat colours (32)": colours.flat_images(), "colour chart": colours.colour_chart(),
            "procedural scenes (200)": colours.natural_like(200, seed=10_000)}  # fmt: skip
    if (photos := colours.photos()) is not None:
        sets[f"photo crops ({len(photos)})"] = photos
    sets[f"shapes ({check})"] = components.images_tensor(work / "shapes-check")
    return sets


@torch.no_grad()
def report(vae, teacher, sets: dict[str, torch.Tensor], work: Path) -> dict:
    """PSNR on each set, the checker on round-tripped shapes images, and how far the shapes latents moved."""
    out = {name: round(components.psnr(components.roundtrip(vae, images), images), 2) for name, images in sets.items()}
    flat = colours.flat_images()
    worst = ((components.roundtrip(vae, flat) - flat).abs().mean((2, 3)) * 127.5).max().item()
    out["flat colours: worst channel error (levels)"] = round(worst, 1)
    rows = [json.loads(line) for line in (work / "shapes-check" / "metadata.jsonl").read_text().splitlines()]
    shapes = sets[f"shapes ({len(rows)})"]
    recon = components.to_pil(components.roundtrip(vae, shapes))
    scores = checker.score(checker.check(im, Scene.from_dict(r)) for im, r in zip(recon, rows, strict=True))
    out["checker on round trips: one object all correct"] = scores.get("single_all")
    out["checker on round trips: two objects fully correct"] = scores.get("pair_full")
    if teacher is not None:
        for name, images in (("shapes", shapes), ("layout maps", layout_maps(shapes))):
            new, old = vae.encode(images).latent_dist.mean, teacher.encode(images).latent_dist.mean
            drift = ((new - old).pow(2).mean().sqrt() / old.std()).item()
            out[f"{name} latents: RMS change / latent std"] = round(drift, 4)
    return out


def layout_maps(images: torch.Tensor) -> torch.Tensor:
    """The ``--control-type layout`` maps of shapes images (N, 3, H, W) in [-1, 1], as the ControlNet's VAE sees."""
    from pixart.inference.control import layout_map

    arrays = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    maps = torch.stack([torch.from_numpy(layout_map(a)) for a in arrays]).float() / 127.5 - 1
    return maps[:, None].expand(-1, 3, -1, -1).contiguous()


def colour_batch(n: int, crop: int, pool: torch.Tensor, gen: torch.Generator, flat_share: float = 0.25) -> torch.Tensor:
    """n crops: ``flat_share`` of them flat colours drawn uniformly from the RGB cube, the rest from the procedural
    pool."""
    flat = round(n * flat_share)
    rgb = torch.rand(flat, 3, 1, 1, generator=gen) * 2 - 1
    picked = pool[torch.randint(len(pool), (n - flat,), generator=gen)]
    top, left = torch.randint(pool.shape[-1] - crop + 1, (2,), generator=gen).tolist()
    return torch.cat([rgb.expand(-1, -1, crop, crop), picked[..., top : top + crop, left : left + crop]])


def train(vae, teacher, shapes: torch.Tensor, pool: torch.Tensor, steps: int, args, save) -> None:
    """Reconstruction on colour-rich crops and shapes images, plus the latent hold on the shapes images.

    The hold compares whole 64-px images, as the transformer sees them: a crop's border would change
    the latents near it. Its weight is high because the transformer is blind to any other latent space.
    """
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        batch = colour_batch(args.batch, args.crop, pool, gen, args.flat_share)
        held = shapes[torch.randint(len(shapes), (args.shapes_batch,), generator=gen)]  # and their layout maps
        with torch.no_grad():
            target = teacher.encode(held).latent_dist.mean
        colour_loss, _, _ = components.vae_loss(vae, batch, gen)
        shapes_loss, posterior, _ = components.vae_loss(vae, held, gen)
        hold = F.mse_loss(posterior.mean, target) / target.var()
        loss = colour_loss + shapes_loss + args.hold * hold
        components.optimizer_step(optimizer, schedule, vae.parameters(), loss)
        if step % 50 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f hold %.5f", step + 1, steps, loss.item(), hold.item())
        if (step + 1) % args.save_every == 0 or step == steps - 1 or step + 1 == args.stop_after:
            save(vae)
        if step + 1 == args.stop_after:
            break  # the schedule of a longer run, cut short: how the bundled VAE's second stage ended
    vae.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo-vae"))
    parser.add_argument("--start", type=Path, default=BUNDLED, help="the VAE to start from and to hold latents to")
    parser.add_argument("--init", type=Path, help="weights to continue from (default: --start's)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--images", type=int, default=2000, help="shapes images to train on (and pool size)")
    parser.add_argument("--check", type=int, default=400, help="unseen shapes images to measure on")
    parser.add_argument("--batch", type=int, default=16, help="colour-rich crops per step")
    parser.add_argument("--shapes-batch", type=int, default=8, help="whole shapes images per step")
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument(
        "--no-hold-layout",
        dest="hold_layout",
        action="store_false",
        help="hold the shapes images' latents only, not their layout maps'",
    )
    parser.add_argument("--flat-share", type=float, default=0.25, help="share of the colour-rich crops that are flat")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--hold", type=float, default=10.0, help="weight of the shapes-latent hold")
    parser.add_argument("--groups", type=int, default=None, help="GroupNorm groups (default: the start VAE's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this step of the --steps schedule")
    parser.add_argument("--report", type=Path, help="only measure this VAE folder beside --start, print the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    teacher = AutoencoderKL.from_pretrained(args.start).eval().requires_grad_(False)
    sets = test_sets(work, args.check)
    if args.report:
        candidate = AutoencoderKL.from_pretrained(args.report).eval()
        measured = {"start": report(teacher, None, sets, work), "candidate": report(candidate, teacher, sets, work)}
        print(json.dumps(measured, indent=2))
        return 0
    started = time.perf_counter()
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}  # no builder's path in the bundle
    if args.groups:
        config["norm_num_groups"] = args.groups  # GroupNorm's weights are per channel: the same tensors load
    vae = AutoencoderKL(**config)
    vae.load_state_dict((AutoencoderKL.from_pretrained(args.init) if args.init else teacher).state_dict())
    write_dataset(work / "shapes-train", args.images, seed=101, force=True, progress=False)
    shapes = components.images_tensor(work / "shapes-train")
    if args.hold_layout:
        shapes = torch.cat([shapes, layout_maps(shapes)])
    pool = colours.natural_like(args.images, seed=args.seed)

    def save(model):
        model.save_pretrained(work / "vae")

    train(vae, teacher, shapes, pool, args.steps, args, save)
    save(vae)
    result = {"seconds": round(time.perf_counter() - started, 1), "args": {k: str(v) for k, v in vars(args).items()},
              "today": report(teacher, None, sets, work), "new": report(vae, teacher, sets, work)}  # fmt: skip
    (work / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
