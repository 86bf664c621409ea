"""Accuracy against training steps: the demo's version of PixArt-α's efficiency claim (docs/demo.md).

    python scripts/demo_curves.py --workdir runs/demo [--prompts 100]

Scores the weights of every kept checkpoint of the `pixart train` runs with `pixart eval`'s prompts and
checker: stage 1 (class labels) followed by stage 2 (full captions) and its later phases (stage2b: min-SNR
weighting, cosine decay; stage2c: the same on a pair-heavy set; stage2d: the same through the layout-trained
text encoder of base-layout/, which scores its checkpoints), and text-to-image from
scratch (`--only scratch` of scripts/train_demo.py). Every step is one batch of 32 images at 64 px, so
steps are compute: the staged curve's x runs on through each run's steps after the totals of the runs
before it.
It scores the raw weights, not the EMA: an EMA of decay 0.998 still holds 0.998^500 = 37% of the random
initial weights at step 500, so early EMA checkpoints are noise generators, not earlier models.
Writes WORKDIR/curves.json (reused on a re-run: only new checkpoints are scored) and an SVG plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from pixart.convert import save_pixart
from pixart.demo import components
from pixart.demo.eval import TARGETS, evaluate
from pixart.model import PixArtTransformer
from pixart.pipeline import PixArtPipeline

log = logging.getLogger("demo_curves")

METRICS = {"single_colour": "one object: colour", "single_shape": "one object: shape",
           "single_position": "one object: position", "pair_full": "two objects: fully correct"}  # fmt: skip
COLOURS = {"staged": "#1f77b4", "scratch": "#d62728"}


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of a run's complete checkpoints, in step order."""
    found = (run / "checkpoints").glob("step-*")
    return sorted((int(p.name.split("-")[1]), p) for p in found if (p / "state.json").is_file())


def checkpoint_model(folder: Path, file: str = "trainable.safetensors") -> PixArtTransformer:
    """The demo transformer holding a checkpoint's weights (``ema.safetensors``: its EMA weights)."""
    model = PixArtTransformer(components.demo_transformer_config())
    missing, unexpected = model.load_state_dict(load_file(folder / file), strict=False)
    if unexpected or set(missing) - {name for name, _ in model.named_buffers()}:
        raise SystemExit(f"{folder / file}: weights do not fit the demo transformer ({(missing + unexpected)[:3]} …)")
    return model


