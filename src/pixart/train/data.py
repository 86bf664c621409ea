"""Training data: captioned-image datasets, aspect-ratio buckets and a deterministic, shardable batch loader.

Three sources give the same records (key, caption, original size):
- a folder of images with same-name ``.txt`` captions, or a ``metadata.jsonl`` / ``metadata.csv`` with a
  ``file_name`` column and a caption column (the Hugging Face imagefolder layout);
- a Hugging Face ``datasets`` dataset (a folder written by ``save_to_disk`` or a hub name);
- webdataset shards: uncompressed ``.tar`` files holding ``xxx.jpg``/``xxx.png`` next to ``xxx.txt``.

Image sizes are read from file headers once, when a dataset is opened, and every image is put in the
bucket of the official PixArt table whose height/width ratio is nearest. :class:`BatchLoader` draws every
batch from one bucket, in an order that is a pure function of (seed, epoch), so a run can resume at an
exact batch and processes can split each global batch between them. Unreadable images never stop a run:
they are skipped, counted and summarised in the log.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from pixart.errors import PixArtError
from pixart.model.resolution import bucket_table

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_COLUMNS = ("text", "caption", "prompt")
"""Caption column names tried, in order, when the user names none."""


def closest_ratio(height: int, width: int, table: dict[float, tuple[int, int]]) -> float:
    """The bucket ratio nearest to height/width (the first in table order on a tie, as the official code)."""
    return min(table, key=lambda ratio: abs(ratio - height / width))


def resize_cover_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale an image to cover height × width with its aspect ratio kept, then cut out the centre."""
    scale = max(height / image.height, width / image.width)
    new_h = max(height, round(image.height * scale))
    new_w = max(width, round(image.width * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top = round((new_h - height) / 2)
    left = round((new_w - width) / 2)
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image → float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Record:
    """One usable sample: where its image is, its caption and its original size from the file header."""

    key: str
    caption: str
    height: int
    width: int
    locator: Any
    """Source-specific address of the image bytes (a path, a row number, a tar offset)."""


class UnreadableImage(Exception):
    """An image whose bytes cannot be read or decoded; the loaders skip it."""


def _sideways(image: Image.Image) -> bool:
    """Whether a camera JPEG is stored turned by 90° with an EXIF note to rotate it for display.

    Only JPEG is asked: its EXIF sits in the header, while in PNG or WebP it may follow the pixels and
    reading it would mean reading the whole file. Other formats are used as stored.
    """
    return image.format in ("JPEG", "MPO") and image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def _header_size(source: Any) -> tuple[int, int]:
    """(height, width) as displayed, from an image header without decoding the pixels."""
    with Image.open(source) as image:
        return (image.width, image.height) if _sideways(image) else (image.height, image.width)


def _fingerprint(items: list) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FolderSource:
    """Images in a folder (recursively) with ``.txt`` captions, or listed in metadata.jsonl / metadata.csv."""

    def __init__(self, root: Path, caption_column: str | None = None):
        self.root = root
        self.caption_column = caption_column

    def fingerprint(self) -> str:
        # Only files the dataset is made of, so e.g. a cache written inside the folder does not change it.
        wanted = (*IMAGE_EXTENSIONS, ".txt", ".jsonl", ".csv")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in wanted and p.is_file())
        return _fingerprint([(str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])

    def _metadata(self) -> list[dict] | None:
        jsonl, table = self.root / "metadata.jsonl", self.root / "metadata.csv"
        if jsonl.is_file():
            try:
                rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise PixArtError(f"{jsonl}: line {err.lineno} is not valid JSON") from None
        elif table.is_file():
            with open(table, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            return None
        where = jsonl if jsonl.is_file() else table
        columns = set().union(*(row.keys() for row in rows)) if rows else set()
        if "file_name" not in columns:
            raise PixArtError(f"{where} has no 'file_name' column; columns: {', '.join(sorted(columns)) or 'none'}")
        column = _caption_column(self.caption_column, columns, str(where))
        return [{"file_name": row.get("file_name"), "caption": row.get(column)} for row in rows]

    def scan(self) -> Iterator[tuple[str, str | None, Any, Any]]:
        """(key, caption (None if missing, an UnreadableImage if unusable), locator, header source) per image."""
        rows = self._metadata()
        if rows is None:
            for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
                text = path.with_suffix(".txt")
                caption = _decode_caption(text.read_bytes()) if text.is_file() else None
                yield str(path.relative_to(self.root)), caption, path, path
        else:
            for row in rows:
                path = self.root / str(row["file_name"])
                yield str(row["file_name"]), row["caption"], path, path

    def read(self, locator: Path) -> Any:
        return locator


class HFSource:
    """A Hugging Face ``datasets`` split, with its image column read undecoded (bytes or path)."""

    def __init__(self, dataset, name: str, image_column: str, caption_column: str | None):
        from datasets import Image as ImageFeature

        columns = set(dataset.column_names)
        if image_column not in columns:
            raise PixArtError(
                f"dataset {name}: no image column {image_column!r}; columns: {', '.join(sorted(columns))}"
            )
        self.caption_column = _caption_column(caption_column, columns, f"dataset {name}")
        self.image_column = image_column
        self.name = name
        # Undecoded, the column holds {"bytes", "path"}: sizes come from headers and bad files fail per image.
        self.dataset = dataset.cast_column(image_column, ImageFeature(decode=False))

    def fingerprint(self) -> str:
        return _fingerprint([getattr(self.dataset, "_fingerprint", None), len(self.dataset)])

    def scan(self) -> Iterator[tuple[str, str | None, Any, Any]]:
        captions = self.dataset[self.caption_column]
        for row, caption in enumerate(captions):
            yield f"{self.name}[{row}]", caption, row, None

    def read(self, row: int) -> Any:
        value = self.dataset[row][self.image_column]
        if value is None:
            raise UnreadableImage("empty image cell")
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return value["path"]
        raise UnreadableImage("image cell has neither bytes nor path")


class TarSource:
    """Webdataset shards: uncompressed .tar files of ``key.jpg|png|…`` + ``key.txt`` members.

    Tars are read member by member and only offsets are kept, so shards are never held in memory;
    loading an image is one seek and one read.
    """

    def __init__(self, shards: list[Path]):
        self.shards = shards

    def fingerprint(self) -> str:
        return _fingerprint([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.shards])

    def scan(self) -> Iterator[tuple[str, str | None, Any, Any]]:
        for shard in self.shards:
            images: dict[str, tarfile.TarInfo] = {}
            captions: dict[str, str] = {}
            try:
                with tarfile.open(shard, mode="r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        folder, base = os.path.split(member.name)
                        stem, _, ext = base.partition(".")
                        key = os.path.join(folder, stem)
                        if f".{ext.lower()}" in IMAGE_EXTENSIONS:
                            images[key] = member
                        elif ext.lower() == "txt":
                            captions[key] = _decode_caption(tar.extractfile(member).read())
            except (tarfile.TarError, OSError) as err:
                raise PixArtError(f"cannot read webdataset shard {shard}: {err}") from None
            for key, member in images.items():
                locator = (str(shard), member.offset_data, member.size)
                yield f"{shard.name}/{key}", captions.get(key), locator, None

    def read(self, locator: tuple[str, int, int]) -> Any:
        shard, offset, size = locator
        with open(shard, "rb") as f:
            f.seek(offset)
            return io.BytesIO(f.read(size))


def _decode_caption(data: bytes) -> str | UnreadableImage:
    """A caption file's text, or the reason to skip its sample (returned, not raised, so the scan goes on)."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        return UnreadableImage(f"caption is not UTF-8 text ({err.reason} at byte {err.start})")


def _caption_column(requested: str | None, columns: set, where: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise PixArtError(f"{where}: no caption column {requested!r}; columns: {', '.join(sorted(columns))}")
        return requested
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise PixArtError(
        f"{where}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}); "
        f"name one of {', '.join(sorted(columns))} with --caption-column"
    )


class ImageDataset:
    """Captioned images from one source, each with its original size read once from its header.

    ``skipped`` lists (key, reason) of images found unusable while scanning (unreadable header, no
    caption, missing file); images that fail later, when decoded, are counted by the loader. ``caption``
    set gives every image that caption (DreamBooth's instance prompt), whatever caption files say.
    """

    def __init__(self, source, name: str, caption: str | None = None, progress: bool = True):
        self.source = source
        self.name = name
        self.fingerprint = source.fingerprint()
        self.records: list[Record] = []
        self.skipped: list[tuple[str, str]] = []
        for key, found, locator, header in tqdm(
            source.scan(), desc="reading image sizes", unit="img", leave=False, disable=not progress
        ):
            text = caption if caption is not None else found
            if text is None or isinstance(text, UnreadableImage):
                self.skipped.append((key, str(text or "no caption")))
                continue
            try:
                height, width = _header_size(header if header is not None else source.read(locator))
            except (OSError, UnreadableImage, ValueError, Image.DecompressionBombError) as err:
                self.skipped.append((key, _reason(err)))
                continue
            self.records.append(Record(key, str(text), height, width, locator))
        if self.skipped:
            log.warning("%s: skipped %d unusable images, e.g. %s: %s", name, len(self.skipped), *self.skipped[0])
        if not self.records:
            raise PixArtError(f"dataset {name} has no usable captioned images ({len(self.skipped)} skipped)")
        log.info("%s: %d captioned images", name, len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image:
        """The decoded RGB image of a record; raises UnreadableImage if its bytes are corrupt."""
        record = self.records[index]
        try:
            with Image.open(self.source.read(record.locator)) as image:
                image = (ImageOps.exif_transpose(image) if image.format in ("JPEG", "MPO") else image).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UnreadableImage(_reason(err)) from None
        if (image.height, image.width) != (record.height, record.width):
            raise UnreadableImage(f"decoded size {image.size} differs from the header")
        return image


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def open_dataset(
    spec: str | Path,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    split: str = "train",
    caption: str | None = None,
    progress: bool = True,
) -> ImageDataset:
    """Open a dataset given as a folder, a .tar shard / folder of shards / glob, a saved or hub ``datasets`` name.

    ``caption``: one caption for every image, so a folder of images without caption files will do. ``progress``:
    a bar while the image sizes are read.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?[") and not path.exists():
        shards = [Path(p) for p in sorted(glob.glob(text)) if p.endswith(".tar")]
        if not shards:
            raise PixArtError(f"no .tar shards match {text!r}")
        return ImageDataset(TarSource(shards), text, caption, progress)
    if path.is_file():
        if path.suffix != ".tar":
            raise PixArtError(f"dataset file {text!r} is not a .tar shard; expected a folder, .tar shards or a dataset")
        return ImageDataset(TarSource([path]), text, caption, progress)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return ImageDataset(
                HFSource(_load_hf(path, split, saved=True), text, image_column, caption_column), text, caption, progress
            )
        shards = sorted(path.glob("*.tar"))
        if shards:
            return ImageDataset(TarSource(shards), text, caption, progress)
        return ImageDataset(FolderSource(path, caption_column), text, caption, progress)
    if not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", text):
        raise PixArtError(
            f"dataset {text!r} not found: expected an image folder, .tar shards or a Hugging Face dataset name"
        )
    return ImageDataset(
        HFSource(_load_hf(text, split, saved=False), text, image_column, caption_column), text, caption, progress
    )


def _load_hf(source: str | Path, split: str, saved: bool):
    try:
        import datasets
    except ImportError:
        raise PixArtError("Hugging Face datasets need the 'train' extra: pip install 'pixart[train]'") from None
    try:
        loaded = datasets.load_from_disk(str(source)) if saved else datasets.load_dataset(str(source), split=split)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
        where = "" if saved else "no such local path, and as a Hugging Face dataset: "
        raise PixArtError(f"cannot load dataset {str(source)!r}: {where}{str(err).splitlines()[0]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise PixArtError(f"dataset {str(source)!r} has no split {split!r}; splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


# ----------------------------------------------------------------------------------------------- batches


class Bucketed(Protocol):
    """What BatchLoader needs: sample indices grouped by bucket ratio, and a way to load one batch."""

    groups: dict[float, list[int]]

    def load_batch(self, ratio: float, indices: list[int], flips: list[bool]) -> tuple[dict, list[str]]:
        """The batch dict and the keys of images that had to be skipped (replaced) while loading it."""


class ImageBuckets:
    """An ImageDataset put into the official buckets of one base resolution; loads image batches."""

    def __init__(self, dataset: ImageDataset, resolution: int):
        self.dataset = dataset
        self.resolution = resolution
        self.table = bucket_table(resolution)
        self.groups: dict[float, list[int]] = {}
        for index, record in enumerate(dataset.records):
            self.groups.setdefault(closest_ratio(record.height, record.width, self.table), []).append(index)

    def load_batch(self, ratio: float, indices: list[int], flips: list[bool]) -> tuple[dict, list[str]]:
        height, width = self.table[ratio]
        group = self.groups[ratio]
        images, records, skipped = [], [], []
        for index, flip in zip(indices, flips, strict=True):
            # A corrupt image is replaced by the next readable one of its bucket, so every process
            # still gets a full batch and steps stay in lockstep.
            start = group.index(index)
            for step in range(len(group)):
                candidate = group[(start + step) % len(group)]
                try:
                    image = self.dataset.load_image(candidate)
                    break
                except UnreadableImage as err:
                    skipped.append(f"{self.dataset.records[candidate].key}: {err}")
            else:
                raise PixArtError(f"every image in the {ratio} bucket of {self.dataset.name} is unreadable")
            image = resize_cover_crop(image, height, width)
            if flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            images.append(to_tensor(image))
            records.append(self.dataset.records[candidate])
        batch = {
            "image": torch.stack(images),
            "caption": [r.caption for r in records],
            "resolution": torch.tensor([[r.height, r.width] for r in records], dtype=torch.float32),
            "aspect_ratio": torch.full((len(records),), ratio, dtype=torch.float32),
            "key": [r.key for r in records],
        }
        return batch, skipped


def epoch_plan(
    groups: dict[float, list[int]],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    num_processes: int = 1,
    process_index: int = 0,
    drop_last: bool = True,
    flip: bool = False,
) -> list[tuple[float, list[int], list[bool]]]:
    """This process's batches for one epoch as (bucket ratio, sample indices, flips), a pure function of its arguments.

    Each global batch (batch_size × num_processes samples of one bucket) is cut into num_processes
    consecutive slices; process i takes slice i, so the slices of one step together are exactly the
    single-process batch of size batch_size × num_processes. A bucket's last, incomplete global
    batch is dropped (``drop_last``) or filled up by cycling through that bucket again.
    """
    if not 0 <= process_index < num_processes:
        raise PixArtError(f"process index {process_index} is outside 0..{num_processes - 1}")
    rng = np.random.default_rng([seed, epoch])
    size = batch_size * num_processes
    plan = []
    for ratio in sorted(groups):
        order = [groups[ratio][i] for i in rng.permutation(len(groups[ratio]))]
        full, rest = divmod(len(order), size)
        chunks = [order[i * size : (i + 1) * size] for i in range(full)]
        if rest and not drop_last:
            chunks.append([order[(full * size + i) % len(order)] for i in range(size)])
        plan.extend((ratio, chunk) for chunk in chunks)
    plan = [plan[i] for i in rng.permutation(len(plan))]
    flips = rng.random((len(plan), size)) < 0.5 if flip else np.zeros((len(plan), size), dtype=bool)
    lo, hi = process_index * batch_size, (process_index + 1) * batch_size
    return [(ratio, chunk[lo:hi], flips[b, lo:hi].tolist()) for b, (ratio, chunk) in enumerate(plan)]


class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, data: Bucketed, plan: list):
        self.data, self.plan = data, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[dict, list[str]]:
        return self.data.load_batch(*self.plan[i])


class BatchLoader:
    """Batches of one bucket each, in an order fixed by (seed, epoch), split across processes.

    ``epoch(e, skip=n)`` yields epoch e from its (n+1)-th batch: what a resumed run needs. ``skipped``
    counts images skipped because they could not be decoded, over the loader's lifetime; images
    rejected when the dataset was opened are in ``dataset.skipped``.
    """

    def __init__(
        self,
        data: Bucketed,
        batch_size: int,
        *,
        seed: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
        drop_last: bool = True,
        flip: bool = False,
        num_workers: int = 0,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise PixArtError(f"batch size must be a positive integer, got {batch_size!r}")
        if flip and not getattr(data, "supports_flip", True):
            raise PixArtError("this feature cache was built without --flip; rebuild it with --flip to train with flips")
        self.data = data
        self.batch_size = batch_size
        self.options = dict(
            seed=seed, num_processes=num_processes, process_index=process_index, drop_last=drop_last, flip=flip
        )
        self.num_workers = num_workers
        self.skipped = 0
        self.skipped_examples: list[str] = []
        if len(self) == 0:
            largest = max((len(g) for g in data.groups.values()), default=0)
            raise PixArtError(
                f"no bucket holds a full global batch of {batch_size * num_processes} images (largest bucket: "
                f"{largest}); lower the batch size or allow incomplete batches"
            )

    def plan(self, epoch: int) -> list[tuple[float, list[int], list[bool]]]:
        return epoch_plan(self.data.groups, self.batch_size, epoch=epoch, **self.options)

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch and every process)."""
        size = self.batch_size * self.options["num_processes"]
        if self.options["drop_last"]:
            return sum(len(g) // size for g in self.data.groups.values())
        return sum(-(-len(g) // size) for g in self.data.groups.values())

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        plan = self.plan(epoch)
        if not 0 <= skip <= len(plan):
            raise PixArtError(f"cannot skip {skip} batches: epoch {epoch} has {len(plan)}")
        loader = torch.utils.data.DataLoader(
            _PlanDataset(self.data, plan[skip:]),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        before = self.skipped
        for batch, skipped in loader:
            self.skipped += len(skipped)
            for reason in skipped:
                log.debug("skipped unreadable image %s", reason)
            self.skipped_examples.extend(skipped[: max(0, 5 - len(self.skipped_examples))])
            yield batch
        if self.skipped > before:
            log.warning(
                "epoch %d: skipped %d unreadable images (replaced by others of their bucket), e.g. %s",
                epoch,
                self.skipped - before,
                self.skipped_examples[0],
            )
