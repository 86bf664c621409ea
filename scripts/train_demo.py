"""Train the bundled demo pipeline from nothing on a CPU: data, VAE, text encoder, three transformer stages.

    sh scripts/train_demo.sh                         # the documented full run (VAE and T5 side by side)
    python scripts/train_demo.py                     # the same, all in one process
    python scripts/train_demo.py --smoke --workdir /tmp/demo-smoke   # every step for a handful of steps

Writes under --workdir (default runs/demo, the paths the demo-stage*.toml recipes name):
shapes-64/, shapes-pairs/ (pair-heavy) and shapes-128/ (the procedural data), base/ (VAE, T5, tokenizer,
scheduler), init.safetensors, stage1/, stage2/, stage2b/ and stage2c/ (stage 2's second and third phases),
base-layout/ (base with the text encoder's pretraining continued on where each object is) and stage2d/
(stage 2's fourth phase, through it), stage2-as-128px.safetensors, stage3/ (runs of `pixart train`),
pipeline-stage{2c,2,3}/ (exported diffusers pipelines; pipeline-stage2 holds stage2d's EMA weights, the
bundle) and report.json (VAE quality, wall times). Evaluate a pipeline with `pixart eval --model
WORKDIR/pipeline-stage2`; docs/demo.md records the numbers of the bundled one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

import torch

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.export import export_pipeline
from pixart.checkpoints.ours import save_pixart
from pixart.demo import checker, components
from pixart.demo.shapes import Scene, write_dataset
from pixart.model.transformer import PixArtTransformer
from pixart.train.config import load_config
from pixart.train.loop import train

log = logging.getLogger("train_demo")

FULL = {"images": 16000, "images_pairs": 24000, "images_128": 3000, "vae_steps": 2500, "t5_steps": 1500,
        "layout_steps": 1000, "stage1": 1000, "stage2": 6000, "stage2b": 12000, "stage2c": 14000, "stage2d": 8000,
        "stage3": 500, "scratch": 7000}  # fmt: skip
SMOKE = {"images": 16, "images_pairs": 16, "images_128": 8, "vae_steps": 2, "t5_steps": 2, "stage1": 2, "stage2": 2,
         "stage2b": 2, "stage2c": 2, "layout_steps": 2, "stage2d": 2, "stage3": 2, "scratch": 4}  # fmt: skip
PAIRS = 0.75
"""`write_dataset(pairs=...)` of the pair-heavy set stage 2c trains on: 65% of its images show two objects."""
SIZES_64 = ((64, 64),)
"""(width, height) the 64-px stages train at, recorded in their pipelines so the CLI and server refuse other sizes."""
SIZES_128 = ((128, 128), (160, 96), (96, 160))
"""Stage 3's buckets of the 128-px table."""


def vae_report(vae, folder: Path, limit: int) -> dict:
    """Reconstruction PSNR and the checker's accuracy on original vs VAE round-tripped images."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()][:limit]
    images = components.images_tensor(folder, limit)
    recon = components.roundtrip(vae, images)
    scenes = [Scene.from_dict(r) for r in rows]
    before = checker.score(checker.check(im, s) for im, s in zip(components.to_pil(images), scenes, strict=True))
    after = checker.score(checker.check(im, s) for im, s in zip(components.to_pil(recon), scenes, strict=True))
    keys = ("single_all", "pair_full")
    return {"psnr_db": round(components.psnr(recon, images), 2), "images": len(rows),
            "checker_original": {k: before.get(k) for k in keys}, "checker_roundtrip": {k: after.get(k) for k in keys},
            "scaling_factor": vae.config.scaling_factor}  # fmt: skip


def as_128px(source: Path, out: Path) -> Path:
    """The 64-px model re-expressed at 128 px: sample_size 16→32 and pe scale 1→2 give the same positions."""
    model = load_transformer(source)
    config = components.demo_transformer_config(128)
    moved = PixArtTransformer(config)
    moved.load_state_dict(model.state_dict())
    return save_pixart(moved, out)


def stage(recipe: str, work: Path, steps: int, overrides: list[str], cache: Path | None = None) -> Path:
    """Run one demo-stage recipe with its paths moved under `work`, from a feature cache when given."""
    if cache is not None and cache.is_dir():
        overrides = [*overrides, "data.dataset=", f"data.cache={cache}"]
    config = load_config(recipe, [f"schedule.max_steps={steps}", *overrides])
    for section, key in (("run", "output_dir"), ("model", "source"), ("model", "pipeline"), ("data", "dataset")):
        if value := getattr(getattr(config, section), key):
            setattr(getattr(config, section), key, str(work / Path(value).relative_to("runs/demo")))
    return train(config)


CACHES = (("shapes-64", 64, "label", "cache-64-label"), ("shapes-64", 64, "text", "cache-64-text"),
          ("shapes-pairs", 64, "text", "cache-pairs"))  # fmt: skip
"""(data, resolution, caption column, cache) through base/: stage 1's labels, stages 2-2b's and 2c's captions."""
LAYOUT_CACHES = (("shapes-pairs", 64, "text", "cache-pairs-layout"), ("shapes-128", 128, "text", "cache-128-layout"))
"""The same through base-layout/: stage 2d's and stage 3's captions."""


