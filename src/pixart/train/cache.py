"""The feature cache: T5 caption features and VAE latent moments computed once, stored as safetensors shards.

Training at 1024 px spends most of its time in T5-XXL and the VAE encoder, whose outputs never change
for a given image and caption; caching them makes an epoch cost only the transformer. A cache folder holds:

- ``bucket-<ratio>-<n>.safetensors`` shards, each of one aspect-ratio bucket, with per sample the VAE
  posterior ``latent_mean`` / ``latent_std`` (unscaled: the trainer samples and multiplies by the VAE
  scaling factor), ``text_features`` (zero at padding) / ``text_mask`` trimmed to the longest caption of
  the shard, and the original ``resolution``; with ``flip`` also the moments of the mirrored image (``*_flip``);
  with ``control`` (a ControlNet preprocessor) also ``control_mean``, the VAE posterior mean of each image's
  control map (and ``control_mean_flip``, of the mirrored image's map);
- ``manifest.json``, written last: everything the cache depends on (text encoder and VAE identity, max
  tokens, base resolution and bucket table, dataset fingerprint, flip, caption cleaning) and the shard list.

A cache without a manifest is incomplete. Shards are written atomically and carry the fingerprint of
what they depend on, so re-running a killed ``pixart cache`` reuses finished shards and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pixart.checkpoints.hub import resolve_pipeline
from pixart.errors import PixArtError, first_line
from pixart.files import atomic_write, disk_full_is_one_line
from pixart.model.config import FAMILY, family_of_pipeline
from pixart.model.resolution import BUCKET_RESOLUTIONS, bucket_table
from pixart.train.data import ImageBuckets, ImageDataset, UnreadableImage, resize_cover_crop, to_tensor

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "pixart-feature-cache/1"
_SHARD = re.compile(r"bucket-[0-9.]+-\d{5}\.safetensors")
_MODEL_FILES = ["model_index.json", "vae/*", "text_encoder/*", "tokenizer/*", "transformer/config.json"]


def resolve_model(model: str | Path) -> Path:
    """A local pipeline folder for a path or hub id (downloading only the VAE, T5 and tokenizer).

    Absolute, as the manifest records it: a cache built from ./model then opens from any folder.
    """
    return resolve_pipeline(model, _MODEL_FILES).resolve()


def component_fingerprint(root: Path, subfolder: str) -> dict[str, str]:
    """A cheap identity of one pipeline component: its path plus a hash of its configs and weight file stats."""
    folder = root / subfolder
    if not folder.is_dir():
        raise PixArtError(f"{root} has no {subfolder}/ folder; expected a diffusers PixArt pipeline folder")
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(file.name.encode())
        # Configs are hashed by content, weights by size and mtime: reading GBs of weights is not cheap.
        digest.update(file.read_bytes() if file.suffix == ".json" else f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return {"path": str(folder), "hash": digest.hexdigest()[:16]}


def model_defaults(root: Path) -> dict[str, int | None]:
    """Base resolution and max tokens implied by a pipeline folder (None where it cannot tell)."""
    resolution = None
    config = root / "transformer" / "config.json"
    if config.is_file():
        side = json.loads(config.read_text()).get("sample_size", 0) * 8
        resolution = side if side in BUCKET_RESOLUTIONS else None
    index = root / "model_index.json"
    family = family_of_pipeline(json.loads(index.read_text()).get("_class_name", "")) if index.is_file() else None
    return {"resolution": resolution, "max_tokens": FAMILY[family or "alpha"].max_tokens}


def cache_expectations(
    model: str | Path,
    *,
    resolution: int,
    max_tokens: int,
    dataset: ImageDataset | None = None,
    flip: bool = False,
    clean: bool = True,
    control: str | None = None,
) -> dict[str, Any]:
    """What a cache built from these inputs depends on: the ``expect`` argument of :func:`open_cache`.

    Leave ``dataset`` out to accept a cache of any dataset.
    """
    root = resolve_model(model)
    table = bucket_table(resolution)
    expect = {
        "text_encoder": component_fingerprint(root, "text_encoder"),
        "vae": component_fingerprint(root, "vae"),
        "max_tokens": max_tokens,
        "resolution": resolution,
        "bucket_table": hashlib.sha256(json.dumps(sorted(table.items())).encode()).hexdigest()[:16],
        "flip": flip,
        "clean_captions": clean,
    }
    if dataset is not None:
        expect["dataset"] = dataset.fingerprint
    if control is not None:  # only then: caches without control maps keep their fingerprint
        expect["control"] = control
    return expect


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=1, sort_keys=True)
    with disk_full_is_one_line(f"feature cache {path.name}", path.parent):
        atomic_write(path, lambda tmp: tmp.write_text(text))


def _shard_meta(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception:  # a foreign or damaged file is simply not reusable
        return None


@torch.no_grad()
def build_cache(
    model: str | Path,
    dataset: ImageDataset,
    out: str | Path,
    *,
    resolution: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    shard_size: int = 64,
    flip: bool = False,
    clean: bool = True,
    control: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Encode every image and caption of a dataset once and write the cache to ``out``; returns the manifest.

    ``control``: also the latents of each image's control map by this preprocessor ('canny', 'layout' or 'none'), for
    ControlNet training."""
    from diffusers import AutoencoderKL

    from pixart.model.text import TextEncoder

    if control is not None:
        from pixart.inference.control import check_control_type

        check_control_type(control)
    for name, value in (("batch size", batch_size), ("shard size", shard_size), ("max tokens", max_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise PixArtError(f"{name} must be a positive integer, got {value!r}")
    root = resolve_model(model)
    defaults = model_defaults(root)
    resolution = resolution or defaults["resolution"]
    if resolution is None:
        raise PixArtError(f"cannot tell the training resolution of {root}; pass --resolution (256, 512, 1024, 2048)")
    max_tokens = max_tokens or defaults["max_tokens"]
    depends = cache_expectations(
        root, resolution=resolution, max_tokens=max_tokens, dataset=dataset, flip=flip, clean=clean, control=control
    )
    fingerprint = _hash(depends)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PixArtError(f"cache output {out} is a file; expected a folder (new or a previous cache)")
    out.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete cache; drop an old one first so a killed run never looks finished.
    (out / MANIFEST).unlink(missing_ok=True)

    text_encoder = TextEncoder.from_pretrained(root, device=device)
    try:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae").to(device).eval()
    except OSError as err:
        raise PixArtError(f"cannot load the VAE from {root}/vae: {first_line(err)}") from None
    buckets = ImageBuckets(dataset, resolution)
    work = [
        (ratio, n, group[start : start + shard_size])
        for ratio, group in sorted(buckets.groups.items())
        for n, start in enumerate(range(0, len(group), shard_size))
    ]
    shards, skipped = [], list(dataset.skipped)
    # A with block closes the bar on a failure too, so an error line starts on a line of its own.
    with tqdm(total=len(dataset), desc="caching features", unit="img") as progress:
        for ratio, n, indices in work:
            name = f"bucket-{ratio:.2f}-{n:05d}.safetensors"
            plan = _hash([fingerprint, [dataset.records[i].key for i in indices]])
            meta = _shard_meta(out / name) if (out / name).is_file() else None
            if meta is None or meta.get("plan") != plan:
                meta = _write_shard(
                    out / name,
                    plan,
                    buckets,
                    ratio,
                    indices,
                    text_encoder,
                    vae,
                    max_tokens=max_tokens,
                    clean=clean,
                    batch_size=batch_size,
                    flip=flip,
                    control=control,
                    device=device,
                )
            else:
                log.info("reusing %s", name)
            skipped += json.loads(meta["skipped"])
            count = len(json.loads(meta["keys"]))
            if count:
                shards.append({"file": name, "bucket": ratio, "size": list(buckets.table[ratio]), "count": count})
            progress.update(len(indices))

    manifest = {
        "format": FORMAT,
        "depends": depends,
        "fingerprint": fingerprint,
        "dataset_name": dataset.name,
        "vae_scaling_factor": vae.config.scaling_factor,
        "vae_shift_factor": getattr(vae.config, "shift_factor", None),
        "text_width": text_encoder.width,
        "samples": sum(s["count"] for s in shards),
        "skipped": [list(s) for s in skipped],
        "shards": shards,
    }
    if not manifest["samples"]:
        raise PixArtError(f"no image of {dataset.name} could be encoded ({len(skipped)} skipped)")
    keep = {s["file"] for s in shards}
    for stale in out.iterdir():
        if (_SHARD.fullmatch(stale.name) and stale.name not in keep) or stale.name.startswith(".bucket-"):
            stale.unlink()
    _atomic_json(out / MANIFEST, manifest)
    if skipped:
        log.warning("skipped %d unusable images, e.g. %s: %s", len(skipped), *skipped[0])
    log.info("cached %d samples in %d shards to %s", manifest["samples"], len(shards), out)
    return manifest


def _write_shard(
    path, plan, buckets, ratio, indices, text_encoder, vae, *, max_tokens, clean, batch_size, flip, control, device
) -> dict[str, str]:
    """Encode one shard's images and captions and write it atomically; returns its metadata."""
    dataset = buckets.dataset
    height, width = buckets.table[ratio]
    records, skipped, parts = [], [], []
    # Batch by batch, so a shard of 1024-px images never sits in memory as pixels or full-length features.
    for start in range(0, len(indices), batch_size):
        images, batch_records = [], []
        for index in indices[start : start + batch_size]:
            try:
                images.append(to_tensor(resize_cover_crop(dataset.load_image(index), height, width)))
                batch_records.append(dataset.records[index])
            except UnreadableImage as err:
                skipped.append((dataset.records[index].key, str(err)))
        if not images:
            continue
        pixels = torch.stack(images).to(device, vae.dtype)
        part = dict(zip(("latent_mean", "latent_std"), vae_moments(vae, pixels), strict=True))
        if flip:
            part.update(zip(("latent_mean_flip", "latent_std_flip"), vae_moments(vae, pixels.flip(-1)), strict=True))
        if control is not None:
            part.update(control_moments(vae, pixels, control, flip))
        captions = [r.caption for r in batch_records]
        features, mask = text_encoder.encode(captions, max_tokens, clean=clean, batch_size=batch_size)
        # Keep tokens up to the longest caption and zero the padding: padding is masked out of
        # cross-attention anyway, and full-length T5-XXL features take 4.9 MB per sample at 300 tokens.
        length = max(int(mask.sum(1).max()), 1)
        part["text_features"] = (features * mask[..., None].to(features.dtype))[:, :length].float().cpu()
        part["text_mask"] = mask[:, :length].cpu()
        parts.append(part)
        records += batch_records
    tensors: dict[str, torch.Tensor] = {}
    if records:
        length = max(part["text_mask"].shape[1] for part in parts)
        for part in parts:
            pad = length - part["text_mask"].shape[1]
            part["text_features"] = torch.nn.functional.pad(part["text_features"], (0, 0, 0, pad))
            part["text_mask"] = torch.nn.functional.pad(part["text_mask"], (0, pad))
        tensors = {name: torch.cat([part[name] for part in parts]).contiguous() for name in parts[0]}
        tensors["resolution"] = torch.tensor([[r.height, r.width] for r in records], dtype=torch.float32)
    meta = {
        "plan": plan,
        "bucket": str(ratio),
        "keys": json.dumps([r.key for r in records]),
        "captions": json.dumps([r.caption for r in records]),
        "skipped": json.dumps(skipped),
    }
    if tensors:
        with disk_full_is_one_line(f"feature cache shard {path.name}", path.parent):
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return meta


def vae_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior (unscaled latents) of a batch of images in [-1, 1].

    Training and image-to-image both draw a latent from them as (mean + std · ε) × scaling_factor, diffusers'
    ``latent_dist.sample(generator)`` scaled, so an image is encoded one way everywhere.
    """
    posterior = vae.encode(pixels).latent_dist
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


def control_moments(vae, pixels: torch.Tensor, control: str, flip: bool) -> dict[str, torch.Tensor]:
    """The VAE posterior mean of the control maps of a batch of images in [-1, 1] (and of the mirrored images')."""
    from pixart.train.controlnet import control_maps

    variants = {"control_mean": pixels} | ({"control_mean_flip": pixels.flip(-1)} if flip else {})
    return {name: vae_moments(vae, control_maps(x, control).to(x))[0] for name, x in variants.items()}


def _describe(value: Any) -> str:
    if isinstance(value, dict) and "path" in value:
        return f"{value['path']} ({value.get('hash')})"
    return json.dumps(value)


def open_cache(directory: str | Path, expect: dict[str, Any] | None = None) -> FeatureCache:
    """Open a finished cache, refusing it when it depends on anything other than what ``expect`` says.

    ``expect`` is (a subset of) :func:`cache_expectations`; only the keys it holds are compared.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        what = "is incomplete (no manifest.json)" if directory.is_dir() else "does not exist"
        raise PixArtError(f"feature cache {directory} {what}; run `pixart cache` to build it")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise PixArtError(f"{manifest_path} is not valid JSON; re-run `pixart cache` to rebuild it") from None
    if manifest.get("format") != FORMAT:
        raise PixArtError(f"{directory} is not a {FORMAT} cache (format {manifest.get('format')!r})")
    depends = manifest["depends"]
    differ = [
        f"{key} is {_describe(depends.get(key))} in the cache but {_describe(value)} for this run"
        for key, value in (expect or {}).items()
        if depends.get(key) != value
    ]
    if differ:
        raise PixArtError(
            f"feature cache {directory} is stale: {'; '.join(differ)}; re-run `pixart cache` to rebuild it"
        )
    return FeatureCache(directory, manifest)


class FeatureCache:
    """A finished feature cache as bucketed samples: BatchLoader turns it into cached-form training batches."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest
        self.max_tokens: int = manifest["depends"]["max_tokens"]
        self.resolution: int = manifest["depends"]["resolution"]
        self.supports_flip: bool = manifest["depends"]["flip"]
        self.control: str | None = manifest["depends"].get("control")
        self.scaling_factor: float = manifest["vae_scaling_factor"]
        self.shift_factor: float | None = manifest["vae_shift_factor"]
        self.items: list[tuple[int, int]] = []
        self.groups: dict[float, list[int]] = {}
        for shard_index, shard in enumerate(manifest["shards"]):
            if not (directory / shard["file"]).is_file():
                raise PixArtError(f"feature cache {directory} lacks {shard['file']}; re-run `pixart cache`")
            for row in range(shard["count"]):
                self.groups.setdefault(shard["bucket"], []).append(len(self.items))
                self.items.append((shard_index, row))

    def __len__(self) -> int:
        return len(self.items)

    def load_batch(self, ratio: float, indices: list[int], flips: list[bool]) -> tuple[dict, list[str]]:
        """The cached-form batch of these samples (all of bucket ``ratio``); nothing is ever skipped here."""
        if any(flips) and not self.supports_flip:
            raise PixArtError(
                f"feature cache {self.directory} was built without --flip; rebuild it to train with flips"
            )
        rows: list[dict[str, Any]] = []
        for index, flip in zip(indices, flips, strict=True):
            shard_index, row = self.items[index]
            shard = self.manifest["shards"][shard_index]
            if shard["bucket"] != ratio:
                raise ValueError(f"sample {index} is in bucket {shard['bucket']}, not {ratio}")
            suffix = "_flip" if flip else ""
            with safe_open(str(self.directory / shard["file"]), framework="pt") as f:
                meta = f.metadata()
                sample = {name: f.get_slice(name)[row] for name in ("text_features", "text_mask", "resolution")}
                sample["latent_mean"] = f.get_slice(f"latent_mean{suffix}")[row]
                sample["latent_std"] = f.get_slice(f"latent_std{suffix}")[row]
                if self.control is not None:
                    sample["control_mean"] = f.get_slice(f"control_mean{suffix}")[row]
            sample["key"] = json.loads(meta["keys"])[row]
            rows.append(sample)
        length, width = self.max_tokens, rows[0]["text_features"].shape[-1]
        features = torch.zeros(len(rows), length, width)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, sample in enumerate(rows):
            features[i, : sample["text_features"].shape[0]] = sample["text_features"]
            mask[i, : sample["text_mask"].shape[0]] = sample["text_mask"]
        batch = {
            "latent_mean": torch.stack([s["latent_mean"] for s in rows]),
            "latent_std": torch.stack([s["latent_std"] for s in rows]),
            "text_features": features,
            "text_mask": mask,
            "resolution": torch.stack([s["resolution"] for s in rows]),
            "aspect_ratio": torch.full((len(rows),), ratio, dtype=torch.float32),
            "key": [s["key"] for s in rows],
        }
        if self.control is not None:
            batch["control_mean"] = torch.stack([s["control_mean"] for s in rows])
        return batch, []
