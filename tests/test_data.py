"""Datasets, aspect-ratio buckets and the batch loader, on a tiny dataset written in each supported format."""

from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixart.errors import PixArtError
from pixart.model.resolution import bucket_table
from pixart.train.data import BatchLoader, ImageBuckets, open_dataset, resize_cover_crop, to_tensor

# (height, width) of the fixture images: four each of three aspect ratios.
SHAPES = [(32, 32)] * 4 + [(24, 48)] * 4 + [(48, 24)] * 4
# The official 256-px buckets these land in, copied from the PixArt tables (not from pixart.train.data).
BUCKET_OF_SHAPE = {(32, 32): (1.0, (256, 256)), (24, 48): (0.5, (176, 352)), (48, 24): (2.0, (352, 176))}


def fixture_images() -> list[tuple[str, Image.Image, str]]:
    rng = np.random.default_rng(0)
    return [
        (f"img{i:02d}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), f"a photo number {i}")
        for i, (h, w) in enumerate(SHAPES)
    ]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root: Path, every: int = 1) -> Path:
    """The fixture images (every n-th of them) as PNGs with .txt captions."""
    root.mkdir(parents=True)
    for name, image, caption in fixture_images()[::every]:
        image.save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption)
    return root


def write_metadata_folder(root: Path, kind: str) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for name, image, caption in fixture_images():
        image.save(root / "images" / f"{name}.png")
        rows.append({"file_name": f"images/{name}.png", "caption": caption})
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def write_hf(root: Path) -> Path:
    import datasets

    items = fixture_images()
    features = datasets.Features({"picture": datasets.Image(), "words": datasets.Value("string")})
    data = {"picture": [image for _, image, _ in items], "words": [caption for _, _, caption in items]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root))
    return root


def write_shards(root: Path) -> Path:
    root.mkdir(parents=True)
    items = fixture_images()
    for shard in range(2):
        with tarfile.open(root / f"part-{shard:03d}.tar", "w") as tar:
            for name, image, caption in items[shard::2]:
                for suffix, payload in ((".png", png_bytes(image)), (".txt", caption.encode())):
                    info = tarfile.TarInfo(name + suffix)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def samples(dataset) -> dict[str, tuple[tuple[int, int], torch.Tensor]]:
    return {r.caption: ((r.height, r.width), to_tensor(dataset.load_image(i))) for i, r in enumerate(dataset.records)}


def test_every_dataset_kind_yields_the_same_samples(tmp_path):
    expected = {caption: ((image.height, image.width), to_tensor(image)) for _, image, caption in fixture_images()}
    opened = {
        "folder": open_dataset(write_folder(tmp_path / "folder")),
        "jsonl": open_dataset(write_metadata_folder(tmp_path / "jsonl", "jsonl")),
        "csv": open_dataset(write_metadata_folder(tmp_path / "csv", "csv")),
        "hf": open_dataset(write_hf(tmp_path / "hf"), image_column="picture", caption_column="words"),
        "tar": open_dataset(write_shards(tmp_path / "tars")),
        "one tar": open_dataset(tmp_path / "tars" / "part-000.tar"),
        "tar glob": open_dataset(str(tmp_path / "tars" / "part-*.tar")),
    }
    for kind, dataset in opened.items():
        got = samples(dataset)
        if kind == "one tar":
            assert sorted(got) == sorted(caption for _, _, caption in fixture_images()[0::2])
        else:
            assert sorted(got) == sorted(expected), kind
        for caption, (size, pixels) in got.items():
            assert size == expected[caption][0], (kind, caption)
            assert torch.equal(pixels, expected[caption][1]), (kind, caption)


