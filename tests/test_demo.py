"""The bundled demo: its components, a few-step run of the whole training script (all three stage
recipes through `pixart train`), `pixart eval`, and the bundled pipeline itself when it is installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixart.demo import components
from pixart.demo.checker import check
from pixart.demo.eval import evaluate, format_table
from pixart.demo.shapes import held_out_prompts
from pixart.inference.pipeline import DEMO_MODEL, PixArtPipeline
from test_files import assert_plain_modes

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The documented training script in --smoke mode: data, VAE, T5, stages 1-3, two exported pipelines."""
    work = tmp_path_factory.mktemp("demo")
    done = subprocess.run(["sh", "scripts/train_demo.sh", str(work), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_components_shapes_and_determinism():
    vae = components.make_vae(seed=0)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (2, 4, 16, 16)  # factor 4: 64 px → 16×16
    assert all(
        torch.equal(a, b)
        for a, b in zip(vae.state_dict().values(), components.make_vae(0).state_dict().values(), strict=True)
    )
    assert not torch.equal(vae.encoder.conv_in.weight, components.make_vae(1).encoder.conv_in.weight)

    tokenizer, t5 = components.make_text_encoder(seed=0)
    tokens = tokenizer(["a red circle"], padding="max_length", max_length=components.MAX_TOKENS, return_tensors="pt")
    assert tokens.input_ids[0, :3].tolist() == [ord("a") + 3, ord(" ") + 3, ord("r") + 3]  # ByT5: byte + 3
    features = t5(**tokens).last_hidden_state
    config = components.demo_transformer_config()
    assert features.shape == (1, components.MAX_TOKENS, config.caption_channels)
    assert (config.sample_size, config.pe_scale) == (16, 1.0)
    assert (components.demo_transformer_config(128).sample_size, components.demo_transformer_config(128).pe_scale) == (
        32,
        2.0,
    )


def test_vae_scaling_factor_whitens_latents(smoke):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(smoke / "base" / "vae")
    images = components.images_tensor(smoke / "shapes-64")
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    assert (latents * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=0.15)


def test_smoke_run_writes_every_stage(smoke):
    report = json.loads((smoke / "report.json").read_text())
    parts = {"data", "vae", "text", "cache", "stage1", "stage2", "stage2b", "stage2c", "layout", "stage2d", "stage3"}
    assert set(report) == parts
    assert report["vae"]["quality"]["images"] == 8  # the VAE was measured on its check images
    for stage in ("stage1", "stage2", "stage2b", "stage2c", "stage2d", "stage3"):
        state = json.loads(next((smoke / stage / "checkpoints").glob("step-*/state.json")).read_text())
        assert state["step"] == 2
    caches = {"stage1": "cache-64-label", "stage2": "cache-64-text", "stage2b": "cache-64-text",
              "stage2c": "cache-pairs", "stage2d": "cache-pairs-layout", "stage3": "cache-128-layout"}  # fmt: skip
    for stage, cache in caches.items():
        data = json.loads((smoke / stage / "config.json").read_text())["data"]  # trained from the script's caches
        assert (data["cache"], data["dataset"]) == (str(smoke / cache), "")
    # stage 2 starts from stage 1's weights, its second phase from stage 2's EMA (with min-SNR weighting), its
    # third from the second's EMA on the pair-heavy set, its fourth from the third's EMA through the layout-trained
    # text encoder, and stage 3 from the fourth phase's weights at 128 px
    from pixart.checkpoints.convert import load_transformer

    for phase, source in (("stage2b", "stage2"), ("stage2c", "stage2b"), ("stage2d", "stage2c")):
        config = json.loads((smoke / phase / "config.json").read_text())
        assert config["model"]["source"] == str(smoke / source / "final-ema.safetensors")
        assert config["diffusion"]["snr_gamma"] == 5.0
    pairs = [json.loads(line) for line in (smoke / "shapes-pairs" / "metadata.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and all(row["split"] == "train" for row in pairs)
    for phase in ("stage2d", "stage3"):  # both read the layout-trained encoder; the earlier phases the MLM one
        config = json.loads((smoke / phase / "config.json").read_text())
        assert config["model"]["pipeline"] == str(smoke / "base-layout")
    assert json.loads((smoke / "stage2c" / "config.json").read_text())["model"]["pipeline"] == str(smoke / "base")
    from safetensors.torch import load_file

    t5 = {
        d: load_file(smoke / d / "text_encoder" / "model.safetensors")
        for d in ("base", "base-layout", "pipeline-stage2")
    }
    assert t5["base"].keys() == t5["base-layout"].keys()
    assert not all(torch.equal(t5["base"][k], t5["base-layout"][k]) for k in t5["base"])  # the layout part trained it
    assert all(torch.equal(t5["pipeline-stage2"][k], v) for k, v in t5["base-layout"].items())  # and the bundle has it
    s2 = load_transformer(smoke / "stage2d" / "final.safetensors")
    s3_init = load_transformer(smoke / "stage2-as-128px.safetensors")
    assert (s3_init.config.sample_size, s3_init.config.pe_scale) == (32, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(s2.state_dict().values(), s3_init.state_dict().values(), strict=True))


def test_exported_pipeline_loads_in_diffusers_and_ours(smoke):
    from diffusers import PixArtSigmaPipeline

    folder = smoke / "pipeline-stage2"
    theirs = PixArtSigmaPipeline.from_pretrained(folder)
    # diffusers bins only its four release sizes, so a 64-px model is called with binning off
    out = theirs("a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=96,
                 use_resolution_binning=False, output_type="np")  # fmt: skip
    assert out.images.shape == (1, 64, 64, 3)
    ours = PixArtPipeline.from_pretrained(folder, device="cpu")
    assert ours.vae_factor == 4
    image = ours("a red circle", seed=0, steps=2, show_progress=False)[0]
    assert image.size == (64, 64)
    stage3 = PixArtPipeline.from_pretrained(smoke / "pipeline-stage3", device="cpu")
    assert stage3("a red circle", seed=0, steps=2, show_progress=False)[0].size == (128, 128)


@pytest.mark.slow
def test_scratch_control_and_accuracy_curves(smoke, tmp_path):
    """The efficiency comparison: the from-scratch control continues through stage 2b-2d's recipes from its own
    weights, and scripts/demo_curves.py scores both runs' checkpoints on one axis of steps (= compute)."""
    control = ("scratch", "scratch2b", "scratch2c", "scratch2d")
    done = run("scripts/train_demo.py", "--workdir", str(smoke), "--smoke", "--only", ",".join(control))
    assert done.returncode == 0, done.stderr[-3000:]
    for phase, source, base, cache in (("scratch2b", "scratch", "base", "cache-64-text"),
                                       ("scratch2c", "scratch2b", "base", "cache-pairs"),
                                       ("scratch2d", "scratch2c", "base-layout", "cache-pairs-layout")):  # fmt: skip
        config = json.loads((smoke / phase / "config.json").read_text())
        staged = json.loads((smoke / phase.replace("scratch", "stage") / "config.json").read_text())
        assert config["model"]["source"] == str(smoke / source / "final-ema.safetensors")
        assert (config["model"]["pipeline"], config["data"]["cache"]) == (str(smoke / base), str(smoke / cache))
        # only where it starts and writes differs from the staged run's phase: same recipe, steps, data
        assert {k: v for k, v in config.items() if k not in ("run", "model")} == {
            k: v for k, v in staged.items() if k not in ("run", "model")
        }
    assert json.loads((smoke / "scratch" / "config.json").read_text())["model"]["source"] == str(
        smoke / "init.safetensors"
    )

    plot = tmp_path / "curves.svg"
    done = run("scripts/demo_curves.py", "--workdir", str(smoke), "--prompts", "2", "--every", "1", "--plot", str(plot))
    assert done.returncode == 0, done.stderr[-3000:]
    store = json.loads((smoke / "curves.json").read_text())
    staged = ("stage1", "stage2", "stage2b", "stage2c", "stage2d")
    assert store["lengths"] == {
        **dict.fromkeys(staged, 2),
        "scratch": 4,
        "scratch2b": 2,
        "scratch2c": 2,
        "scratch2d": 2,
    }
    first = {"stage1", "stage2", "scratch"}  # raw weights; the later phases by their EMA
    assert set(store["scores"]) == {
        f"{r}/step-{store['lengths'][r]:08d}/{'trainable' if r in first else 'ema'}" for r in store["lengths"]
    }
    assert {e["prompts"] for e in store["scores"].values()} == {2}
    assert all(e["scores"]["n_single"] + e["scores"]["n_pair"] == 2 for e in store["scores"].values())
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().endswith(("/trainable", "/ema"))]
    x = {row[-1].split("/")[0]: int(row[0]) for row in rows}  # each run's last step on the curves' common axis
    assert x == {"stage1": 2, "stage2": 4, "stage2b": 6, "stage2c": 8, "stage2d": 10,
                 "scratch": 4, "scratch2b": 6, "scratch2c": 8, "scratch2d": 10}  # fmt: skip
    svg = plot.read_text()
    assert svg.startswith("<svg") and svg.count("<circle") == 4 * 9  # 4 panels, 9 points
    # a later session whose checkpoints are deleted keeps the recorded points: same table without scoring
    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "curves.json").write_text((smoke / "curves.json").read_text())
    again = run("scripts/demo_curves.py", "--workdir", str(lost), "--score", "", "--plot", str(tmp_path / "again.svg"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split("wrote")[0] == done.stdout.split("wrote")[0]
    assert (tmp_path / "again.svg").read_text() == svg
    typo = run("scripts/demo_curves.py", "--workdir", str(lost), "--score", "staged,scratc")
    assert typo.returncode == 2 and "--score: unknown run(s) scratc" in typo.stderr.splitlines()[-1]


def test_evaluate_scores_each_held_out_prompt_on_its_own_image(smoke):
    """evaluate renders held-out prompt i with seed + i and scores that image's verdict, checked against images
    rendered here one by one, outside evaluate, and the percentages counted here by hand."""
    pipe = PixArtPipeline.from_pretrained(smoke / "pipeline-stage2", device="cpu")
    # Batches of one: a batch of six may differ from a lone image in a pixel's last bit (thread-dependent).
    result = evaluate(pipe, 6, seed=3, steps=2, batch_size=1)
    prompts = held_out_prompts(6, seed=3)
    assert [p.text for p in result.prompts] == [p.text for p in prompts]
    options = {"steps": 2, "max_tokens": pipe.model_config.model_max_length, "show_progress": False}
    alone = [pipe(p.text, seed=3 + i, **options)[0] for i, p in enumerate(prompts)]
    assert [image.tobytes() for image in result.images] == [image.tobytes() for image in alone]  # so deterministic
    verdicts = [check(image, p.scene) for image, p in zip(alone, prompts, strict=True)]
    assert result.checks == verdicts
    single = [v for v, p in zip(verdicts, prompts, strict=True) if len(p.scene.objects) == 1]
    pair = [v for v, p in zip(verdicts, prompts, strict=True) if len(p.scene.objects) == 2]
    assert (result.scores["n_single"], result.scores["n_pair"]) == (len(single), len(pair)) and single and pair
    assert result.scores["single_colour"] == 100 * sum(v.colour for v in single) / len(single)
    assert result.scores["single_size"] == 100 * sum(v.size for v in single) / len(single)
    assert result.scores["pair_colour"] == 100 * sum(v.colour for v in pair) / len(pair)
    assert result.scores["single_all"] == 100 * sum(v.colour and v.shape and v.position for v in single) / len(single)
    assert result.scores["pair_full"] == 100 * sum(v.colour and v.shape and v.relation for v in pair) / len(pair)
    table = format_table(result.scores).splitlines()
    colour_row = next(line for line in table if line.startswith("one object: colour"))
    assert colour_row.split()[-3:] == [f"{result.scores['single_colour']:.1f}%", ">=", "95%"]
    assert table[-1].split()[-3:] == [str(len(single)), "/", str(len(pair))]


def test_eval_cli(smoke, tmp_path):
    done = run("-m", "pixart", "eval", "--model", str(smoke / "pipeline-stage2"), "--prompts", "4", "--steps", "2",
               "--dtype", "fp32", "--json", "--save", str(tmp_path / "images"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout)
    assert scores["n_single"] + scores["n_pair"] == 4
    assert len(list((tmp_path / "images").glob("*.png"))) == 4
    assert len((tmp_path / "images" / "verdicts.jsonl").read_text().splitlines()) == 4
    assert_plain_modes(tmp_path / "images")

    cached = run("-m", "pixart", "eval", "--model", str(smoke / "pipeline-stage2"), "--prompts", "4", "--steps", "2",
                 "--dtype", "fp32", "--cache-steps", "2", "--json", "--save", str(tmp_path / "cached"))  # fmt: skip
    assert cached.returncode == 0, cached.stderr[-2000:]
    # the second of two steps reused the first step's deep blocks, so the pixels changed
    pixels = [[Image.open(tmp_path / d / f"{i:04d}.png").tobytes() for i in range(4)] for d in ("images", "cached")]
    assert pixels[0] != pixels[1]

    bad = run("-m", "pixart", "eval", "--model", str(smoke / "pipeline-stage2"), "--prompts", "0")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: number of prompts 0 must be a positive integer"


@pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="the bundled demo model is not installed")
def test_bundled_demo_generates_without_a_model_argument(tmp_path):
    from pixart.demo.shapes import Scene, SceneObject

    pipe = PixArtPipeline.from_pretrained(None, device="cpu")
    images = pipe(["a large red circle in the centre"] * 4, seed=0, batch_size=4, show_progress=False)
    target = Scene((SceneObject("circle", "red", "large", "centre"),))
    assert sum(check(image, target).colour for image in images) >= 3  # the bundled model follows colours
    size = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    done = run("-m", "pixart", "generate", "a red circle above a blue square", "--seed", "0", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="the bundled demo model is not installed")
def test_eval_scores_a_lora_or_another_transformer(tmp_path):
    from pixart.checkpoints.convert import load_transformer
    from pixart.checkpoints.lora import load_lora
    from pixart.checkpoints.ours import save_pixart
    from pixart.cli import main
    from tiny import random_lora

    lora = random_lora(DEMO_MODEL / "transformer", tmp_path / "lora")

    def images(name: str, *flags: str) -> list[bytes]:
        argv = ["eval", "--prompts", "2", "--steps", "2", "--batch-size", "2", "--json", "--save", str(tmp_path / name)]
        assert main(argv + list(flags)) == 0
        return [Image.open(tmp_path / name / f"{i:04d}.png").tobytes() for i in range(2)]

    base = images("base")
    assert images("scale0", "--lora", f"{lora}:0") == base  # a LoRA at scale 0 adds exactly nothing
    with_lora = images("lora", "--lora", str(lora))
    assert with_lora != base
    # A transformer file with that LoRA merged in (as a fine-tune would be saved) scores exactly like the LoRA.
    merged = save_pixart(load_lora(load_transformer(DEMO_MODEL), lora, merge=True), tmp_path / "merged.safetensors")
    assert images("merged", "--transformer", str(merged)) == with_lora
