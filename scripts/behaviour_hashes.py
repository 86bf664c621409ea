"""Fingerprints of what the code does, to show that a reshaping changed no behaviour.

Generates images with the bundled demo model and with tiny random α and Σ pipelines (every sampler; step
caching; a LoRA; OpenVINO) and runs a few training steps (plain, LoRA, LCM, DreamBooth), then prints one
SHA-256 per output: of the images' pixels and of the trained weights' bytes. Run it before and after a
change on the same machine and compare:

    python scripts/behaviour_hashes.py --out before.json --save before/
    ... change the code ...
    python scripts/behaviour_hashes.py --out after.json --compare before/

``--compare`` reports, for every output whose bytes changed, the largest difference from the saved one
(pixels out of 255, weights in absolute value), which is how a change of floating-point order is told from
a change of behaviour. Everything runs on one CPU thread, offline, in a temporary folder (a few minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the tests' tiny real pipelines

from pixart.checkpoints.lora import add_lora, save_lora  # noqa: E402
from pixart.inference.options import GenerationOptions  # noqa: E402
from pixart.inference.pipeline import PixArtPipeline  # noqa: E402
from pixart.sampling.samplers import SAMPLERS  # noqa: E402
from pixart.train.config import load_config  # noqa: E402
from pixart.train.loop import train  # noqa: E402
from tiny import save_pipeline, training_setup  # noqa: E402

PROMPTS = ["a red circle above a blue square", "a green triangle"]


def image_digest(images: list[Image.Image]) -> tuple[str, np.ndarray]:
    pixels = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return hashlib.sha256(pixels.tobytes()).hexdigest(), pixels


def weights_digest(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    tensors = load_file(str(path))
    h = hashlib.sha256()
    arrays = {}
    for name in sorted(tensors):
        a = tensors[name].float().numpy()
        h.update(name.encode())
        h.update(a.tobytes())
        arrays[name] = a
    return h.hexdigest(), arrays


def generation_cases(work: Path):
    """(name, pipeline factory, options) for every image fingerprint."""
    alpha = save_pipeline(work / "alpha", "alpha")
    sigma = save_pipeline(work / "sigma", "sigma")
    tiny = GenerationOptions(seed=3, steps=4, width=64, height=64, binning=False, max_tokens=16)
    demo = GenerationOptions(seed=3, steps=6)
    for name in SAMPLERS:
        steps = len(SAMPLERS[name].timesteps) or (2 if name == "heun" else 4)  # dmd runs its one fixed step
        yield f"alpha/{name}", (alpha, {}), tiny.replace(sampler=name, steps=steps)
        yield f"sigma/{name}", (sigma, {}), tiny.replace(sampler=name, steps=steps)
        yield f"demo/{name}", (None, {}), demo.replace(sampler=name, steps=steps)
    for folder, label in ((alpha, "alpha"), (sigma, "sigma"), (None, "demo")):
        options = demo if folder is None else tiny
        yield f"{label}/dpm++/cache-2", (folder, {"cache_steps": 2}), options.replace(steps=6)
        yield f"{label}/dpm++/unguided", (folder, {}), options.replace(guidance=1.0)
    lora = make_lora(alpha, work / "lora")
    yield "alpha/dpm++/lora-0.8", (alpha, {"loras": [(str(lora), 0.8)]}), tiny
    demo_lora = make_lora(None, work / "demo-lora")
    yield "demo/dpm++/lora-1.0", (None, {"loras": [(str(demo_lora), 1.0)]}), demo


def make_lora(folder: Path | None, out: Path) -> Path:
    """A LoRA with random non-zero weights on the folder's transformer (the demo's if None)."""
    from pixart.checkpoints.convert import load_transformer
    from pixart.inference.pipeline import DEMO_MODEL

    model = load_transformer(folder or DEMO_MODEL)
    torch.manual_seed(5)
    add_lora(model, rank=2, alpha=2, targets=("attn", "cross_attn"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    save_lora(model, out)
    return out


def openvino_cases(work: Path):
    try:
        from pixart.inference.openvino import export_openvino, load_openvino_pipeline
    except ImportError:
        return
    options = GenerationOptions(seed=3, steps=4, width=64, height=64, binning=False, max_tokens=16)
    for family in ("alpha", "sigma"):
        out = export_openvino(work / family, work / f"{family}-ov", width=64, height=64)
        yield f"openvino/{family}/dpm++", load_openvino_pipeline(out, threads=1), options


def training_cases(work: Path):
    """(name, recipe, overrides) of the short training runs."""
    (work / "train").mkdir()
    pipe, images, cache = training_setup(work / "train")
    common = [f"--model.pipeline={pipe}", "--data.image_size=256", "--logging.progress=false",
              "--schedule.max_steps=3", "--checkpoint.every=0"]  # fmt: skip
    cached = [*common, f"--data.cache={cache}"]
    # A fresh preset's zero-initialised final layer gives the blocks no gradient: adapt trained weights.
    tuned = ["--model.preset=", f"--model.source={pipe}"]
    yield "train/plain", [*cached, "--optim.ema_decay=0.9"]
    yield "train/lora", [*cached, *tuned, "--lora.rank=2", "--lora.alpha=2"]
    yield "train/lcm", [*cached, *tuned, "--lcm.enabled=true"]
    classes = work / "classes"
    yield "train/dreambooth", [*common, f"--data.dataset={images}", "--dreambooth.instance_prompt=a sks square",
                               "--dreambooth.class_prompt=a square", f"--dreambooth.class_data={classes}",
                               "--dreambooth.num_class_images=2", "--dreambooth.sample_steps=2",
                               "--lora.rank=2", *tuned]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the fingerprints here as JSON")
    parser.add_argument("--save", type=Path, help="keep the raw outputs here, for a later --compare")
    parser.add_argument("--compare", type=Path, help="a --save folder of an earlier run: report the differences")
    parser.add_argument("--only", default="", help="run only the cases whose name starts with this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, str] = {}

    def record(name: str, digest: str, data) -> None:
        results[name] = digest
        key = name.replace("/", "__")
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            np.savez(args.save / f"{key}.npz", **(data if isinstance(data, dict) else {"pixels": data}))
        line = f"{name:40s} {digest[:16]}"
        if args.compare and (args.compare / f"{key}.npz").is_file():
            old = np.load(args.compare / f"{key}.npz")
            new = data if isinstance(data, dict) else {"pixels": data}
            diff = max(float(np.abs(old[k].astype(np.float64) - new[k].astype(np.float64)).max()) for k in new)
            line += "  same" if diff == 0 else f"  max diff {diff:.3g}"
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pipes: dict = {}
        for name, (folder, kwargs), options in generation_cases(work):
            if not name.startswith(args.only):
                continue
            key = (str(folder), json.dumps(kwargs, sort_keys=True))
            if key not in pipes:
                pipes[key] = PixArtPipeline.from_pretrained(folder, device="cpu", dtype="fp32", **kwargs)
            record(name, *image_digest(pipes[key](PROMPTS, options, show_progress=False)))
        for name, pipe, options in openvino_cases(work) if "openvino".startswith(args.only[:8]) else ():
            record(name, *image_digest(pipe(PROMPTS, options, show_progress=False)))
        for name, extra in training_cases(work) if "train".startswith(args.only[:5]) else ():
            run = train(load_config("debug", [*extra, f"--run.output_dir={work / name}"]))
            record(name, *weights_digest(run / "final.safetensors"))
            if (run / "final-ema.safetensors").is_file():
                record(name + "/ema", *weights_digest(run / "final-ema.safetensors"))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
