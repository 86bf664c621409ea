"""Image inputs on `pixart serve`: a real server process with two ControlNets, real HTTP requests, `pixart generate`.

A request's image, mask and control image (base64 or data: URLs) give the PNG `pixart generate --image/--mask/
--control` gives, byte for byte; every bad input is a 400 of one line, and an image over the limits is turned
away before its pixels are decoded.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tests.tiny import save_pipeline

from pixart.checkpoints.controlnet import save_controlnet
from pixart.checkpoints.convert import load_transformer
from pixart.errors import PixArtError
from pixart.inference.control import control_map
from pixart.inference.pipeline import PixArtPipeline
from pixart.model.controlnet import PixArtControlNet
from pixart.serve.app import ImageService, ServeLimits
from pixart.serve.inputs import RequestImages, ServedControlNet
from test_controlnet import randomise
from test_img2img import half_mask, photo
from test_serve import CHROMIUM, browser_page, free_port, generate_on_page, png, post, upload_input_image, wait_for

pytestmark = pytest.mark.slow  # a real server and Chromium: -m "not slow" skips this file

MAX_PIXELS = 256 * 256
PIXART = [sys.executable, "-m", "pixart"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A tiny α pipeline, two one-block ControlNets for it, an input image, a mask and a control image."""
    root = tmp_path_factory.mktemp("serve-images")
    model = save_pipeline(root / "alpha", "alpha")
    base = load_transformer(model)
    nets = {}
    for seed in (1, 2):
        net = randomise(PixArtControlNet.from_transformer(base, num_blocks=1), seed=seed, std=0.2)
        nets[seed] = save_controlnet(net, root / f"cn{seed}.safetensors")
    photo(64, 48).save(root / "in.png")
    half_mask(64, 48).save(root / "mask.png")
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[12:36, 8:40] = (250, 200, 40)  # a rectangle: clean edges for Canny
    Image.fromarray(pixels).save(root / "control.png")
    return SimpleNamespace(root=root, model=model, nets=nets)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    """`pixart serve` with both ControlNets (named), started when the module begins."""
    port, out = free_port(), tmp_path_factory.mktemp("out")
    log_file = tmp_path_factory.mktemp("log") / "server.log"
    cmd = PIXART + ["serve", "--model", str(files.model), "--port", str(port), "--out", str(out)]
    cmd += ["--controlnet", f"edges={files.nets[1]}", "--controlnet", str(files.nets[2])]
    cmd += ["--max-pixels", str(MAX_PIXELS), "--rate-limit", "2000/min"]
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    launched = SimpleNamespace(url=f"http://127.0.0.1:{port}", proc=proc, out=out, log_file=log_file)
    yield wait_for(launched)
    proc.terminate()
    proc.wait(timeout=15)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def generate_cli(*args: str, out: Path) -> bytes:
    """The PNG `pixart generate` writes with these arguments, as bytes."""
    done = subprocess.run(PIXART + ["generate", *args, "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip()).read_bytes()


def test_info_says_which_image_inputs_the_server_takes(server):
    info = json.loads(urllib.request.urlopen(f"{server.url}/api/info", timeout=30).read())
    assert info["image_inputs"] == ["image", "mask", "control"]
    assert info["controlnets"] == ["edges", "cn2"] and info["control_types"] == ["none", "canny", "layout"]


def test_an_image_to_image_request_is_pixart_generate_image_byte_for_byte(server, files, tmp_path):
    settings = {"seed": 7, "steps": 4, "sampler": "euler", "strength": 0.5, "binning": False}
    status, body = post(
        f"{server.url}/api/generate", {"prompt": "a fox", "image": b64(files.root / "in.png")} | settings
    )
    assert status == 200, body
    served = base64.b64decode(body["images"][0]["png_base64"])
    image = png(body["images"][0]["png_base64"])
    assert image.size == (64, 48) and image.info["strength"] == "0.5" and len(image.info["image_sha256"]) == 64
    args = ["a fox", "--model", str(files.model), "--image", str(files.root / "in.png"), "--seed", "7"]
    args += ["--steps", "4", "--sampler", "euler", "--strength", "0.5", "--no-binning"]
    assert generate_cli(*args, out=tmp_path / "cli") == served
    # The server's PNG reproduces itself with --from-png when the input image is given again.
    (tmp_path / "served.png").write_bytes(served)
    again = ["--from-png", str(tmp_path / "served.png"), "--image", str(files.root / "in.png"), "--trust-metadata"]
    assert generate_cli(*again, out=tmp_path / "again") == served


def test_inpainting_with_no_blur_keeps_the_pixels_outside_the_mask(server, files):
    data_url = "data:image/png;base64," + b64(files.root / "mask.png")
    request = {"prompt": "a fox", "image": b64(files.root / "in.png"), "mask": data_url, "mask_blur": 0, "seed": 2}
    status, body = post(f"{server.url}/api/generate", request | {"steps": 3, "binning": False})
    assert status == 200, body
    out, source = np.asarray(png(body["images"][0]["png_base64"])), np.asarray(Image.open(files.root / "in.png"))
    assert np.array_equal(out[:, :32], source[:, :32])
    assert not np.array_equal(out[:, 32:], source[:, 32:])  # the repainted half did change
    assert body["images"][0]["metadata"]["mask_blur"] == "0" and "mask_sha256" in body["images"][0]["metadata"]


def test_a_controlled_request_is_pixart_generate_control_byte_for_byte(server, files, tmp_path):
    request = {"prompt": "a box", "control": b64(files.root / "control.png"), "controlnet": "cn2", "seed": 3}
    request |= {"steps": 2, "width": 64, "height": 48, "binning": False, "control_type": "canny", "control_scale": 0.7}
    status, body = post(f"{server.url}/api/generate", request)
    assert status == 200, body
    info = body["images"][0]["metadata"]
    assert info["controlnet"] == str(files.nets[2]) and info["control_type"] == "canny"
    args = ["a box", "--model", str(files.model), "--control", str(files.root / "control.png"), "--seed", "3"]
    args += ["--controlnet", str(files.nets[2]), "--control-type", "canny", "--control-scale", "0.7"]
    args += ["--steps", "2", "--width", "64", "--height", "48", "--no-binning"]
    assert generate_cli(*args, out=tmp_path / "cli") == base64.b64decode(body["images"][0]["png_base64"])


def png_claiming(width: int, height: int) -> str:
    """A base64 PNG whose header states width × height but which holds one row: small to send, huge to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    data = chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + header + data + chunk(b"IEND", b"")).decode("ascii")


def encoded(image: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_each_bad_image_input_is_a_400_of_one_line(server, files):
    image = b64(files.root / "in.png")
    truncated = base64.b64encode((files.root / "in.png").read_bytes()[:200]).decode("ascii")
    black = encoded(Image.new("L", (64, 48)))
    bad = [
        ({"image": "not base64!"}, "image is not valid base64"),
        ({"image": base64.b64encode(b"hello").decode()}, "image is not a PNG, JPEG or WEBP image"),
        ({"image": encoded(Image.new("RGB", (8, 8)), "GIF")}, "image is not a PNG, JPEG or WEBP image"),
        ({"image": truncated}, "image cannot be decoded"),
        ({"image": 3}, "image must be a base64 PNG or JPEG image"),
        ({"image": "data:image/png," + image}, "data: URL without base64"),
        ({"image": image, "mask": black}, "the mask has no white pixel"),
        ({"mask": image}, "a mask needs the image it repaints"),
        ({"image": png_claiming(300, 300)}, f"300 × 300 = 90000 pixels; this server takes at most {MAX_PIXELS}"),
        ({"image": image, "strength": 1.5}, "strength must be a number above 0 and at most 1"),
        ({"strength": 0.5}, "strength given without an input image"),
        ({"image": image, "mask_blur": 4}, "mask blur applies to inpainting only"),
        ({"control": image}, "no controlnet named; this server has: edges, cn2"),
        ({"control": image, "controlnet": "depth"}, "unknown controlnet 'depth'; this server has: edges, cn2"),
        ({"controlnet": "edges"}, "controlnet needs a control image"),
        ({"control_type": "canny"}, "control_type apply to a control image"),
        ({"control": image, "controlnet": "edges", "control_type": "hed"}, "control type"),
    ]
    for fields, message in bad:
        status, body = post(f"{server.url}/api/generate", {"prompt": "a fox", "steps": 1, **fields})
        assert status == 400 and message in body["error"], (fields, status, body)
        assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert server.proc.poll() is None


@pytest.mark.parametrize("side", [20_000, 5_000], ids=["beyond PIL's bomb limit", "beyond the server's"])
def test_an_image_whose_header_claims_too_many_pixels_is_refused_before_decoding(server, side):
    started = time.monotonic()
    status, body = post(f"{server.url}/api/generate", {"prompt": "a fox", "image": png_claiming(side, side)})
    assert status == 400 and "\n" not in body["error"], body
    assert "too large" in body["error"] or f"at most {MAX_PIXELS}" in body["error"], body
    assert time.monotonic() - started < 5  # decoding 25 or 400 million pixels would take far longer


def test_an_image_over_the_body_limit_is_413_before_it_is_read(server):
    port = int(server.url.rsplit(":", 1)[1])
    start = b'{"prompt": "a fox", "image": "' + b"A" * 4096  # the rest would follow, but the answer comes first
    head = f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{head}Content-Length: {ServeLimits().max_body + 1}\r\n\r\n".encode() + start)
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert time.monotonic() - started < 5


def test_the_default_body_limit_fits_a_1024_px_image_and_mask_as_incompressible_pngs():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 256, (1024, 1024), dtype=np.uint8))
    body = json.dumps({"prompt": "x" * 1000, "image": encoded(image), "mask": encoded(mask), "seed": 1})
    assert len(body.encode()) <= ServeLimits().max_body


def test_the_work_estimate_counts_fewer_steps_from_an_image_and_a_controlnets_blocks(files):
    pipe = PixArtPipeline.from_pretrained(files.model, device="cpu")
    net = ServedControlNet.load("cn2", str(files.nets[2]), pipe.model_config, pipe.device, pipe.dtype)
    # Room for 64 × 48 pixels × 10 steps: 20 steps of text-to-image are too many, from an image at 0.5 they fit.
    service = ImageService(pipe, ServeLimits(max_work=64 * 48 * 10), files.root / "out", controlnets=(net,))
    image = Image.open(files.root / "in.png")
    settings = {"steps": 20, "width": 64, "height": 48, "binning": False}
    with pytest.raises(PixArtError, match="^3072 pixels × 20 steps × 1 images is 61440 pixel-steps"):
        service.options("a fox", **settings)
    assert service.options("a fox", RequestImages(image=image), strength=0.5, **settings).strength == 0.5
    with pytest.raises(PixArtError, match="^3072 pixels × 11 steps × 1 images is 33792 pixel-steps"):
        service.options("a fox", RequestImages(image=image), strength=0.55, **settings)
    # The ControlNet copies one block of the two-block model: each step costs 3/2 of a plain one.
    control = RequestImages(control=image, controlnet=net)
    assert service.options("a fox", control, **(settings | {"steps": 6})).steps == 6
    with pytest.raises(PixArtError, match=r"^3072 pixels × 7 steps × 1 images × 3/2 blocks \(ControlNet\) is 32256"):
        service.options("a fox", control, **(settings | {"steps": 7}))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium: apt-get install chromium")
def test_the_page_previews_the_control_map_and_inpaints_where_the_brush_painted(server, files, tmp_path):
    from playwright.sync_api import expect

    with browser_page(server, tmp_path) as page:
        page.get_by_text("Control image (ControlNet)").click()
        with page.expect_file_chooser() as chooser:
            page.locator("#control-image").click()
        chooser.value.set_files(files.root / "control.png")
        preview = page.locator("#control-map img")
        expect(preview).to_be_visible(timeout=30_000)
        shown = np.asarray(Image.open(io.BytesIO(page.request.get(preview.get_attribute("src")).body())).convert("RGB"))
        edges = np.asarray(control_map(Image.open(files.root / "control.png"), "canny", 64, 48))
        assert np.array_equal(shown, edges)  # the page's default map is canny: what the ControlNet would see

        upload_input_image(page, files.root / "in.png")
        page.locator("#input-image").get_by_label("Brush", exact=True).click()
        box = page.locator("#input-image canvas").first.bounding_box()
        for row in np.linspace(0.05, 0.95, 12):  # strokes over the right third
            page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * row)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.98, box["y"] + box["height"] * row, steps=5)
            page.mouse.up()
        # This server's sizes (≤ 256² px) are custom ones: the input's own, sampled as it is.
        page.get_by_role("spinbutton", name="Width").fill("64")
        page.get_by_role("spinbutton", name="Height").fill("48")
        page.get_by_text("Advanced options").click()
        page.get_by_label("Sample at the nearest trained aspect ratio, then resize").uncheck()
        saved = generate_on_page(page, "a fox", tmp_path)
    assert saved.size == (64, 48) and "mask_sha256" in saved.info and saved.info["strength"] == "1.0"
    assert saved.info["controlnet"] == str(files.nets[1]) and saved.info["control_type"] == "canny"  # steered too
    out, source = np.asarray(saved), np.asarray(Image.open(files.root / "in.png"))
    # The brush's default width (a share of the image) reaches about a third in from the strokes' start: the left
    # eighth, far from the paint and its 4 px feather, is the input's pixel for pixel.
    assert np.array_equal(out[:, :8], source[:, :8])
    assert not np.array_equal(out[:, 48:], source[:, 48:])  # painted: repainted
