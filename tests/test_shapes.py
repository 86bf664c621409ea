"""The shapes demo: deterministic imagefolder output, the held-out split, and a checker that is right,
rejects wrong targets and survives blur and noise."""

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pixart.demo.checker import Check, check, detect, score
from pixart.demo.shapes import (
    COLOURS,
    PLACES,
    POSITION_WORDS,
    POSITIONS,
    RELATION_WORDS,
    SHAPES,
    Scene,
    SceneObject,
    held_out_prompts,
    make_sample,
    parse_sizes,
    place_labels,
    sample_scene,
    write_dataset,
)
from pixart.errors import PixArtError

SIZES = ((64, 64), (128, 128), (96, 128), (128, 96))
HELD_OUT_OBJECTS = {("blue", "triangle"), ("yellow", "circle"), ("purple", "square"), ("orange", "cross")}
HELD_OUT_SHAPE_PAIRS = ({"circle", "triangle"}, {"square", "cross"})
SIZE_WORDS = ("small", "little", "large", "big")


@pytest.fixture(scope="module")
def samples():
    """240 samples, 60 at each size, from the training split."""
    return [make_sample(3, i, (SIZES[i % 4],)) for i in range(240)]


def degrade(image, seed):
    """What a small generative model does to edges and flat areas: Gaussian blur radius 1, noise σ = 8/255."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    noisy = blurred + np.random.default_rng(seed).normal(0, 8, blurred.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def assert_all_at_least(result, floor):
    low = {k: v for k, v in result.items() if not k.startswith("n_") and v < floor}
    assert not low, f"below {floor}%: {low} ({result})"


def test_checker_right_on_ground_truth(samples):
    result = score(check(s.image, s.scene) for s in samples)
    assert result["n_single"] >= 80 and result["n_pair"] >= 80
    assert_all_at_least(result, 99.0)


def test_checker_survives_blur_and_noise(samples):
    result = score(check(degrade(s.image, i), s.scene) for i, s in enumerate(samples))
    assert_all_at_least(result, 95.0)


def next_of(values, value, avoid=()):
    candidates = [v for v in values[values.index(value) + 1 :] + values[: values.index(value)] if v not in avoid]
    return candidates[0]


def test_checker_rejects_wrong_targets(samples):
    colours, rejected, total = list(COLOURS), {"colour": 0, "shape": 0, "position": 0, "relation": 0}, {}
    for s in samples:
        first, others = s.scene.objects[0], s.scene.objects[1:]
        wrong_colour = next_of(colours, first.colour, avoid=[o.colour for o in others])
        wrong = {
            "colour": replace(s.scene, objects=(replace(first, colour=wrong_colour), *others)),
            "shape": replace(s.scene, objects=(replace(first, shape=next_of(list(SHAPES), first.shape)), *others)),
        }
        if others:
            relation = {"left of": "above", "above": "right of", "right of": "below", "below": "left of"}
            wrong["relation"] = replace(s.scene, relation=relation[s.scene.relation])
        else:
            wrong["position"] = Scene((replace(first, position=next_of(list(POSITIONS), first.position)),))
        for attribute, target in wrong.items():
            total[attribute] = total.get(attribute, 0) + 1
            rejected[attribute] += not getattr(check(s.image, target), attribute)
    for attribute, n in total.items():
        assert rejected[attribute] >= 0.99 * n, f"{attribute}: rejected {rejected[attribute]} of {n}"


def test_checker_on_hand_drawn_shapes():
    """Shapes drawn here with PIL, not by the generator: the checker must name them from pixels alone."""
    image = Image.new("RGB", (128, 96), (235, 232, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 30, 40, 60), fill=(230, 20, 20))  # red circle, left
    draw.polygon([(80, 60), (116, 60), (98, 24)], fill=(20, 60, 230))  # blue triangle, right
    blobs = {b.colour: b for b in detect(image)}
    assert set(blobs) == {"red", "blue"}
    assert (blobs["red"].shape, blobs["blue"].shape) == ("circle", "triangle")
    red_circle, blue_triangle = SceneObject("circle", "red", "large"), SceneObject("triangle", "blue", "large")
    assert check(image, Scene((red_circle, blue_triangle), "left of")).correct
    assert not check(image, Scene((red_circle, blue_triangle), "right of")).relation

    image = Image.new("RGB", (64, 64), (200, 205, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle((26, 4, 37, 15), fill=(30, 180, 40))  # small green square at the top
    got = check(image, Scene((SceneObject("square", "green", "small", "top"),)))
    assert (got.colour, got.shape, got.size, got.position) == (True, True, True, True)
    assert check(image, Scene((SceneObject("cross", "yellow", "large", "bottom"),))) == Check(
        1, False, False, False, False, None
    )

    empty = Image.new("RGB", (64, 64), (220, 215, 200))
    pair = Scene((SceneObject("circle", "red", "small"), SceneObject("square", "blue", "small")), "above")
    assert detect(empty) == [] and not check(empty, pair).colour and not check(empty, pair).correct


def test_score_aggregates_percentages():
    results = [
        Check(1, True, True, True, True, None),
        Check(1, True, False, True, True, None),
        Check(2, True, True, False, None, True),
        Check(2, True, True, True, None, False),
    ]
    got = score(results)
    assert (got["n_single"], got["n_pair"]) == (2, 2)
    assert (got["single_colour"], got["single_shape"], got["single_all"]) == (100.0, 50.0, 50.0)
    assert (got["pair_size"], got["pair_relation"], got["pair_full"]) == (50.0, 50.0, 50.0)
    assert "pair_full" not in score(results[:2])


def test_backgrounds_never_look_like_objects(samples):
    for s in samples[:60]:
        saturation = np.asarray(s.image.convert("HSV"))[..., 1]
        outside = np.ones(saturation.shape, bool)
        for o in s.scene.objects:
            x0, y0, x1, y1 = o.bbox
            outside[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False
        assert saturation[outside].max() < 0.25 * 255


def test_place_labels_tag_each_object_with_where_it_is_drawn(samples):
    """The text encoder's layout objective: every byte of an object's words says where that object is, read
    here from the drawn boxes rather than from the relation."""
    named_words = set(COLOURS) | set(SHAPES) | set(SIZE_WORDS) | {"the"}
    for s in samples:
        labels = place_labels(s.text, s.scene)
        assert len(labels) == len(s.text)
        centres = [((o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2) for o in s.scene.objects]
        for obj, (x, y) in zip(s.scene.objects, centres, strict=True):
            start = s.text.find(f"{obj.colour} {obj.shape}")
            place = PLACES[labels[start]]
            assert set(labels[start : start + len(obj.colour) + 1 + len(obj.shape)]) == {PLACES.index(place)}
            if len(centres) == 1:
                assert place == obj.position, s.text
                continue
            (ox, oy) = next(c for c in centres if c != (x, y))
            expected = {"left": x < ox, "right": x > ox, "top": y < oy, "bottom": y > oy}
            assert expected[place], (s.text, place, centres)
            if f"the {obj.colour} one" in s.text:  # the relation clause names the object again
                assert labels[s.text.index(f"the {obj.colour} one")] == PLACES.index(place)
        tagged = {w.strip(",") for w, n in zip(s.text.split(" "), _word_labels(s.text, labels), strict=True) if n}
        assert tagged <= named_words, (s.text, tagged)
    assert place_labels("red circle", Scene((SceneObject("circle", "red", "small", "top"),))) == [3] * 10


def _word_labels(text, labels):
    words, start = [], 0
    for word in text.split(" "):
        words.append(max(labels[start : start + len(word)], default=0))
        start += len(word) + 1
    return words


def test_train_split_hides_held_out_combinations():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(600):
        scene = sample_scene(rng, "train")
        pairs = {(o.colour, o.shape) for o in scene.objects}
        assert not pairs & HELD_OUT_OBJECTS
        assert {o.shape for o in scene.objects} not in HELD_OUT_SHAPE_PAIRS or len(scene.objects) == 1
        seen |= pairs
    assert seen == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT_OBJECTS


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pairs_sets_the_share_of_two_object_scenes(split):
    def counts(pairs):
        rng = np.random.default_rng(4)
        return [len(sample_scene(rng, split, pairs).objects) for _ in range(400)]

    assert set(counts(0.0)) == {1} and set(counts(1.0)) == {2}
    assert counts(0.75).count(2) > counts(0.5).count(2) + 40  # a pair-heavy set for training on pairs
    rng = np.random.default_rng(4)
    assert counts(0.5) == [len(sample_scene(rng, split).objects) for _ in range(400)]  # 0.5 is the default


def test_held_out_prompts_use_only_held_out_combinations():
    prompts = held_out_prompts(50, seed=1)
    assert [p.text for p in prompts] == [p.text for p in held_out_prompts(50, seed=1)]
    assert {len(p.scene.objects) for p in prompts} == {1, 2}
    for p in prompts:
        objects = p.scene.objects
        novel_object = any((o.colour, o.shape) in HELD_OUT_OBJECTS for o in objects)
        novel_pair = len(objects) == 2 and {o.shape for o in objects} in HELD_OUT_SHAPE_PAIRS
        assert novel_object or novel_pair, p
        for o in objects:
            assert o.colour in p.text and o.shape in p.text, p
        assert sum(p.text.split().count(w) for w in SIZE_WORDS) == len(objects), p.text


def test_dataset_is_deterministic_imagefolder(tmp_path):
    a = write_dataset(tmp_path / "a", 12, seed=5, sizes=SIZES, progress=False)
    b = write_dataset(tmp_path / "b", 12, seed=5, sizes=SIZES, progress=False)
    c = write_dataset(tmp_path / "c", 12, seed=6, sizes=SIZES, progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 13
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert (a / "metadata.jsonl").read_text() != (c / "metadata.jsonl").read_text()

    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        with Image.open(a / row["file_name"]) as image:
            assert image.size == (row["width"], row["height"]) and image.size in SIZES
        first = row["objects"][0]
        assert row["label"] == f"{first['colour']} {first['shape']}"
        assert all(o["colour"] in row["text"] and o["shape"] in row["text"] for o in row["objects"])
        assert Scene.from_dict(row).objects[0].bbox == tuple(first["bbox"])


def test_position_dropout_leaves_where_out_of_some_captions_and_nothing_else(tmp_path):
    placed = write_dataset(tmp_path / "placed", 40, seed=5, pairs=0.75, progress=False)
    unplaced = write_dataset(tmp_path / "unplaced", 40, seed=5, pairs=0.75, position_dropout=0.5, progress=False)
    rows = [json.loads(line) for line in (placed / "metadata.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (unplaced / "metadata.jsonl").read_text().splitlines()]
    where = [w for words in (*POSITION_WORDS.values(), *RELATION_WORDS.values()) for w in words]
    kept = 0
    for row, other in zip(rows, dropped, strict=True):
        assert (placed / row["file_name"]).read_bytes() == (unplaced / other["file_name"]).read_bytes()
        caption_free = ("text", "position_in_text")
        assert {k: v for k, v in other.items() if k not in caption_free} == {
            k: v for k, v in row.items() if k not in caption_free
        }
        assert row["position_in_text"]
        if other["position_in_text"]:
            kept += 1
            assert other["text"] == row["text"]
            continue
        text = other["text"]
        assert not any(re.search(rf"\b{w}\b", text) for w in where), text
        assert all(f"{o['colour']} {o['shape']}" in text for o in row["objects"]), text
        assert sum(text.split().count(w) for w in SIZE_WORDS) == (len(row["objects"]) if row["size_in_text"] else 0)
    assert 10 <= kept <= 30  # half of 40, give or take the draw


def test_dataset_loads_with_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = write_dataset(tmp_path / "data", 6, sizes=((64, 64),), progress=False)
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c"))
    assert len(ds) == 6
    assert ds[0]["image"].size == (64, 64) and ds[0]["text"] and ds[0]["label"]


def test_write_refuses_non_empty_folder_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(PixArtError, match="not empty"):
        write_dataset(out, 2, progress=False)
    write_dataset(out, 2, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "metadata.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # as mkdir() makes it, not mkdtemp's 0700


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: parse_sizes("64x64,100x64"), "100x64"),
        (lambda: parse_sizes("64by64"), "64by64"),
        (lambda: Scene((SceneObject("circle", "pink", "small", "left"),)), "pink"),
        (lambda: Scene((SceneObject("circle", "red", "small"), SceneObject("square", "red", "large")), "above"), "red"),
        (lambda: check(Image.new("RGB", (48, 64)), Scene((SceneObject("circle", "red", "small", "left"),))), "48x64"),
        (lambda: Scene.from_dict({"objects": [{"shape": "circle", "size": "small"}]}), "colour"),
        (
            lambda: Scene(
                (SceneObject("circle", "red", "small", "left"), SceneObject("cross", "blue", "small")), "above"
            ),
            "lone object",
        ),
        (lambda: write_dataset("/tmp/never", 0), "count 0"),
        (lambda: write_dataset("/tmp/never", 2, pairs=1.5), "pairs 1.5"),
        (lambda: write_dataset("/tmp/never", 2, pairs=-0.1), "pairs -0.1"),
        (lambda: write_dataset("/tmp/never", 2, position_dropout=2), "position dropout 2 must be a fraction"),
        (lambda: held_out_prompts(0), "0"),
    ],
)
def test_bad_input_names_the_value(call, message):
    with pytest.raises(PixArtError, match=message):
        call()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pixart", "shapes", *args], capture_output=True, text=True)


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "shapes"
    done = run_cli(str(out), "--count", "5", "--seed", "2", "--sizes", "64x64,128x96", "--split", "heldout")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all((out / r["file_name"]).is_file() and r["split"] == "heldout" for r in rows)


def test_cli_pairs_writes_two_object_scenes_only(tmp_path):
    out = tmp_path / "pairs"
    done = run_cli(str(out), "--count", "6", "--pairs", "1")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["objects"]) == 2 and r["relation"] for r in rows)


@pytest.mark.parametrize("args, value", [(("--count", "-1"), "-1"), (("--count", "3", "--pairs", "2"), "pairs 2")])
def test_cli_bad_input_is_one_line_error(tmp_path, args, value):
    done = run_cli(str(tmp_path / "x"), *args)
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and value in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
