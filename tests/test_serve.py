"""`pixart serve`: a real server process on a free port, real HTTP requests, Gradio's client and a headless Chromium.

The first two tests run in this process (the service's queue, the CLI's flag errors) while the server loads.

The model is the tiny pipeline of tests/tiny.py, given a 256-px bin table so the page's default size
(the square bin, 256 × 256) generates in a fraction of a second on a CPU.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from tests.tiny import random_lora, save_pipeline

from pixart.cli import main
from pixart.inference.pipeline import PixArtPipeline
from pixart.serve.app import ImageService, ServeLimits, ServerBusy

CHROMIUM = Path("/usr/bin/chromium")
MAX_PROMPT_CHARS = 100
MAX_IMAGES = 2
MAX_QUEUE = 8
MAX_BODY = 100_000
BODY_TIMEOUT = 2
TOKEN = "tok-" + "7" * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = save_pipeline(tmp_path_factory.mktemp("serve") / "tiny", "sigma")
    config_file = path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    # Shaped like a 256-px release: its bins are ~256 × 256 instead of 1024 × 1024 (seconds per image on a
    # CPU). No weight depends on sample_size; the position embedding is recomputed from it.
    config.update(sample_size=32, interpolation_scale=1)
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory) -> dict[str, Path]:
    """Two LoRAs the server loads: one named on the command line, one named by its folder."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "style": random_lora(model / "transformer", root / "style-lora", seed=1),
        "detail": random_lora(model / "transformer", root / "detail", seed=2),
    }


@pytest.fixture(scope="module", autouse=True)
def launched(model, loras, tmp_path_factory):
    """The server process, started when the module begins so it loads while the in-process tests run."""
    port, out = free_port(), tmp_path_factory.mktemp("out")
    log_file = tmp_path_factory.mktemp("log") / "server.log"
    cmd = [sys.executable, "-m", "pixart", "serve", "--model", str(model), "--port", str(port), "--out", str(out)]
    cmd += ["--max-images", str(MAX_IMAGES), "--max-prompt-chars", str(MAX_PROMPT_CHARS), "--concurrency", "2"]
    # 2 running + 8 waiting: the ten concurrent requests below all fit, the hundred of the load test do not.
    cmd += ["--max-queue", str(MAX_QUEUE), "--rate-limit", "2000/min", "--max-body", str(MAX_BODY)]
    cmd += ["--body-timeout", str(BODY_TIMEOUT)]
    cmd += ["--lora", f"style={loras['style']}:0.8", "--lora", str(loras["detail"])]
    # One thread per generation: tiny models gain nothing from more, and a busy CPU makes OpenMP spin.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", out=out, proc=proc, log_file=log_file)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(launched):
    """The launched server once it answers HTTP."""
    return wait_for(launched)


def wait_for(launched, seconds: float = 120):
    """``launched`` (url, proc, log_file) once its server answers HTTP; the test fails with its log if it exits."""
    deadline = time.monotonic() + seconds
    while True:
        if launched.proc.poll() is not None:
            pytest.fail(f"the server exited with {launched.proc.returncode}:\n{launched.log_file.read_text()}")
        try:
            urllib.request.urlopen(f"{launched.url}/api/info", timeout=5).read()
            return launched
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {seconds:g} s:\n{launched.log_file.read_text()}")
            time.sleep(0.5)