def build_caches(work: Path, base: str = "base", sets: tuple = CACHES) -> None:
    """T5 features and VAE latents of each set, read through WORK/`base`'s text encoder and VAE.

    Encoding 16 000 images costs about what 100 training steps do, and every step after it skips the VAE
    and T5, so the stages run from these caches (`pixart cache`, the same files users make).
    """
    from pixart.train.cache import build_cache
    from pixart.train.data import open_dataset

    for data, size, column, cache in sets:
        dataset = open_dataset(work / data, caption_column=column)
        build_cache(work / base, dataset, work / cache, resolution=size, max_tokens=components.MAX_TOKENS,
                    batch_size=64, shard_size=1024)  # fmt: skip


def layout(work: Path, steps: int, seed: int) -> None:
    """Continue the base text encoder's pretraining with the layout objective (MLM as before, plus where each
    object is, from the 64-px and pair-heavy captions), write base-layout (base with that encoder) and the
    feature caches stage 2d and stage 3 read through it."""
    import shutil

    from transformers import ByT5Tokenizer, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(work / "base" / "text_encoder")
    texts, labels = zip(*(components.caption_places(work / d) for d in ("shapes-64", "shapes-pairs")), strict=True)
    places = ([t for part in texts for t in part], [x for part in labels for x in part])
    components.pretrain_text_encoder(ByT5Tokenizer(), t5, components.captions(work / "shapes-64"), steps, lr=1e-3,
                                     seed=seed, places=places)  # fmt: skip
    out = work / "base-layout"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(work / "base", out, ignore=shutil.ignore_patterns("text_encoder"))
    t5.save_pretrained(out / "text_encoder")
    build_caches(work, "base-layout", LAYOUT_CACHES)


PARTS = ("data", "vae", "text", "base", "cache", "stage1", "stage2", "stage2b", "stage2c", "layout", "stage2d",
         "stage3")  # fmt: skip