def test_a_saved_dataset_dict_opens_the_asked_split(tmp_path):
    import datasets

    train = datasets.load_from_disk(str(write_hf(tmp_path / "one")))
    datasets.DatasetDict({"train": train, "test": train.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    opened = open_dataset(tmp_path / "dict", image_column="picture", caption_column="words", split="test")
    assert [r.caption for r in opened.records] == ["a photo number 0", "a photo number 1"]
    with pytest.raises(PixArtError, match="has no split 'valid'; splits: train, test"):
        open_dataset(tmp_path / "dict", image_column="picture", split="valid")


def test_bad_dataset_specs_are_one_line_errors(tmp_path):
    write_hf(tmp_path / "hf")
    with pytest.raises(PixArtError, match="not found"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(PixArtError, match="no image column 'image'; columns: picture, words"):
        open_dataset(tmp_path / "hf")
    with pytest.raises(PixArtError, match="no caption column 'nope'"):
        open_dataset(tmp_path / "hf", image_column="picture", caption_column="nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixArtError, match="no usable captioned images"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(PixArtError, match="no bucket table for resolution 300"):
        bucket_table(300)
    listed = write_metadata_folder(tmp_path / "listed", "jsonl")
    with open(listed / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "images/gone.png", "caption": "deleted"}) + "\n")
    dataset = open_dataset(listed)
    assert len(dataset) == 12 and [key for key, _ in dataset.skipped] == ["images/gone.png"]
    (listed / "metadata.jsonl").write_text(json.dumps({"path": "images/img00.png", "caption": "x"}) + "\n")
    with pytest.raises(PixArtError, match="has no 'file_name' column; columns: caption, path"):
        open_dataset(listed)


def test_bucket_tables_are_the_official_ones():
    for resolution in (256, 512, 1024, 2048):
        table = bucket_table(resolution)
        assert len(table) == 40 and min(table) == 0.25 and max(table) == 4.0
        assert table[1.0] == (resolution, resolution)
    assert bucket_table(256)[0.26] == (128, 496)
    assert bucket_table(512)[3.62] == (928, 256)
    assert bucket_table(2048)[0.57] == (1536, 2688)


def test_every_batch_is_one_bucket_at_its_size_with_original_sizes(tmp_path):
    dataset = open_dataset(write_folder(tmp_path / "folder"))
    loader = BatchLoader(ImageBuckets(dataset, 256), batch_size=2, seed=3)
    shape_of = {f"img{i:02d}.png": shape for i, shape in enumerate(SHAPES)}
    seen = []
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 6
    for batch in batches:
        shapes = {shape_of[key] for key in batch["key"]}
        assert len(shapes) == 1
        shape = shapes.pop()
        ratio, size = BUCKET_OF_SHAPE[shape]
        assert batch["image"].shape == (2, 3, *size)
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["aspect_ratio"].tolist() == [ratio, ratio]
        assert batch["resolution"].tolist() == [list(shape), list(shape)]
        assert len(batch["caption"]) == 2
        seen += batch["key"]
    assert sorted(seen) == sorted(shape_of)


def banded(height: int, width: int, axis: int) -> Image.Image:
    """Four equal bands, red, green, blue, white, along columns (axis 1) or rows (axis 0)."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)
    length = (height, width)[axis]
    band = np.arange(length) * 4 // length
    pixels = np.broadcast_to(colours[band][None] if axis == 1 else colours[band][:, None], (height, width, 3))
    return Image.fromarray(np.ascontiguousarray(pixels))


def test_resize_cover_crop_keeps_the_centre():
    green, blue = torch.tensor([-1.0, 1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    # 10 × 80 scaled ×12.8 to 128 × 1024 covers the 128 × 512 bucket; the centre half (green, blue) stays.
    wide = to_tensor(resize_cover_crop(banded(10, 80, axis=1), 128, 512))
    assert wide.shape == (3, 128, 512)
    for column, colour in ((64, green), (192, green), (320, blue), (448, blue)):
        assert torch.allclose(wide[:, :, column], colour[:, None].expand(3, 128), atol=1 / 127.5), column
    tall = to_tensor(resize_cover_crop(banded(80, 10, axis=0), 512, 128))
    assert tall.shape == (3, 512, 128)
    for row, colour in ((64, green), (448, blue)):
        assert torch.allclose(tall[:, row, :], colour[:, None].expand(3, 128), atol=1 / 127.5), row


def test_flip_mirrors_some_images_and_is_deterministic(tmp_path):
    root = tmp_path / "pattern"
    root.mkdir()
    for i in range(4):
        banded(32, 32, axis=1).save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text("bands")
    buckets = ImageBuckets(open_dataset(root), 256)
    batch, _ = buckets.load_batch(1.0, [0, 1], [False, True])
    red = torch.tensor([1.0, -1.0, -1.0])
    white = torch.tensor([1.0, 1.0, 1.0])
    assert torch.allclose(batch["image"][0, :, 100, 5], red) and torch.allclose(batch["image"][0, :, 100, 250], white)
    assert torch.allclose(batch["image"][1, :, 100, 5], white) and torch.allclose(batch["image"][1, :, 100, 250], red)

    def left_colours(seed):
        loader = BatchLoader(buckets, batch_size=1, seed=seed, flip=True)
        return [tuple(b["image"][0, :, 100, 5].tolist()) for epoch in range(4) for b in loader.epoch(epoch)]

    colours = left_colours(0)
    assert colours == left_colours(0)
    assert set(colours) == {tuple(red.tolist()), tuple(white.tolist())}


def keys_of(loader, epoch, skip=0):
    return [batch["key"] for batch in loader.epoch(epoch, skip=skip)]


def test_order_is_a_function_of_seed_and_epoch_and_resumes_exactly(tmp_path):
    buckets = ImageBuckets(open_dataset(write_folder(tmp_path / "folder")), 256)
    loader = BatchLoader(buckets, batch_size=2, seed=7)
    first = keys_of(loader, 0)
    assert first == keys_of(BatchLoader(buckets, batch_size=2, seed=7), 0)
    assert first != keys_of(loader, 1)
    assert first != keys_of(BatchLoader(buckets, batch_size=2, seed=8), 0)
    full = list(loader.epoch(1))
    resumed = list(loader.epoch(1, skip=4))
    assert [b["key"] for b in resumed] == [b["key"] for b in full[4:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[4:], strict=True))
    with pytest.raises(PixArtError, match="cannot skip 7 batches: epoch 0 has 6"):
        next(loader.epoch(0, skip=7))


def test_two_processes_split_each_global_batch(tmp_path):
    buckets = ImageBuckets(open_dataset(write_folder(tmp_path / "folder")), 256)
    single = list(BatchLoader(buckets, batch_size=4, seed=5, flip=True).epoch(2))
    parts = [
        list(BatchLoader(buckets, 2, seed=5, num_processes=2, process_index=p, flip=True, num_workers=p).epoch(2))
        for p in (0, 1)
    ]
    assert len(single) == len(parts[0]) == len(parts[1]) == 3
    for whole, a, b in zip(single, *parts, strict=True):
        assert a["key"] + b["key"] == whole["key"]
        assert torch.equal(torch.cat([a["image"], b["image"]]), whole["image"])
        assert torch.equal(torch.cat([a["resolution"], b["resolution"]]), whole["resolution"])


def test_incomplete_batches_dropped_or_filled(tmp_path):
    buckets = ImageBuckets(open_dataset(write_folder(tmp_path / "folder")), 256)
    assert len(BatchLoader(buckets, batch_size=3)) == 3
    filled = BatchLoader(buckets, batch_size=3, drop_last=False)
    batches = keys_of(filled, 0)
    assert len(batches) == len(filled) == 6 and all(len(keys) == 3 for keys in batches)
    assert {k for keys in batches for k in keys} == {f"img{i:02d}.png" for i in range(12)}
    with pytest.raises(PixArtError, match="no bucket holds a full global batch of 10 images"):
        BatchLoader(buckets, batch_size=5, num_processes=2)


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    root = write_folder(tmp_path / "folder")
    whole = png_bytes(Image.new("RGB", (32, 32), "red"))
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "truncated.txt").write_text("half a file")
    (root / "notes.jpg").write_text("this is not an image")
    (root / "notes.txt").write_text("a text file")
    (root / "uncaptioned.png").write_bytes(whole)
    (root / "latin1.png").write_bytes(whole)
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        dataset = open_dataset(root)
    assert sorted(key for key, _ in dataset.skipped) == ["latin1.png", "notes.jpg", "uncaptioned.png"]
    assert "caption is not UTF-8 text" in dict(dataset.skipped)["latin1.png"]
    assert "skipped 3 unusable images" in caplog.text
    assert "truncated.png" in [r.key for r in dataset.records]  # its header is fine; decoding fails
    loader = BatchLoader(ImageBuckets(dataset, 256), batch_size=5, seed=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = list(loader.epoch(0))
    assert len(batches) == 1 and batches[0]["image"].shape == (5, 3, 256, 256)
    assert "truncated.png" not in batches[0]["key"]
    assert loader.skipped == 1
    assert "skipped 1 unreadable images" in caplog.text and "truncated.png" in caplog.text


def test_exif_rotated_photos_are_bucketed_and_loaded_upright(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    stored = Image.new("RGB", (48, 24), "blue")  # stored 24 high × 48 wide, displayed 48 high × 24 wide
    stored.save(root / "phone.jpg", exif=exif)
    (root / "phone.txt").write_text("a phone photo")
    dataset = open_dataset(root)
    assert (dataset.records[0].height, dataset.records[0].width) == (48, 24)
    assert dataset.load_image(0).size == (24, 48)  # PIL sizes are (width, height)
    batch, _ = ImageBuckets(dataset, 256).load_batch(2.0, [0], [False])
    assert batch["image"].shape == (1, 3, 352, 176)
