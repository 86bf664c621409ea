"""Issue #22 item 7: each bad input ends as one line naming the value and what is accepted, before any denoising.

The CLI cases run real ``python -m pixart`` processes on the bundled demo model; the library cases call the
function where the input enters (GenerationOptions, parse_lora_spec, the pipeline).
"""

import importlib.util
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pixart as pixart_package
from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.lora import parse_lora_spec
from pixart.checkpoints.ours import save_pixart
from pixart.demo import BUNDLE
from pixart.errors import PixArtError
from pixart.inference.options import MAX_SEED, GenerationOptions
from pixart.model.config import preset
from pixart.model.transformer import PixArtTransformer


def generate(prompt: str | bytes, *args: str, out) -> subprocess.CompletedProcess:
    """`pixart generate` of one prompt on the demo model in 2 steps; later flags win over those defaults."""
    command = [sys.executable, "-m", "pixart", "generate", prompt, "--steps", "2", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error: …` line a refused command prints, after checking it exited 2 without denoising."""
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and "denoising" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("width", 0, "width 0 is not allowed: use a multiple of 8 from 8 to 8192"),
        ("height", 0, "height 0 is not allowed: use a multiple of 8 from 8 to 8192"),
        ("guidance", 1e30, "guidance must be a finite number from 0 to 50 (≤ 1 turns it off), got 1e+30"),
        ("guidance", 50.5, "guidance must be a finite number from 0 to 50 (≤ 1 turns it off), got 50.5"),
        ("max_tokens", 1_000_000, "max tokens must be from 1 to 1024, got 1000000"),
        ("steps", 1_000_000_000, "steps must be from 1 to 1000, got 1000000000"),
        ("negative_prompt", "\udcff", "negative prompt '\\udcff' is not valid UTF-8"),
    ],
)
def test_options_refuse_out_of_range_values(field, value, message):
    with pytest.raises(PixArtError) as err:
        GenerationOptions(**{field: value})
    assert str(err.value).startswith(message)


def test_options_keep_the_edges_of_their_ranges():
    options = GenerationOptions(width=8, height=8192, guidance=50, max_tokens=1024, steps=1000, seed=MAX_SEED)
    assert (options.width, options.guidance, options.max_tokens, options.steps) == (8, 50, 1024, 1000)


@pytest.mark.parametrize("scale", ["1e30", "-11", "inf", "nan"])
def test_lora_scale_out_of_bounds_is_refused_when_parsed(scale):
    with pytest.raises(PixArtError, match=r"LoRA scale .* is invalid; expected a number from -10 to 10"):
        parse_lora_spec(f"style.safetensors:{scale}")


def test_lora_scale_within_bounds_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("c:/loras").mkdir(parents=True)
    for path in ("style.safetensors", "c:/loras/style.safetensors"):
        Path(path).write_bytes(b"")
    assert parse_lora_spec("style.safetensors:-10") == ("style.safetensors", -10.0)
    assert parse_lora_spec("c:/loras/style.safetensors") == ("c:/loras/style.safetensors", 1.0)


@pytest.mark.parametrize(
    "args, line",
    [
        (["--width", "0"], "error: width 0 is not allowed: use a multiple of 8 from 8 to 8192"),
        (["--guidance", "1e30"], "error: guidance must be a finite number from 0 to 50 (≤ 1 turns it off), got 1e+30"),
        (["--lora", "x.safetensors:1e30"], "error: LoRA scale 1e+30 is invalid; expected a number from -10 to 10"),
        (["--max-tokens", "1000000"], "error: max tokens must be from 1 to 1024, got 1000000"),
        (["--steps", "1000000000"], "error: steps must be from 1 to 1000, got 1000000000"),
        (
            ["--seed", str(MAX_SEED), "--num-images", "2"],
            f"error: seed {MAX_SEED} is too large for 2 images (image k uses seed + k); "
            f"use a seed from 0 to {MAX_SEED - 1}",
        ),
    ],
)
def test_generate_refuses_bad_values_in_one_line(tmp_path, args, line):
    result = generate("a red circle", *args, out=tmp_path / "out")
    assert one_error_line(result).startswith(line)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_generate_refuses_a_prompt_that_is_not_utf8(tmp_path):
    result = generate(b"\xff\xfe a circle", out=tmp_path / "out")
    assert one_error_line(result).startswith("error: prompt '\\udcff\\udcfe a circle' is not valid UTF-8")


def test_generate_refuses_an_out_folder_under_a_file_before_loading(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = generate("a red circle", out=tmp_path / "afile" / "out")
    line = one_error_line(result)
    assert line.startswith(f"error: --out={str(tmp_path / 'afile' / 'out')!r} is not a folder this process can write")
    assert "loading" not in result.stderr.decode()


def pixart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixart", *args], capture_output=True, timeout=300)


def test_eval_save_onto_an_existing_file_is_refused_before_generating(tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = pixart("eval", "--prompts", "1", "--steps", "2", "--save", str(tmp_path / "taken"))
    line = one_error_line(result)
    assert line.startswith(f"error: --save={str(tmp_path / 'taken')!r} is not a folder this process can write")
    assert "generating" not in result.stderr.decode()
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_a_missing_lora_is_refused_before_loading(tmp_path, command):
    """generate and eval (which have the demo model to load) and export refuse a --lora that is neither a file, a
    folder nor a bundled name before any model loads, in one line."""
    missing = str(tmp_path / "nope.safetensors")
    args = {"generate": ["generate", "a red circle", "--steps", "2", "--out", str(tmp_path / "out")],
            "eval": ["eval", "--prompts", "1", "--steps", "2"],
            "export": ["export", "diffusers", str(tmp_path / "export"), "--base", str(BUNDLE),
                       "--transformer", str(BUNDLE / "transformer")]}[command]  # fmt: skip
    result = pixart(*args, "--lora", f"{missing}:0.5")
    line = one_error_line(result)
    assert line.startswith(f"error: LoRA {missing!r} does not exist; expected a peft adapter folder")
    assert "loading" not in result.stderr.decode()
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("to, name", [("official", "taken.pth"), ("pixart", "taken.safetensors")])
def test_convert_overwrite_onto_a_folder_is_refused_and_keeps_it(tmp_path, to, name):
    demo = Path(pixart_package.__file__).parent / "assets" / "demo" / "transformer"
    (tmp_path / name).mkdir()
    (tmp_path / name / "kept.txt").write_text("mine")
    result = pixart("convert", str(demo), str(tmp_path / name), "--to", to, "--overwrite")
    line = one_error_line(result)
    assert line == f"error: output {tmp_path / name} is a folder; --to {to} writes one file, so give a new file name"
    assert (tmp_path / name / "kept.txt").read_text() == "mine"


def test_random_bytes_pth_is_called_unreadable_not_code(tmp_path):
    (tmp_path / "noise.pth").write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(PixArtError) as err:
        load_transformer(tmp_path / "noise.pth")
    assert str(err.value) == f"cannot read {tmp_path / 'noise.pth'}: not a PyTorch checkpoint, or truncated/corrupt"


class OpensAFile:
    """Unpickling this calls open(marker, 'w'): the file appears if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("part, weights", [("vae", "diffusion_pytorch_model"), ("text_encoder", "model")])
def test_a_pickled_bin_in_a_model_folder_is_refused_in_one_line(tmp_path, part, weights):
    model = tmp_path / "model"
    shutil.copytree(Path(pixart_package.__file__).parent / "assets" / "demo", model)
    (model / part / f"{weights}.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save(
        {"weight": OpensAFile(marker)},
        model / part / ("pytorch_model.bin" if part == "text_encoder" else f"{weights}.bin"),
    )
    result = generate("a red circle", "--model", str(model), out=tmp_path / "out")
    line = one_error_line(result)
    assert f"no file named {weights}.safetensors" in line
    assert not marker.exists()


@pytest.mark.parametrize("chunk", ["zTXt", "iTXt"])
def test_from_png_with_a_text_bomb_is_refused_in_one_line(tmp_path, chunk):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    text = "a red circle " * 1_600_000  # 20 MB, compressed to ~20 kB
    if chunk == "zTXt":
        info.add_text("prompt", text, zip=True)
    else:
        info.add_itxt("prompt", text, zip=True)
    info.add_text("seed", "1")
    Image.new("RGB", (8, 8)).save(tmp_path / "bomb.png", pnginfo=info)
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    result = pixart("generate", "--from-png", str(tmp_path / "bomb.png"), "--out", str(tmp_path / "out"))
    line = one_error_line(result)
    assert line.startswith(f"error: cannot read {tmp_path / 'bomb.png'} as an image: Decompressed data too large")


def pixart_with_file_size_limit(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`pixart …` in a process that may not write a file beyond ``limit`` bytes: a full disk without root."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG, not kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "pixart", *args]
    return subprocess.run(command, capture_output=True, timeout=300, preexec_fn=limit_file_size)


DEMO = Path(pixart_package.__file__).parent / "assets" / "demo"


@pytest.mark.parametrize(
    "limit, args, written",
    [
        (1000, ["generate", "a red circle", "--steps", "2", "--out", "OUT"], "an image in OUT"),
        (100_000, ["convert", str(DEMO / "transformer"), "OUT/t.pth", "--to", "official"], "the official checkpoint"),
        (100_000, ["convert", str(DEMO / "transformer"), "OUT/t.safetensors", "--to", "pixart"], "the pixart"),
        (100_000, ["convert", str(DEMO / "transformer"), "OUT/t", "--to", "diffusers"], "the diffusers checkpoint t"),
        (1000, ["shapes", "OUT/shapes", "--count", "3"], "the shapes data set shapes"),
        (
            100_000,
            ["export", "diffusers", "OUT/pipe", "--transformer", str(DEMO / "transformer"), "--base", str(DEMO)],
            "the pipeline pipe",
        ),
        pytest.param(
            100_000,
            ["export", "openvino", "OUT/ov"],
            "the OpenVINO export ov",
            marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino"),
        ),
    ],
)
def test_a_full_disk_while_writing_is_one_line(tmp_path, limit, args, written):
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("OUT", str(out)) for a in args]
    result = pixart_with_file_size_limit(limit, *args)
    line = one_error_line_after_work(result)
    assert line.startswith(f"error: file size limit hit while writing {written.replace('OUT', str(out))}")
    assert line.endswith("free); free some space and run again")
    assert list(out.iterdir()) == []  # no half-written output, no temporary file or folder


def test_a_failed_diffusers_convert_leaves_no_half_written_folder(tmp_path):
    # The null-caption sidecar (4096 × 32 floats, 524 kB) is written after the weights (332 kB): a 400 kB file
    # size limit lets the weights through and stops the sidecar, so writing file by file would leave a folder
    # of weights without their config.
    source = tmp_path / "long-captions.safetensors"
    save_pixart(PixArtTransformer(preset("debug-alpha").replace(depth=1, model_max_length=4096)), source)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "kept.txt").write_text("the folder --overwrite would replace")
    for dest in (tmp_path / "new", tmp_path / "t"):
        args = ["convert", str(source), str(dest), "--to", "diffusers", "--overwrite"]
        result = pixart_with_file_size_limit(400_000, *args)
        assert one_error_line_after_work(result).startswith("error: file size limit hit while writing the diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long-captions.safetensors", "t"]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["kept.txt"]


def one_error_line_after_work(result: subprocess.CompletedProcess) -> str:
    """The one `error: …` line of a command that failed while writing (so its progress bars ran)."""
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs, really full when written past; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_while_saving_images_is_one_line(tiny_disk):
    (tiny_disk / "ballast").write_bytes(b"\0" * 1_040_000)  # leave a few kB: less than one PNG
    result = pixart(
        "generate", "a red circle", "--steps", "2", "--width", "256", "--height", "256", "--allow-any-size",
        "--out", str(tiny_disk),
    )  # fmt: skip
    line = one_error_line_after_work(result)
    assert line.startswith(f"error: disk full while writing an image in {tiny_disk} (")
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["ballast"]  # no half-written PNG or temporary file


def test_a_full_disk_while_caching_features_is_one_line(setup, tmp_path):
    _, pipe, images, _ = setup
    result = pixart_with_file_size_limit(
        1000, "cache", "--data", str(images), "--model", str(pipe), "--out", str(tmp_path / "cache")
    )
    line = one_error_line_after_work(result)
    assert line.startswith("error: file size limit hit while writing feature cache shard bucket-")
    assert f"in {tmp_path / 'cache'} (" in line


def test_a_transformer_for_another_text_width_is_refused_before_denoising(setup, tmp_path):
    _, pipe, _, _ = setup  # a tiny α pipeline with 32-wide T5 features; the demo transformer takes 128
    result = generate("a red circle", "--model", str(pipe), "--transformer", str(DEMO / "transformer"), out=tmp_path)
    assert one_error_line(result) == (
        f"error: the transformer {DEMO / 'transformer'} expects 128-wide text features but {str(pipe)!r} has a "
        "32-wide text encoder; use a transformer and a model of the same release"
    )
