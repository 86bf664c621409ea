"""Accuracy against training steps: the demo's version of PixArt-α's efficiency claim (docs/demo.md).

    python scripts/demo_curves.py --workdir runs/demo [--prompts 100]

Scores the weights of every kept checkpoint of the `pixart train` runs with `pixart eval`'s prompts and
checker: stage 1 (class labels) followed by stage 2 (full captions) and its later phases (stage2b: min-SNR
weighting, cosine decay; stage2c: the same on a pair-heavy set; stage2d: the same through the layout-trained
text encoder of base-layout/, which scores its checkpoints), and text-to-image from scratch (`--only
scratch` of scripts/train_demo.py) with its later phases. Every step is one batch of 32 images at 64 px, so
steps are compute: each curve's x runs on through each run's steps after the totals of the runs before it.
The control runs as many steps on the same data as stages 1 and 2 together and then the same later
phases (`--only scratch,scratch2b,scratch2c,scratch2d`), so only stage 1 differs.
First phases (stage1, stage2, scratch) are scored by their raw weights, not the EMA: an EMA of decay 0.998
still holds 0.998^500 = 37% of the random initial weights at step 500, so early EMA checkpoints are noise
generators, not earlier models. The later phases start from the previous phase's EMA weights, so their EMA
is a trained model throughout, and it is what the next phase and the bundle take: those are scored by it.
Writes WORKDIR/curves.json (reused on a re-run: only new checkpoints are scored; a run whose checkpoints
were deleted keeps its recorded points) and an SVG plot.
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

from pixart.checkpoints.ours import save_pixart
from pixart.demo import components
from pixart.demo.eval import TARGETS, evaluate
from pixart.files import atomic_write
from pixart.inference.pipeline import PixArtPipeline
from pixart.model.transformer import PixArtTransformer

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


def score(base: Path, folder: Path, prompts: int, file: str = "trainable.safetensors") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_pixart(checkpoint_model(folder, file), Path(tmp) / "weights.safetensors")
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
               f'   x: training steps (batch 32, 64 px); grey: ends of the staged parts</text>')  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"


def save(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


STAGED = ("stage1", "stage2", "stage2b", "stage2c", "stage2d")
SCRATCH = ("scratch", "scratch2b", "scratch2c", "scratch2d")
"""The two runs as chains of `pixart train` runs: the control's later phases are the staged run's recipes."""
FIRST = {"stage1", "stage2", "scratch"}
"""Scored by their raw weights; the later phases start from the previous phase's EMA weights, so their own EMA
is a trained model from the first step and is what the next phase and the bundle take: those score the EMA."""


def plan(work: Path, chain: tuple[str, ...], store: dict, every: int) -> tuple[list[tuple], list[int]]:
    """(x, key, checkpoint folder or None, weights file, pipeline) of a chain's points, and its runs' ends.

    A run whose checkpoints are gone keeps the points and length recorded in the store, so an earlier
    session's measurements stay on the curve; the chain stops at the first run with neither.
    """
    points, ends = [], [0]
    for run in chain:
        found = checkpoints(work / run)
        finished = (work / run / "final.safetensors").is_file()
        found = [(s, p) for s, p in found if s % every == 0 or (finished and p == found[-1][1])]
        weights = "trainable" if run in FIRST else "ema"
        pipeline = work / ("base-layout" if run.endswith("2d") else "base")
        if found:
            store["lengths"][run] = found[-1][0]
            points += [(ends[-1] + s, f"{run}/{p.name}/{weights}", p, weights, pipeline) for s, p in found]
        elif run in store["lengths"]:
            kept = [k for k in store["scores"] if k.startswith(f"{run}/")]
            points += [(ends[-1] + int(k.split("/")[1].split("-")[1]), k, None, None, None) for k in kept]
        else:
            break
        ends.append(ends[-1] + store["lengths"][run])
    return sorted(points, key=lambda p: p[0]), ends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--prompts", type=int, default=100,
                        help="held-out prompts per checkpoint not scored yet (default 100)")  # fmt: skip
    parser.add_argument("--plot", type=Path, default=Path("docs/demo-curves.svg"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=1000, help="score checkpoints every N steps of a run (default "
                        "1000; a finished run's last checkpoint always)")  # fmt: skip
    parser.add_argument("--score", default="staged,scratch",
                        help="whose checkpoints not in curves.json yet to score (default staged,scratch; '' to "
                        "only plot what it holds)")  # fmt: skip
    args = parser.parse_args(argv)
    scored = {name for name in args.score.split(",") if name}
    if unknown := sorted(scored - {"staged", "scratch"}):
        parser.error(f"--score: unknown run(s) {', '.join(unknown)}; runs: staged, scratch")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    work = args.workdir
    store_file = work / "curves.json"
    store = json.loads(store_file.read_text()) if store_file.is_file() else {"lengths": {}, "scores": {}}
    curves: dict[str, list[dict]] = {}
    plans = {name: plan(work, chain, store, args.every) for name, chain in (("staged", STAGED), ("scratch", SCRATCH))}
    for name, (points, _) in plans.items():
        curves[name] = []
        for x, key, folder, weights, pipeline in points:
            entry = store["scores"].get(key)
            if folder is not None and name in scored and entry is None:
                entry = {
                    "prompts": args.prompts,
                    "scores": score(pipeline, folder, args.prompts, f"{weights}.safetensors"),
                }
                store["scores"][key] = entry
                save(store_file, json.dumps(store, indent=2) + "\n")
                log.info("%s %s: %s", name, key, {k: round(entry["scores"].get(k, 0.0), 1) for k in METRICS})
            if entry is not None:
                curves[name].append(
                    {"steps": x, "checkpoint": key, "prompts": entry["prompts"], "scores": entry["scores"]}
                )
    save(store_file, json.dumps(store, indent=2) + "\n")
    save(args.plot, svg(curves, plans["staged"][1][1:-1]))  # grey lines where the staged parts end
    for run, points in curves.items():
        print(f"\n{run}: steps  " + "  ".join(f"{m:>15}" for m in METRICS) + "  prompts  checkpoint")
        for p in points:
            values = "  ".join(f"{p['scores'].get(m, 0):>14.1f}%" for m in METRICS)
            print(f"{'':{len(run)}}  {p['steps']:>5}  {values}  {p['prompts']:>7}  {p['checkpoint']}")
        for label, metrics in (
            ("one-object targets", [m for m in METRICS if m.startswith("single")]),
            ("all targets", METRICS),
        ):
            hit = next((p["steps"] for p in points if all(p["scores"].get(m, 0) >= TARGETS[m] for m in metrics)), None)
            print(f"{'':{len(run)}}  {label} first met at: {hit if hit is not None else 'not within these steps'}")
    print(f"\nwrote {args.plot} and {store_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