EXTRA = ("scratch", "scratch2b", "scratch2c", "scratch2d")
"""Not run unless named in --only: the from-scratch control of the efficiency comparison (docs/demo.md), and its
later phases: stage 2b's, 2c's and 2d's recipes, steps and caches, each from the control's previous EMA weights."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--smoke", action="store_true", help="a handful of steps of everything, on a few images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {','.join(PARTS + EXTRA)}")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the named stages from their last checkpoint")
    parser.add_argument("--steps", default="", help="override step counts, e.g. stage1=300,stage2=900,vae_steps=600")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    n, work = dict(SMOKE if args.smoke else FULL), args.workdir
    for item in filter(None, args.steps.split(",")):
        key, _, value = item.partition("=")
        if key not in n or not value.isdigit():
            parser.error(f"--steps item {item!r}: expected KEY=N with KEY one of {', '.join(n)}")
        n[key] = int(value)
    n.update({f"scratch{p}": n[f"stage{p}"] for p in ("2b", "2c", "2d")})  # equal compute: the staged phases' steps
    parts = [p for p in args.only.split(",") if p]
    if unknown := sorted(set(parts) - set(PARTS + EXTRA)):
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS + EXTRA)}")
    (work / "report").mkdir(parents=True, exist_ok=True)
    quiet = ["logging.progress=false"] if args.smoke else []
    quiet += ["run.resume=latest"] if args.resume else []
    if args.smoke:
        quiet += ["data.batch_size=4", "validation.prompts=[]", "checkpoint.every=0"]

    def timed(name: str, fn, **extra):
        """Run fn, then record its wall time (and extra results) in WORK/report/<name>.json."""
        started = time.perf_counter()
        result = fn()
        steps = {"vae": n["vae_steps"], "text": n["t5_steps"], "layout": n["layout_steps"]}.get(name, n.get(name))
        entry = {"seconds": round(time.perf_counter() - started, 1), "steps": steps}
        entry.update({k: v(result) for k, v in extra.items()})
        (work / "report" / f"{name}.json").write_text(json.dumps(entry, indent=2) + "\n")
        log.info("%s done in %.0f s: %s", name, entry["seconds"], entry)
        return result

    if "data" in parts:

        def data():
            write_dataset(work / "shapes-64", n["images"], seed=args.seed, force=True, progress=False)
            write_dataset(work / "shapes-pairs", n["images_pairs"], seed=args.seed + 3, pairs=PAIRS, force=True,
                          progress=False)  # fmt: skip
            write_dataset(work / "shapes-128", n["images_128"], seed=args.seed + 1, force=True, progress=False,
                          sizes=((128, 128), (160, 96), (96, 160)))  # fmt: skip
            write_dataset(work / "vae-check", 8 if args.smoke else 400, seed=args.seed + 2, force=True, progress=False)

        timed("data", data)
    if "vae" in parts:
        images = components.images_tensor(work / "shapes-64", min(n["images"], 4000))
        vae = components.make_vae(args.seed)
        timed("vae", lambda: components.train_vae(vae, images, n["vae_steps"]),
              quality=lambda v: vae_report(v, work / "vae-check", 400))  # fmt: skip
        vae.save_pretrained(work / "parts" / "vae")
    if "text" in parts:
        tokenizer, t5 = components.make_text_encoder(args.seed)
        texts = components.captions(work / "shapes-64")
        timed("text", lambda: components.pretrain_text_encoder(tokenizer, t5, texts, n["t5_steps"]))
        t5.save_pretrained(work / "parts" / "text_encoder")
    if "base" in parts:
        from diffusers import AutoencoderKL
        from transformers import ByT5Tokenizer, T5EncoderModel

        vae = AutoencoderKL.from_pretrained(work / "parts" / "vae")
        t5 = T5EncoderModel.from_pretrained(work / "parts" / "text_encoder")
        components.save_base_pipeline(work / "base", ByT5Tokenizer(), t5, vae)
        torch.manual_seed(args.seed)
        save_pixart(PixArtTransformer(components.demo_transformer_config()), work / "init.safetensors")
    if "cache" in parts:
        timed("cache", lambda: build_caches(work))
    if "stage1" in parts:
        timed("stage1", lambda: stage("demo-stage1", work, n["stage1"], quiet, work / "cache-64-label"))
    if "stage2" in parts:
        timed("stage2", lambda: stage("demo-stage2", work, n["stage2"], quiet, work / "cache-64-text"))
    if "stage2b" in parts:  # stage 2's second phase: min-SNR weighting, cosine decay
        timed("stage2b", lambda: stage("demo-stage2b", work, n["stage2b"], quiet, work / "cache-64-text"))
    if "stage2c" in parts:  # its third phase, on the pair-heavy set
        run = timed("stage2c", lambda: stage("demo-stage2c", work, n["stage2c"], quiet, work / "cache-pairs"))
        export_pipeline(
            work / "base", run / "final-ema.safetensors", work / "pipeline-stage2c", force=True, trained_sizes=SIZES_64
        )
    if "layout" in parts:  # the text encoder learns to say where each object is: base-layout and its caches
        timed("layout", lambda: layout(work, n["layout_steps"], args.seed))
    if "stage2d" in parts:  # stage 2's fourth phase, through that encoder: its EMA weights are the bundle
        run = timed("stage2d", lambda: stage("demo-stage2d", work, n["stage2d"], quiet, work / "cache-pairs-layout"))
        export_pipeline(
            work / "base-layout",
            run / "final-ema.safetensors",
            work / "pipeline-stage2",
            force=True,
            trained_sizes=SIZES_64,
        )
    if "stage3" in parts:
        as_128px(work / "stage2d" / "final.safetensors", work / "stage2-as-128px.safetensors")
        run = timed("stage3", lambda: stage("demo-stage3", work, n["stage3"], quiet, work / "cache-128-layout"))
        export_pipeline(
            work / "base-layout",
            run / "final-ema.safetensors",
            work / "pipeline-stage3",
            force=True,
            trained_sizes=SIZES_128,
        )
    if "scratch" in parts:
        run = timed("scratch", lambda: stage("demo-scratch", work, n["scratch"], quiet, work / "cache-64-text"))
        export_pipeline(
            work / "base", run / "final-ema.safetensors", work / "pipeline-scratch", force=True, trained_sizes=SIZES_64
        )
    for phase, previous, cache in (("2b", "scratch", "cache-64-text"), ("2c", "scratch2b", "cache-pairs"),
                                   ("2d", "scratch2c", "cache-pairs-layout")):  # fmt: skip
        if (name := f"scratch{phase}") in parts:  # the control's later phases: the staged run's recipes, its weights
            source = f"model.source=runs/demo/{previous}/final-ema.safetensors"
            moved = [*quiet, f"run.output_dir=runs/demo/{name}", source]
            timed(name, partial(stage, f"demo-stage{phase}", work, n[name], moved, work / cache))
    report = {p.stem: json.loads(p.read_text()) for p in sorted((work / "report").glob("*.json"))}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(work / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