def post(url: str, body: bytes | dict, timeout: float = 60, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"} | (headers or {})
    request = urllib.request.Request(url, data, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_a_full_queue_is_refused_as_busy_and_the_running_requests_finish(model, tmp_path):
    service = ImageService(PixArtPipeline.from_pretrained(model, device="cpu"), ServeLimits(max_queue=1), tmp_path)
    options = service.options("a cat", steps=2, width=32, height=32, binning=False)
    started, release = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:  # the first generation keeps the only slot until released
        started.set()
        release.wait(60)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(service.generate, "first", options, hold)
        assert started.wait(60)
        second = pool.submit(service.generate, "second", options)
        deadline = time.monotonic() + 60
        while service.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ServerBusy, match="busy"):
            service.generate("third", options)
        release.set()
        assert [info["prompt"] for _, info in first.result(60) + second.result(60)] == ["first", "second"]
    assert service.waiting == 0


def test_bad_flags_are_one_line_errors_before_serving(tmp_path, capsys, model, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cases = [
            (["--model", str(tmp_path / "missing"), "--port", str(free_port())], "missing"),
            (["--model", str(model), "--port", "70000"], "--port 70000"),
            (["--model", str(model), "--port", str(taken.getsockname()[1])], "cannot listen"),
            # 192.0.2.1 is not this machine's: nothing is ever served there, whatever the checks say.
            (["--model", str(model), "--host", "192.0.2.1", "--no-auth"], "cannot listen on 192.0.2.1"),
            (["--model", str(model), "--max-images", "0"], "--max-images must be a positive integer"),
            (["--model", str(model), "--rate-limit", "fast"], "--rate-limit 'fast' is not a rate"),
            (["--model", str(model), "--allowed-host", ""], "--allowed-host needs a name"),
            # A host other machines can reach needs a token or an explicit --no-auth, checked before binding.
            (["--model", str(model), "--host", "192.0.2.1"], "--host 192.0.2.1 lets other machines in"),
            (["--model", str(model), "--host", "192.0.2.1", "--auth-token-file", str(tmp_path / "none")], "none"),
            (["--model", str(model), "--auth-token", "short-secret"], "at least 16 characters"),
            (["--model", str(model), "--auth-token", TOKEN, "--no-auth"], "--no-auth contradicts"),
            (["--model", str(model), "--auth-token", TOKEN, "--auth-token-file", "t"], "give the token once"),
            (["--model", str(model), "--lora", str(tmp_path / "none")], f"LoRA '{tmp_path / 'none'}' does not exist"),
            (["--model", str(model), "--lora", f"a={model}", "--lora", f"a={model}:2"], "the name 'a' is taken"),
            (["--model", str(model), "--lora", str(model), "--low-memory"], "drop --low-memory"),
            (["--model", str(model), "--controlnet", str(tmp_path / "cn.pth")], f"{tmp_path / 'cn.pth'} does not"),
            (["--model", str(model), "--controlnet", f"a={model}", "--controlnet", f"a={model}"], "'a' is taken"),
        ]
        for flags, message in cases:
            assert main(["serve", *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and message in err and "\n" not in err, (flags, err)
            assert "short-secret" not in err and TOKEN not in err  # a token is never echoed
        monkeypatch.setenv("PIXART_AUTH_TOKEN", "short-secret")  # checked like the flags' token
        assert main(["serve", "--model", str(model), "--host", "192.0.2.1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "PIXART_AUTH_TOKEN must be at least 16 characters" in err and "short-secret" not in err, err
    finally:
        taken.close()


def test_api_returns_the_saved_pngs_with_their_metadata(server):
    request = {"prompt": "a red fox", "seed": 5, "steps": 2, "sampler": "ddim", "guidance": 3.0}
    status, body = post(f"{server.url}/api/generate", request | {"width": 64, "height": 48, "num_images": 2})
    assert status == 200, body
    assert [image["seed"] for image in body["images"]] == [5, 6]
    saved = {p.read_bytes() for p in server.out.glob("*.png")}
    for k, item in enumerate(body["images"]):
        image = png(item["png_base64"])
        assert image.format == "PNG" and image.size == (64, 48)
        assert image.info["prompt"] == "a red fox" and image.info["seed"] == str(5 + k)
        assert (image.info["sampler"], image.info["steps"], image.info["guidance"]) == ("ddim", "2", "3.0")
        assert item["metadata"] == {k: v for k, v in image.info.items() if isinstance(v, str)}
        assert base64.b64decode(item["png_base64"]) in saved  # the very file kept in --out


def test_ten_concurrent_api_requests_all_succeed(server):
    def one(seed: int) -> tuple[int, dict]:
        request = {"prompt": f"a cube number {seed}", "seed": seed, "steps": 1, "width": 32, "height": 32}
        return post(f"{server.url}/api/generate", request | {"binning": False}, timeout=120)

    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(100, 110), timeout=150))
    assert [status for status, _ in results] == [200] * 10, [body for _, body in results]
    for seed, (_, body) in zip(range(100, 110), results, strict=True):
        (image,) = body["images"]
        assert png(image["png_base64"]).info["prompt"] == f"a cube number {seed}"
    assert time.monotonic() - started < 150


BAD_REQUESTS = [
    ({"prompt": ""}, "enter a prompt"),
    ({"prompt": "   "}, "enter a prompt"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, f"at most {MAX_PROMPT_CHARS}"),
    ({"prompt": "a cat", "negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, f"at most {MAX_PROMPT_CHARS}"),
    ({"prompt": "a cat", "width": 7}, "width 7"),
    ({"prompt": "a cat", "steps": 0}, "steps must be a positive integer"),
    ({"prompt": "a cat", "num_images": MAX_IMAGES + 1}, f"at most {MAX_IMAGES} per request"),
    ({"prompt": "a cat", "steps": 101}, "at most 100"),
    ({"prompt": "a cat", "width": 4096, "height": 4096}, "pixels"),
    ({"prompt": "a cat", "sampler": "magic"}, "unknown sampler 'magic'"),
    ({"prompt": "a cat", "seed": "seven"}, "seed must be an integer"),
    ({"prompt": "a cat", "colour": "red"}, "unknown field(s) colour"),
    ({"prompt": "a cat", "binning": "yes"}, "binning must be true or false"),
    ({"prompt": "a cat", "control": "iVBORw0KGgo="}, "this server has no ControlNet to steer by a control image"),
    ({"prompt": 3}, "enter a prompt"),
    (["a cat"], "JSON object"),
    (b"not json", "must be JSON"),
    # Malformed in every way a parser or a type check can trip on: each a 400 naming the problem, never a 500.
    (b'{"prompt": "\\ud800 a cat"}', "lone surrogate"),
    (b'{"prompt": "a cat", "negative_prompt": "\\udfff"}', "lone surrogate"),
    (b"[" * 100_000, "must be JSON"),
    (b'{"p": ' * 15_000, "must be JSON"),
    (b'{"prompt": "a cat", "guidance": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "a cat", "steps": Infinity}', "Infinity is not a JSON number"),
    (b'{"prompt": "a \xff cat"}', "must be JSON"),
    ({"prompt": "a cat", "sampler": ["ddim"]}, "sampler must be the name of a sampler"),
    ({"prompt": "a cat", "sampler": {"name": "ddim"}}, "sampler must be the name of a sampler"),
    ({"prompt": "a cat", "steps": "20"}, "steps must be a positive integer, got '20'"),
    ({"prompt": "a cat", "width": "64", "height": 64}, "width must be an integer, got '64'"),
    ({"prompt": "a cat", "guidance": "4.5"}, "guidance must be a finite number"),
    ({"prompt": "a cat", "guidance": 1e30}, "guidance must be a finite number from 0 to 50"),  # a black image
    ({"prompt": "a cat", "num_images": 1.5}, "num images must be a positive integer"),
    ({"prompt": "a cat", "seed": [1]}, "seed must be an integer"),
    ({"prompt": ["a cat"]}, "enter a prompt"),
]


def test_bad_api_requests_are_400_with_a_message_and_the_server_keeps_serving(server):
    for request, message in BAD_REQUESTS:
        status, body = post(f"{server.url}/api/generate", request)
        assert status == 400 and message in body["error"], (request, status, body)
        assert "\n" not in body["error"] and "Traceback" not in body["error"]
    status, body = post(f"{server.url}/api/generate", {"prompt": "still here", "steps": 1, "width": 32, "height": 32})
    assert status == 200 and png(body["images"][0]["png_base64"]).info["prompt"] == "still here"
    assert server.proc.poll() is None


def test_gradio_named_endpoint_serves_the_png_files(server, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server.url, verbose=False, download_files=str(tmp_path))
    # prompt, negative, size, width, height, images, sampler, steps, guidance, seed, randomize, binning
    gallery, seed = client.predict(
        "a blue bird", "", "custom", 64, 64, 1, "euler", 2, 4.5, 11, False, False, api_name="/generate"
    )
    assert seed == 11
    image = Image.open(gallery[0]["image"])
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert (image.info["prompt"], image.info["seed"], image.info["sampler"]) == ("a blue bird", "11", "euler")
    with pytest.raises(AppError, match="width 7"):
        client.predict("a bird", "", "custom", 7, 64, 1, "euler", 2, 4.5, 11, False, False, api_name="/generate")
    with pytest.raises(AppError, match="enter a prompt"):
        client.predict("", "", "custom", 64, 64, 1, "euler", 2, 4.5, 11, False, False, api_name="/generate")


@contextlib.contextmanager
def browser_page(server, tmp_path):
    """A headless Chromium page on the server; every request leaving 127.0.0.1 is refused (the page works offline)."""
    from playwright.sync_api import sync_playwright

    outside = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tempfile.mkdtemp(dir=tmp_path),
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
            + ["--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = context.new_page()
            page.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(server.url)
                    else (outside.append(route.request.url), route.abort())
                ),
            )
            page.goto(server.url, timeout=60_000)
            yield page
        finally:
            context.close()
    assert outside == []


def upload_input_image(page, path) -> None:
    """Open "Start from an image" and upload `path` into its editor, as a user would."""
    from playwright.sync_api import expect

    page.get_by_text("Start from an image").click()
    # The editor's canvas appears once its drawing library has started; an upload before that is dropped, and on
    # a loaded machine the file chooser can open first.
    expect(page.locator("#input-image canvas").first).to_be_attached(timeout=30_000)
    with page.expect_file_chooser() as chooser:
        page.locator("#input-image").get_by_text("Upload an image").click()
    chooser.value.set_files(path)
    expect(page.locator("#input-image").get_by_text("Upload an image")).to_be_hidden(timeout=30_000)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium: apt-get install chromium")
def test_browser_generates_an_image_and_shows_errors(server, tmp_path):
    from playwright.sync_api import expect

    with browser_page(server, tmp_path) as page:
        page.locator("#prompt textarea").fill("a lighthouse at night")
        page.locator("#generate").click()
        image = page.locator("#gallery img").first
        expect(image).to_be_visible(timeout=90_000)
        page.screenshot(path=tmp_path / "page.png", full_page=True)
        downloaded = page.request.get(image.get_attribute("src")).body()
        saved = Image.open(io.BytesIO(downloaded))
        assert saved.info["prompt"] == "a lighthouse at night" and saved.size == (256, 256)

        page.locator("#prompt textarea").fill("")
        page.locator("#generate").click()
        expect(page.get_by_text("enter a prompt")).to_be_visible(timeout=30_000)


def generate_on_page(page, prompt: str, tmp_path) -> Image.Image:
    """The first image the page's Generate gives for this prompt, as the PNG the gallery serves."""
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate").click()
    image = page.locator("#gallery img").first
    expect(image).to_be_visible(timeout=90_000)
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    return Image.open(io.BytesIO(page.request.get(image.get_attribute("src")).body()))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium: apt-get install chromium")
def test_browser_uploads_an_image_and_gets_image_to_image_back(server, tmp_path):
    from pixart.inference.image_inputs import pixel_sha256
    from test_img2img import photo

    source = photo(96, 64)
    source.save(tmp_path / "in.png")
    with browser_page(server, tmp_path) as page:
        upload_input_image(page, tmp_path / "in.png")
        saved = generate_on_page(page, "a lighthouse at night", tmp_path)
    # The uploaded pixels reached the model unchanged, resized to the page's size; image-to-image's default strength.
    assert saved.info["image_sha256"] == pixel_sha256(source.convert("RGB"))
    assert (saved.size, saved.info["strength"], saved.info["prompt"]) == ((256, 256), "0.6", "a lighthouse at night")
    assert "mask_sha256" not in saved.info


def request(server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request over http.client, which sends exactly the headers given (urllib adds its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=60)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


GENERATE = json.dumps({"prompt": "a cat", "steps": 1, "width": 32, "height": 32, "binning": False}).encode()


def test_requests_from_other_sites_and_other_host_names_are_refused(server):
    host = server.url.removeprefix("http://")
    port = host.rsplit(":", 1)[1]
    json_type = {"content-type": "application/json"}
    refused = [
        # A page elsewhere can send these without a CORS preflight: a form post, text/plain, no content type.
        ({"content-type": "text/plain"}, 415),
        ({"content-type": "application/x-www-form-urlencoded"}, 415),
        ({}, 415),
        (json_type | {"origin": "https://evil.example"}, 403),
        (json_type | {"origin": f"http://localhost.evil.example:{port}"}, 403),
        (json_type | {"origin": "null"}, 403),  # a sandboxed frame or a file:// page
        # DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends its own name as Host.
        (json_type | {"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}"}, 421),
        (json_type | {"host": "evil.example"}, 421),
    ]
    for headers, status in refused:
        answer, _, body = request(server, "POST", "/api/generate", GENERATE, headers)
        assert answer == status and "\n" not in json.loads(body)["error"], (headers, answer, body)
    for path in ("/", "/config", "/api/info"):  # the page and Gradio's routes answer to no stranger's name either
        assert request(server, "GET", path, headers={"host": "evil.example"})[0] == 421, path
    answer, _, _ = request(
        server, "POST", "/gradio_api/queue/join", b"{}", {"content-type": "application/json", "origin": "https://a.b"}
    )
    assert answer == 403
    # The server's own page, by any loopback name, is served.
    for own in (host, f"localhost:{port}", f"[::1]:{port}"):
        headers = json_type | {"host": own, "origin": f"http://{own}"}
        answer, _, body = request(server, "POST", "/api/generate", GENERATE, headers)
        assert answer == 200 and json.loads(body)["images"], (own, body)


def test_bodies_over_the_limit_are_refused_before_they_are_read(server):
    port = int(server.url.rsplit(":", 1)[1])
    head = f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    # Announced too large: answered at once, though not one byte of the body was sent.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{head}Content-Length: 1000000000\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    # Chunked, so of unknown length: answered once the running count passes the limit, though the body goes on.
    # (Just past it: sending on while the server closes could turn its answer into a connection reset.)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 4096
        for _ in range(MAX_BODY // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    # Gradio's upload route is behind the same limit.
    boundary = "pixartboundary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + b"\0" * (MAX_BODY + 1)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, _, _ = request(
        server, "POST", "/gradio_api/upload", form, {"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 413
    assert post(f"{server.url}/api/generate", GENERATE)[0] == 200


def test_a_slow_body_is_timed_out_and_idle_connections_are_closed(server):
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"prompt": '.encode()
        )
        started = time.monotonic()
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < BODY_TIMEOUT + 5, answer
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # kept alive after an answer, then closed
        sock.sendall(f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        started, received = time.monotonic(), b""
        while chunk := sock.recv(65536):  # ends when the server closes the idle connection
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 ") and time.monotonic() - started < 15


def test_no_path_of_the_server_machine_reaches_a_client(server, model):
    info = json.loads(urllib.request.urlopen(f"{server.url}/api/info", timeout=30).read())
    assert info["model"] == model.name
    pages = [json.dumps(info)]
    pages += [urllib.request.urlopen(f"{server.url}{p}", timeout=30).read().decode() for p in ("/", "/config")]
    for text in pages:
        for secret in (str(model), str(model.parent), str(server.out), tempfile.gettempdir() + "/"):
            assert secret not in text, (secret, text[:2000])


def vm_rss(pid: int) -> int:
    """Resident memory of a process in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_a_hundred_concurrent_clients_all_get_an_answer_and_memory_stays_flat(server):
    def one(k: int) -> tuple[int, float]:
        started = time.monotonic()
        try:
            return request(server, "POST", "/api/generate", GENERATE, {"content-type": "application/json"})[0], (
                time.monotonic() - started
            )
        except OSError as err:
            return repr(err), time.monotonic() - started

    def round_of_100() -> list[tuple[int, float]]:
        with ThreadPoolExecutor(100) as pool:
            return list(pool.map(one, range(100), timeout=300))

    for _ in range(2):  # warm-up: the server's thread pool and allocator reach their working size
        round_of_100()
    before = vm_rss(server.proc.pid)
    for _ in range(2):
        results = round_of_100()
        statuses = [status for status, _ in results]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 2
        # A full queue is answered at once, not after waiting for a slot.
        assert max(seconds for status, seconds in results if status == 503) < 10
    after = vm_rss(server.proc.pid)
    assert after - before < 50_000, (before, after)  # kB
    assert post(f"{server.url}/api/generate", GENERATE)[0] == 200
    assert json.loads(urllib.request.urlopen(f"{server.url}/api/info", timeout=30).read())["waiting"] == 0


def test_each_request_chooses_among_the_loaded_loras(server, model, loras, tmp_path):
    info = json.loads(urllib.request.urlopen(f"{server.url}/api/info", timeout=30).read())
    assert info["loras"] == [{"name": "style", "scale": 0.8}, {"name": "detail", "scale": 1.0}]
    request = {"prompt": "a red fox", "seed": 3, "steps": 2, "width": 64, "height": 64, "binning": False}
    flags = ["a red fox", "--model", str(model), "--seed", "3", "--steps", "2", "--width", "64", "--height", "64"]
    flags += ["--no-binning", "--device", "cpu"]
    choices = [  # (request's loras, the same as `pixart generate` flags); the base again after LoRAs: restored
        ([], []),
        (["style"], ["--lora", f"{loras['style']}:0.8"]),
        ([["detail", 0.5], "style"], ["--lora", f"{loras['detail']}:0.5", "--lora", f"{loras['style']}:0.8"]),
        ([], []),
    ]
    served = []
    for i, (chosen, lora_flags) in enumerate(choices):
        status, body = post(f"{server.url}/api/generate", request | {"loras": chosen})
        assert status == 200, body
        image = png(body["images"][0]["png_base64"])
        assert main(["generate", *flags, *lora_flags, "--out", str(tmp_path / str(i))]) == 0
        expected = Image.open(next((tmp_path / str(i)).glob("*.png")))
        assert image.tobytes() == expected.tobytes(), chosen
        assert image.info.get("loras") == expected.info.get("loras"), chosen
        served.append(image.tobytes())
    assert len(set(served[:3])) == 3 and served[3] == served[0]

    for bad, message in [
        (["sketch"], "unknown LoRA 'sketch'; this server has: style, detail"),
        ("style", "loras must be a list of LoRA names or [name, scale] pairs, got 'style'"),
        ([["style", "strong"]], "the scale of LoRA 'style' must be a number from -10 to 10, got 'strong'"),
    ]:
        status, body = post(f"{server.url}/api/generate", request | {"loras": bad})
        assert (status, body) == (400, {"error": message})