def score(base: Path, folder: Path, prompts: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_pixart(checkpoint_model(folder), Path(tmp) / "weights.safetensors")
        pipe = PixArtPipeline.from_pretrained(base, transformer=weights, device="cpu")
        return evaluate(pipe, prompts, steps=20, batch_size=32).scores


def svg(curves: dict[str, list[dict]], boundaries: list[int]) -> str:
    """Four small panels (one per target metric), staged vs scratch, the target dashed."""
    pw, ph, left, top = 320, 190, 60, 40
    width, height = left + 2 * pw + 80, top + 2 * ph + 110
    xmax = max([p["steps"] for points in curves.values() for p in points] + [1])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>']  # fmt: skip
    for i, (key, label) in enumerate(METRICS.items()):
        x0, y0 = left + (i % 2) * (pw + 50), top + (i // 2) * (ph + 60)

        def xy(steps: float, value: float, x0=x0, y0=y0) -> str:
            return f"{x0 + pw * steps / xmax:.1f},{y0 + ph * (1 - value / 100):.1f}"

        out.append(f'<text x="{x0}" y="{y0 - 10}" font-weight="bold">{label}</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        for v in (0, 50, 100):
            out.append(f'<text x="{x0 - 8}" y="{y0 + ph * (1 - v / 100) + 4:.0f}" text-anchor="end">{v}%</text>')
        for s in (0, xmax // 2, xmax):
            out.append(f'<text x="{x0 + pw * s / xmax:.0f}" y="{y0 + ph + 16}" text-anchor="middle">{s}</text>')
        for boundary in boundaries:
            x_stage = x0 + pw * boundary / xmax
            out.append(f'<line x1="{x_stage:.1f}" y1="{y0}" x2="{x_stage:.1f}" y2="{y0 + ph}" stroke="#bbb" '
                       f'stroke-dasharray="2,3"/>')  # fmt: skip
        target = TARGETS[key]
        out.append(f'<polyline points="{xy(0, target)} {xy(xmax, target)}" stroke="#2ca02c" stroke-dasharray="6,4" '
                   f'fill="none"/>')  # fmt: skip
        for run, points in curves.items():
            line = " ".join(xy(p["steps"], p["scores"].get(key, 0.0)) for p in points)
            out.append(f'<polyline points="{line}" stroke="{COLOURS[run]}" stroke-width="2" fill="none"/>')
            for p in points:
                cx, cy = xy(p["steps"], p["scores"].get(key, 0.0)).split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{COLOURS[run]}"/>')
    legend_y = height - 14
    out.append(f'<text x="{left}" y="{legend_y}"><tspan fill="{COLOURS["staged"]}">━ stage 1 → stage 2</tspan>'
               f'   <tspan fill="{COLOURS["scratch"]}">━ from scratch</tspan>   <tspan fill="#2ca02c">╌ target</tspan>'
               f'   x: training steps (batch 32, 64 px); grey: ends of stage 1 and stage 2</text>')  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts per checkpoint (default 100)")
    parser.add_argument("--plot", type=Path, default=Path("docs/demo-curves.svg"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=500, help="score checkpoints every N steps of a run (default 500)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    work, base = args.workdir, args.workdir / "base"
    store = work / "curves.json"
    done = json.loads(store.read_text()) if store.is_file() else {}

    def last_step(run: str) -> int:
        found = checkpoints(work / run)
        return found[-1][0] if found else 0

    def kept(run: str) -> list[tuple[int, Path]]:
        return [(s, p) for s, p in checkpoints(work / run) if s % args.every == 0]

    staged, ends = [], [0]  # stage 2's later phases continue the staged curve
    for run in ("stage1", "stage2", "stage2b", "stage2c", "stage2d"):
        staged += [(ends[-1] + s, p, work / "base-layout" if run == "stage2d" else base) for s, p in kept(run)]
        ends.append(ends[-1] + last_step(run))
    plan = {"staged": staged, "scratch": [(s, p, base) for s, p in kept("scratch")]}
    curves: dict[str, list[dict]] = {}
    for run, points in plan.items():
        curves[run] = []
        for steps, folder, pipeline in points:
            key = f"{folder.parent.parent.name}/{folder.name}"
            if key not in done or done[key]["prompts"] != args.prompts:
                done[key] = {"prompts": args.prompts, "scores": score(pipeline, folder, args.prompts)}
                store.write_text(json.dumps(done, indent=2) + "\n")
                log.info("%s %s: %s", run, key, {k: round(done[key]["scores"].get(k, 0.0), 1) for k in METRICS})
            curves[run].append({"steps": steps, "checkpoint": key, "scores": done[key]["scores"]})
    (work / "curves-table.json").write_text(json.dumps(curves, indent=2) + "\n")
    args.plot.write_text(svg(curves, ends[1:3]))
    for run, points in curves.items():
        print(f"\n{run}: steps  " + "  ".join(f"{m:>15}" for m in METRICS))
        for p in points:
            values = "  ".join(f"{p['scores'].get(m, 0):>14.1f}%" for m in METRICS)
            print(f"{'':{len(run)}}  {p['steps']:>5}  {values}")
        hit = next((p["steps"] for p in points if all(p["scores"].get(m, 0) >= TARGETS[m] for m in METRICS)), None)
        print(f"{'':{len(run)}}  all targets first met at: {hit if hit is not None else 'not within these steps'}")
    print(f"\nwrote {args.plot} and {work / 'curves.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
