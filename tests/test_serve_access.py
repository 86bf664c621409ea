"""`pixart serve` shared behind a token: authentication, the rate and work limits, abandoned requests, the
request log and a clean SIGTERM. One real server process (the tiny model of tests/tiny.py, 256-px bins,
no --out so its images go to a temporary folder) and http.client requests, all on loopback.

The rate limit counts per client address, so each test speaks from its own loopback address (127.0.0.N)
and does not spend another's allowance.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.tiny import save_pipeline

from pixart.errors import PixArtError
from pixart.serve.guard import RateLimited, RateLimiter, parse_rate

TOKEN = "pixart-test-token-" + "k" * 16
RATE = 3  # requests per minute per client
SIDE = 256  # the model's default size: sample_size 32 × VAE factor 8
MAX_IMAGES = 2
DEFAULT_WORK = SIDE * SIDE * 100 * MAX_IMAGES  # ddpm: 100 steps, the most any sampler defaults to
HEADER_TIMEOUT = 3  # seconds
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, with a token in a file, once it answers HTTP; its log file and temporary image folder."""
    root = tmp_path_factory.mktemp("access")
    model = save_pipeline(root / "tiny", "sigma")
    config_file = model / "transformer" / "config.json"
    config = json.loads(config_file.read_text()) | {"sample_size": 32, "interpolation_scale": 1}  # 256-px bins
    config_file.write_text(json.dumps(config))
    token_file = root / "token.txt"
    token_file.write_text(TOKEN + "\n")
    port, log_file = free_port(), root / "server.log"
    cmd = [sys.executable, "-m", "pixart", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--auth-token-file", str(token_file), "--allowed-host", "pixart.test", "--rate-limit", f"{RATE}/min"]
    cmd += ["--max-images", str(MAX_IMAGES), "--max-steps", "100000", "--header-timeout", str(HEADER_TIMEOUT)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("PIXART_AUTH_TOKEN", None)
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    launched = SimpleNamespace(port=port, proc=proc, log_file=log_file)
    try:
        deadline = time.monotonic() + 120
        while get(launched, "/api/info")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log_file.read_text()}")
            time.sleep(0.5)
        yield launched
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def call(server, method: str, path: str, body=None, headers=None, source: str = "127.0.0.1", timeout: float = 60):
    """(status, headers, body) of one request from the loopback address ``source``; OSError → status 0."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout, source_address=(source, 0))
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, data, headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except ConnectionRefusedError:
        return 0, {}, b""
    finally:
        conn.close()


def get(server, path: str, **kwargs):
    return call(server, "GET", path, headers={"authorization": f"Bearer {TOKEN}"}, **kwargs)


def generate(server, body: dict, source: str, token: str = TOKEN) -> tuple[int, dict, dict]:
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
    status, answer_headers, data = call(server, "POST", "/api/generate", body, headers, source=source)
    return status, answer_headers, json.loads(data)


def test_the_rate_limit_allows_a_burst_then_one_request_per_interval_per_client():
    now = [0.0]
    limiter = RateLimiter(6, clock=lambda: now[0])  # one every 10 s, six at once
    for _ in range(6):
        limiter.admit("a")
    with pytest.raises(RateLimited, match="6 a minute") as refused:
        limiter.admit("a")
    assert refused.value.retry_after == 10
    limiter.admit("b")  # its own allowance
    now[0] = 9.0
    with pytest.raises(RateLimited):
        limiter.admit("a")
    now[0] = 10.0
    limiter.admit("a")
    # Memory stays bounded under many addresses: clients whose allowance is whole again are forgotten.
    for k in range(5000):
        limiter.admit(f"10.0.{k // 256}.{k % 256}")
    now[0] = 100.0
    limiter.admit("c")
    assert len(limiter._buckets) < 10
    assert [parse_rate(r) for r in ("30/min", "30", "2/s", "120/h")] == [30, 30, 120, 2]
    for bad in ("fast", "0/min", "30/day", "10/h", "-1"):
        with pytest.raises(PixArtError, match="--rate-limit"):
            parse_rate(bad)


SMALL = {"prompt": "a small cube", "steps": 1, "width": 32, "height": 32, "binning": False}


def test_the_api_and_the_page_require_the_token(server, tmp_path):
    from gradio_client import Client

    wrong_tokens = [
        {},
        {"authorization": "Bearer " + "x" * len(TOKEN)},
        {"authorization": f"Bearer {TOKEN[:-1]}"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": TOKEN},
    ]
    for headers in wrong_tokens:
        for method, path, body in (("POST", "/api/generate", SMALL), ("GET", "/api/info", None)):
            status, answer_headers, data = call(
                server, method, path, body, headers | {"content-type": "application/json"}, source="127.0.0.2"
            )
            assert status == 401 and answer_headers["www-authenticate"] == "Bearer", (headers, path, status)
            assert TOKEN not in data.decode()
    status, _, body = generate(server, SMALL, "127.0.0.2")
    assert status == 200 and len(body["images"]) == 1
    # A name given with --allowed-host is answered (a LAN name, a proxy's); the token is still needed.
    headers = {"host": f"pixart.test:{server.port}", "authorization": f"Bearer {TOKEN}"}
    assert call(server, "GET", "/api/info", headers=headers)[0] == 200

    # The page: Gradio's login, with the token as the password; its routes stay closed until then.
    assert call(server, "GET", "/config")[0] == 401
    form = {"content-type": "application/x-www-form-urlencoded"}
    status, _, _ = call(server, "POST", "/login", b"username=me&password=not-the-token", form)
    assert status in (400, 401)
    status, headers, _ = call(server, "POST", "/login", f"username=me&password={TOKEN}".encode(), form)
    assert status == 200, status
    cookies = "; ".join(c.split(";")[0] for c in headers["set-cookie"].split(", ") if "=" in c.split(";")[0])
    status, _, config = call(server, "GET", "/config", headers={"cookie": cookies})
    assert status == 200 and json.loads(config)["title"] == "PixArt"
    # Gradio's client logs in the same way; without the token it cannot even connect.
    url = f"http://127.0.0.1:{server.port}/"
    client = Client(url, auth=("me", TOKEN), verbose=False, download_files=str(tmp_path))
    inputs = ("a bird", "", "custom", 32, 32, 1, "ddim", 1, 1.0, 9, False, False)  # see tests/test_serve.py
    gallery, seed = client.predict(*inputs, api_name="/generate")
    assert seed == 9 and Path(gallery[0]["image"]).is_file()
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=("me", "x" * len(TOKEN)), verbose=False)
    assert TOKEN not in server.log_file.read_text()


def test_a_client_over_the_rate_limit_gets_429_with_retry_after_and_others_are_served(server):
    for _ in range(RATE):  # refused requests count too: a flood of bad ones is as limited as good ones
        assert generate(server, {"prompt": ""}, "127.0.0.3")[0] == 400
    status, headers, body = generate(server, SMALL, "127.0.0.3")
    assert status == 429 and f"{RATE} a minute" in body["error"], body
    assert 1 <= int(headers["retry-after"]) <= 60 // RATE
    assert generate(server, SMALL, "127.0.0.4")[0] == 200  # another client is not held up


def test_work_per_request_is_bounded_by_the_models_size(server):
    info = json.loads(get(server, "/api/info")[2])
    assert info["limits"]["max_work"] == DEFAULT_WORK
    status, _, body = generate(server, {"prompt": "a cat", "steps": 201}, "127.0.0.5")  # 256² × 201 steps
    assert status == 400 and f"at most {DEFAULT_WORK}" in body["error"] and "\n" not in body["error"], body
    status, _, body = generate(server, {"prompt": "a cat", "steps": 101, "num_images": 2}, "127.0.0.5")
    assert status == 400 and "pixel-steps" in body["error"], body
    assert generate(server, {"prompt": "a cat", "steps": 2, "num_images": 2}, "127.0.0.5")[0] == 200


def running(server) -> int:
    return json.loads(get(server, "/api/info")[2])["running"]


def test_a_client_that_hangs_up_stops_its_generation_and_frees_the_slot(server):
    steps = 1000  # the most any request may ask (the schedule's length), at the largest size the work limit allows
    assert 112 * 112 * steps <= DEFAULT_WORK
    body = json.dumps({"prompt": "a long job", "steps": steps, "width": 112, "height": 112, "binning": False}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30, source_address=("127.0.0.6", 0)) as sock:
        sock.sendall(
            f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while running(server) == 0:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.05)
        time.sleep(0.5)  # some steps in
    hung_up = time.monotonic()
    while running(server) != 0:
        assert time.monotonic() - hung_up < 5, "denoising went on after the client left"
        time.sleep(0.05)
    (line,) = [line for line in server.log_file.read_text().splitlines() if "127.0.0.6" in line]
    done = int(re.search(r"499 client gone, stopped after (\d+) of (\d+) steps", line).group(1))
    assert 0 < done < steps // 2, line
    started = time.monotonic()  # the slot is free: the next request is served at once
    assert generate(server, SMALL, "127.0.0.7")[0] == 200 and time.monotonic() - started < 10


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium: apt-get install chromium")
def test_closing_the_page_stops_its_generation_and_frees_the_slot(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url = f"http://127.0.0.1:{server.port}"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"],
        )
        try:
            # The browser context shares its cookies with its request client: this is the page's login.
            assert context.request.post(f"{url}/login", form={"username": "me", "password": TOKEN}).status == 200
            page = context.new_page()
            page.goto(url, timeout=60_000)
            # Opened first: the sampler's defaults fill the steps when the accordion first shows.
            page.get_by_text("Advanced options").click()
            page.locator("#prompt textarea").fill("a long job in a tab about to close")
            size = page.get_by_label("Size (width")
            size.click()
            size.fill("custom")
            size.press("Enter")
            page.get_by_label("Sample at the nearest trained aspect ratio").uncheck()
            # As the API hang-up test: the most steps, at the largest size the work limit then allows.
            for label, value in (("Width", "112"), ("Height", "112"), ("number input for Steps", "1000")):
                field = page.get_by_role("spinbutton", name=label)
                field.fill(value)
                field.press("Tab")
                expect(field).to_have_value(value)
            page.locator("#generate").click()
            deadline = time.monotonic() + 30
            while running(server) == 0:
                assert time.monotonic() < deadline, "the generation did not start"
                time.sleep(0.05)
            time.sleep(0.5)  # some steps in
            page.close()
        finally:
            context.close()
    closed = time.monotonic()
    while running(server) != 0:
        assert time.monotonic() - closed < 5, "denoising went on after the page closed"
        time.sleep(0.05)
    lines = server.log_file.read_text().splitlines()
    (line,) = [line for line in lines if " 127.0.0.1 112x112 1000 steps" in line]  # the browser's address
    done = int(re.search(r"499 client gone, stopped after (\d+) of 1000 steps", line).group(1))
    assert 0 < done < 500, line
    started = time.monotonic()  # the slot is free: the next request is served at once
    assert generate(server, SMALL, "127.0.0.11")[0] == 200 and time.monotonic() - started < 10


def test_each_request_is_one_log_line_without_the_prompt(server):
    status, _, _ = generate(server, SMALL | {"prompt": "a walrus in a top hat", "seed": 3}, "127.0.0.8")
    assert status == 200
    log = server.log_file.read_text()
    assert "walrus" not in log and TOKEN not in log
    (line,) = [line for line in log.splitlines() if "127.0.0.8" in line]
    # time, client, size, steps × images, seconds, outcome
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ 127\.0\.0\.8 32x32 1 steps x1 \d+\.\d\d s 200 ok", line), line


def closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection: an orderly end, or a reset when a byte the client sent last
    was still unread when the server closed (the kernel then answers with RST, not FIN)."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_clients_sending_their_headers_slowly_are_cut_off_and_others_are_served(server):
    opened = time.monotonic()
    slow = [socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.9", 0)) for _ in range(100)]
    for sock in slow:
        sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    silent = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.9", 0))
    pending, answers = set(slow), {}
    while pending and time.monotonic() - opened < HEADER_TIMEOUT + 10:
        readable, _, _ = select.select(list(pending), [], [], 1.0)
        for sock in readable:
            answers[sock] = (sock.recv(4096), time.monotonic() - opened)
            pending.remove(sock)
        for sock in pending:
            sock.sendall(b"x")  # one more byte of a header line that never ends, about one a second
        started = time.monotonic()  # meanwhile, a client that sends its request at once is served at once
        assert get(server, "/api/info", source="127.0.0.10")[0] == 200 and time.monotonic() - started < 5
    assert not pending, f"{len(pending)} slow clients still hold their connections"
    for sock, (answer, after) in answers.items():
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 3 s" in answer, answer
        assert HEADER_TIMEOUT - 0.5 < after < HEADER_TIMEOUT + 3, after
        assert closed(sock)
        sock.close()
    silent.settimeout(5)
    assert silent.recv(4096) == b""  # a connection that never spoke is closed without an answer
    silent.close()
    log = server.log_file.read_text()
    assert log.count("127.0.0.9 - - 408 request headers not complete within 3 s") == 100, log[-2000:]


def test_sigterm_exits_cleanly_and_removes_the_temporary_image_folder(server):
    log = server.log_file.read_text()
    folder = Path(re.search(r"images in (\S+)", log).group(1))
    assert folder.is_dir() and any(folder.glob("*.png"))
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    log = server.log_file.read_text()
    assert "Traceback" not in log and not folder.exists(), log[-2000:]
