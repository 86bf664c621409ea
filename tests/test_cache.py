"""The feature cache against direct T5 / VAE computation with the real tiny models, staleness, resume and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from transformers import ByT5Tokenizer, T5EncoderModel

from pixart.errors import PixArtError
from pixart.train.cache import build_cache, cache_expectations, open_cache
from pixart.train.data import BatchLoader, open_dataset, resize_cover_crop, to_tensor
from test_data import fixture_images, png_bytes, write_folder
from test_files import assert_plain_modes
from tiny import save_pipeline

MAX_TOKENS = 32
# (height, width) of the 256-px buckets of the fixture shapes, from the official tables.
BUCKET_SIZE = {(32, 32): (256, 256), (24, 48): (176, 352), (48, 24): (352, 176)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    pipe = save_pipeline(root / "pipe", "alpha")
    data = write_folder(root / "data", every=2)  # two images of each shape keep the VAE work small
    whole = png_bytes(Image.new("RGB", (32, 32), "red"))
    (data / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (data / "truncated.txt").write_text("half a file")
    (data / "notes.jpg").write_text("this is not an image")
    (data / "notes.txt").write_text("a text file")
    dataset = open_dataset(data)
    out = root / "out"
    manifest = build_cache(
        pipe, dataset, out, resolution=256, max_tokens=MAX_TOKENS, batch_size=1, shard_size=2, flip=True, clean=False
    )
    expect = cache_expectations(pipe, resolution=256, max_tokens=MAX_TOKENS, dataset=dataset, flip=True, clean=False)
    return pipe, data, out, manifest, expect


@torch.no_grad()
def direct(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """Latent moments and T5 features of every fixture image, computed with diffusers and transformers directly."""
    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae").eval()
    t5 = T5EncoderModel.from_pretrained(pipe, subfolder="text_encoder").eval()
    tokenizer = ByT5Tokenizer.from_pretrained(pipe, subfolder="tokenizer")
    expected = {}
    by_size: dict[tuple[int, int], list] = {}
    for name, image, caption in fixture_images()[::2]:
        by_size.setdefault(BUCKET_SIZE[(image.height, image.width)], []).append((name, image, caption))
    for size, items in by_size.items():
        pixels = torch.stack([to_tensor(resize_cover_crop(image, *size)) for _, image, _ in items])
        posterior = vae.encode(torch.cat([pixels, pixels.flip(-1)])).latent_dist
        n = len(items)
        for i, (name, image, caption) in enumerate(items):
            text = caption.lower().strip()
            tokens = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
            expected[f"{name}.png"] = {
                "latent_mean": posterior.mean[i],
                "latent_std": posterior.std[i],
                "flip_mean": posterior.mean[n + i],
                "flip_std": posterior.std[n + i],
                "text_features": t5(tokens.input_ids, attention_mask=tokens.attention_mask)[0][0],
                "text_mask": tokens.attention_mask[0],
                "resolution": torch.tensor([image.height, image.width], dtype=torch.float32),
            }
    return expected


def cached_samples(cache, flip: bool) -> dict[str, dict]:
    loader = BatchLoader(cache, batch_size=1, seed=1, drop_last=False, flip=flip)
    samples = {}
    for epoch in range(3 if flip else 1):
        for batch in loader.epoch(epoch):
            sample = {k: v[0] if isinstance(v, torch.Tensor) else v[0] for k, v in batch.items()}
            samples.setdefault(sample["key"], []).append(sample)
    return samples


def test_cache_equals_direct_computation(setup):
    pipe, _, out, manifest, expect = setup
    cache = open_cache(out, expect=expect)
    assert manifest["samples"] == len(cache) == 6
    assert sorted(key for key, _ in manifest["skipped"]) == ["notes.jpg", "truncated.png"]
    assert manifest["vae_scaling_factor"] == 0.18215
    assert_plain_modes(out)  # the shards too, though safetensors makes its files 0600
    expected = direct(pipe)
    plain = cached_samples(cache, flip=False)
    assert sorted(plain) == sorted(expected)
    for key, [got] in plain.items():
        want = expected[key]
        assert got["latent_mean"].shape == (4, *(s // 8 for s in BUCKET_SIZE[tuple(want["resolution"].int().tolist())]))
        assert torch.allclose(got["latent_mean"], want["latent_mean"], atol=1e-5), key
        assert torch.allclose(got["latent_std"], want["latent_std"], atol=1e-5), key
        assert torch.equal(got["text_mask"], want["text_mask"]), key
        valid = want["text_mask"].bool()
        assert torch.allclose(got["text_features"][valid], want["text_features"][valid], atol=1e-5), key
        assert not got["text_features"][~valid].any()  # padding is stored as zeros, masked out anyway
        assert torch.equal(got["resolution"], want["resolution"]), key

    flipped_seen = plain_seen = 0
    for key, draws in cached_samples(cache, flip=True).items():
        for got in draws:
            want = expected[key]
            if torch.allclose(got["latent_mean"], want["flip_mean"], atol=1e-5):
                assert torch.allclose(got["latent_std"], want["flip_std"], atol=1e-5)
                flipped_seen += 1
            else:
                assert torch.allclose(got["latent_mean"], want["latent_mean"], atol=1e-5)
                plain_seen += 1
    assert flipped_seen and plain_seen


def test_stale_or_incomplete_cache_is_refused(setup, tmp_path):
    _, data, out, _, expect = setup
    with pytest.raises(PixArtError, match=r"max_tokens is 32 in the cache but 64 for this run; re-run `pixart cache`"):
        open_cache(out, expect={**expect, "max_tokens": 64})
    with pytest.raises(PixArtError, match=r"stale: flip is true in the cache but false"):
        open_cache(out, expect={**expect, "flip": False})
    other = open_dataset(write_folder(tmp_path / "other", every=3))
    with pytest.raises(PixArtError, match="stale: dataset is"):
        open_cache(out, expect={**expect, "dataset": other.fingerprint})
    (tmp_path / "half").mkdir()
    with pytest.raises(PixArtError, match="incomplete \\(no manifest.json\\); run `pixart cache`"):
        open_cache(tmp_path / "half")
    assert len(open_cache(out, expect={"resolution": 256})) == 6


def test_rerun_after_a_kill_reuses_finished_shards(setup, tmp_path):
    pipe, data, out, manifest, _ = setup
    copy = tmp_path / "copy"
    copy.mkdir()
    for shard in manifest["shards"]:
        (copy / shard["file"]).write_bytes((out / shard["file"]).read_bytes())
    first, broken, missing = (s["file"] for s in manifest["shards"][:3])
    (copy / broken).write_bytes((out / broken).read_bytes()[:100])  # as if written by a non-atomic tool
    (copy / missing).unlink()
    (copy / f".{missing}.tmp-123").write_bytes(b"half a shard")  # a kill in mid-write
    stamp = os.stat(copy / first).st_mtime_ns
    rebuilt = build_cache(
        pipe, open_dataset(data), copy, resolution=256, max_tokens=MAX_TOKENS, batch_size=1, shard_size=2, flip=True,
        clean=False,
    )  # fmt: skip
    assert os.stat(copy / first).st_mtime_ns == stamp
    assert rebuilt["shards"] == manifest["shards"]
    assert not [p.name for p in copy.iterdir() if p.name.startswith(".")]
    for name in (broken, missing):
        rewritten, original = load_file(copy / name), load_file(out / name)
        assert rewritten.keys() == original.keys()
        assert all(torch.equal(rewritten[k], original[k]) for k in original)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pixart", "cache", *args], capture_output=True, text=True, env=env)


def test_cli_builds_a_cache_and_rejects_a_missing_dataset(setup, tmp_path):
    pipe, _, _, _, expect = setup
    data = tmp_path / "data"
    data.mkdir()
    for name, image, caption in fixture_images()[::4]:
        image.save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(caption)
    (data / "notes.jpg").write_text("this is not an image")
    (data / "notes.txt").write_text("a text file")
    done = run_cli("--model", str(pipe), "--data", str(data), "--out", str(tmp_path / "c"), "--resolution", "256")
    assert done.returncode == 0, done.stderr
    assert "cached 3 samples in 3 shards" in done.stdout and "1 images skipped" in done.stdout
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["depends"]["max_tokens"] == 120  # α's default, read from model_index.json
    assert manifest["depends"]["text_encoder"] == expect["text_encoder"]

    bad = run_cli("--model", str(pipe), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d"))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: dataset ")
    assert str(tmp_path / "nowhere") in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "d").exists()
