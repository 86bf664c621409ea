"""A newcomer's first hour with the bundled demo: the sizes it knows, examples that fit it, round trips that close.

Real processes (the CLI, a server on a free port), the real bundled demo, real diffusers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from tests.tiny import save_pipeline

from pixart.cli import main
from pixart.demo import BUNDLE
from pixart.demo.shapes import example_prompts

README = Path(__file__).parent.parent / "README.md"
PROMPT = "a small red circle above a blue square"
REFUSAL = "1024 × 768 is not a size this model was trained at (64 × 64); pass --allow-any-size"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(folder: Path) -> bytes:
    (png,) = folder.glob("*.png")
    return Image.open(png).tobytes()


def test_generate_refuses_a_size_the_demo_never_saw_within_seconds(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pixart", "generate", PROMPT, "--width", "1024", "--height", "768"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {REFUSAL} to force it"]
    assert elapsed < 15, elapsed  # it took 5 min 47 s to draw a blur before
    assert not (tmp_path / "outputs").exists()


def test_allow_any_size_forces_an_untrained_size(tmp_path):
    args = ["generate", PROMPT, "--width", "72", "--height", "64", "--steps", "1", "--out", str(tmp_path)]
    assert main(args) == 2 and not list(tmp_path.glob("*.png"))
    assert main([*args, "--allow-any-size"]) == 0
    assert Image.open(next(tmp_path.glob("*.png"))).size == (72, 64)


def test_demo_round_trips_through_every_checkpoint_format_to_the_same_image(tmp_path, capsys):
    """Bundle → official .pth → diffusers folder → pixart .safetensors: each generates the bundle's image exactly."""
    same = ["--seed", "3", "--steps", "4"]
    assert main(["generate", PROMPT, *same, "--out", str(tmp_path / "bundle")]) == 0
    pth, folder, ours = tmp_path / "demo.pth", tmp_path / "demo-diffusers", tmp_path / "demo.safetensors"
    assert main(["convert", str(BUNDLE), str(pth), "--to", "official"]) == 0
    assert main(["convert", str(pth), str(folder), "--to", "diffusers", "--family", "sigma"]) == 0
    assert main(["convert", str(folder), str(ours), "--to", "pixart", "--family", "sigma"]) == 0
    # An official .pth cannot say it is Σ; the pos_embed grid says its size, and --image-size in the demo's own
    # pixels (64, a 4× VAE) agrees with it.
    runs = {
        "pth": ["--transformer", str(pth), "--family", "sigma"],
        "pth-sized": ["--transformer", str(pth), "--family", "sigma", "--image-size", "64"],
        "diffusers": ["--transformer", str(folder), "--family", "sigma"],
        "pixart": ["--transformer", str(ours)],
    }
    for name, flags in runs.items():
        assert main(["generate", PROMPT, *same, *flags, "--out", str(tmp_path / name)]) == 0, name
        assert pixels(tmp_path / name) == pixels(tmp_path / "bundle"), name
    # The PNG records --family, so it reproduces itself.
    (png,) = (tmp_path / "pth").glob("*.png")
    assert json.loads(Image.open(png).info["transformer_options"]) == {"family": "sigma"}
    assert main(["generate", "--from-png", str(png), "--trust-metadata", "--out", str(tmp_path / "again")]) == 0
    assert pixels(tmp_path / "again") == pixels(tmp_path / "bundle")
    # eval reads the same .pth with the same flags, and scores it as the bundle.
    scores, _ = {}, capsys.readouterr()  # the generate runs' paths above
    for name, flags in {"bundle": [], "pth": runs["pth-sized"]}.items():
        assert main(["eval", "--prompts", "4", "--steps", "4", "--json", *flags]) == 0, name
        scores[name] = json.loads(capsys.readouterr().out)
    assert scores["pth"] == scores["bundle"]


def test_image_size_that_splits_into_no_whole_patches_is_one_line(tmp_path, capsys):
    pth = tmp_path / "demo.pth"
    assert main(["convert", str(BUNDLE), str(pth), "--to", "official"]) == 0
    capsys.readouterr()
    args = ["generate", PROMPT, "--transformer", str(pth), "--family", "sigma", "--image-size", "60"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --image-size 60 is not a positive multiple of 8 "
                                                    "(VAE factor × patch 2)"]  # fmt: skip


def test_exported_demo_prints_the_diffusers_call_that_works(tmp_path, capsys, caplog):
    out = tmp_path / "demo-diffusers"
    with caplog.at_level(logging.INFO, logger="pixart"):
        assert main(["export", "diffusers", str(out), "--base", str(BUNDLE), "--transformer", str(BUNDLE)]) == 0
    assert capsys.readouterr().out == f"{out}\n"  # stdout: the folder alone, for scripts
    (printed,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("in diffusers:\n")]
    code = textwrap.dedent(printed.removeprefix("in diffusers:\n")) + "\n"
    assert "height=64, width=64, use_resolution_binning=False" in code
    # The printed lines run as they stand in plain diffusers; its default call would not.
    check = code + "print(image.size)\ntry:\n    pipe('x')\nexcept ValueError as err:\n    print('default:', err)\n"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == ["(64, 64)", "default: Invalid sample size"]
    # The export keeps the bundle's trained sizes, so the folder refuses what the bundle refuses.
    assert json.loads((out / "transformer" / "config.json").read_text())["_pixart_trained_sizes"] == [[64, 64]]
    assert main(["generate", PROMPT, "--model", str(out), "--width", "1024", "--height", "768"]) == 2
    assert REFUSAL in capsys.readouterr().err


def test_no_shipped_file_names_a_folder_of_the_machine_that_built_it():
    package = Path(__file__).parent.parent / "src" / "pixart"
    files = [p for folder in ("assets", "demo", "recipes") for p in (package / folder).rglob("*")]
    texts = [p for p in files if p.suffix in (".json", ".txt", ".toml")]
    assert len(texts) >= 7  # the bundle's configs at least
    for path in texts:
        text = path.read_text()
        for folder in ("/work", "/home", "/tmp", "/root"):
            assert folder not in text, f"{path} names {folder}"


def test_export_drops_the_build_machines_paths_from_the_base_configs(tmp_path):
    base = save_pipeline(tmp_path / "base", "sigma")
    for part in ("vae", "text_encoder"):
        config_file = base / part / "config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"_name_or_path": "/home/me/parts"}))
    out = tmp_path / "out"
    assert main(["export", "diffusers", str(out), "--base", str(base), "--transformer", str(base)]) == 0
    for config_file in out.rglob("*.json"):
        assert "/home/me" not in config_file.read_text(), config_file
    assert json.loads((out / "vae" / "config.json").read_text())["latent_channels"] == 4  # the rest is kept


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`pixart serve` on the bundled demo (no --model), as the README starts it, with the demo's bundled LoRA and
    ControlNet named as a user names them."""
    port, out = free_port(), tmp_path_factory.mktemp("out")
    log_file = tmp_path_factory.mktemp("log") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_file, "wb") as log:
        cmd = [sys.executable, "-m", "pixart", "serve", "--port", str(port), "--out", str(out)]
        cmd += ["--lora", "demo-lcm", "--controlnet", "demo-layout"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log_file.read_text()}")
        try:
            urllib.request.urlopen(f"{url}/api/info", timeout=5).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not answer within 180 s:\n{log_file.read_text()}")
            time.sleep(0.5)
    yield port
    proc.terminate()  # SIGTERM: the server leaves cleanly; killed only if it hangs
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    proc.kill()
    proc.wait()


def test_server_info_and_page_offer_the_demos_sizes_and_examples(demo_server):
    url = f"http://127.0.0.1:{demo_server}"
    info = json.loads(urllib.request.urlopen(f"{url}/api/info", timeout=30).read())
    assert info["sizes"] == [[64, 64]]
    assert info["examples"] == example_prompts() and not info["any_size"]
    page = urllib.request.urlopen(f"{url}/config", timeout=30).read().decode()
    assert all(prompt in page for prompt in example_prompts())
    assert "astronaut" not in page and "64 × 64" in page


def test_server_serves_the_bundled_lora_and_controlnet_by_name(demo_server):
    url = f"http://127.0.0.1:{demo_server}"
    info = json.loads(urllib.request.urlopen(f"{url}/api/info", timeout=30).read())
    assert info["loras"] == [{"name": "demo-lcm", "scale": 1.0}] and info["controlnets"] == ["demo-layout"]

    def generate(**fields) -> Image.Image:
        body = json.dumps({"prompt": "a red circle", "seed": 3, **fields}).encode()
        request = urllib.request.Request(f"{url}/api/generate", body, {"content-type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
        return Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["png_base64"])))

    lcm = dict(sampler="lcm", steps=4, guidance=1.0)
    plain, with_lora = generate(**lcm), generate(**lcm, loras=["demo-lcm"])
    assert json.loads(with_lora.info["loras"]) == [["demo-lcm", 1.0]] and "loras" not in plain.info
    assert with_lora.tobytes() != plain.tobytes()
    layout = Image.new("RGB", (64, 64))
    layout.paste((255, 255, 255), (40, 40, 60, 60))  # a white blob bottom right: where the circle should go
    buffer = io.BytesIO()
    layout.save(buffer, "PNG")
    control = dict(control=base64.b64encode(buffer.getvalue()).decode(), controlnet="demo-layout", control_type="none")
    steered = generate(steps=10, **control)
    assert steered.info["controlnet"] == "demo-layout" and steered.tobytes() != generate(steps=10).tobytes()


def test_server_refuses_a_size_the_demo_never_saw_at_once(demo_server):
    body = json.dumps({"prompt": PROMPT, "width": 1024, "height": 768}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{demo_server}/api/generate", body, {"content-type": "application/json"}
    )
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert time.monotonic() - started < 5
    assert refused.value.code == 400
    assert json.load(refused.value) == {"error": f"{REFUSAL} to pixart serve to force it"}


def test_readme_curl_example_returns_a_demo_image_quickly(demo_server, tmp_path):
    pattern = r"^curl -s http://127\.0\.0\.1:7860/api/generate .*?\n(?=\n|```)"  # up to a blank line or the fence
    block = re.search(pattern, README.read_text(), re.S | re.M)
    command = block[0].replace(":7860", f":{demo_server}")
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60  # not the 5 min 47 s of a 1024 × 768 blur
    (png,) = tmp_path.glob("*.png")
    image = Image.open(png)
    assert image.size == (64, 64) and image.info["prompt"] == PROMPT


def test_the_name_demo_is_the_bundle_for_every_command_that_takes_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a folder of that name here (the README writes its images to one): the name wins
    same = ["--seed", "3", "--steps", "4"]
    assert main(["generate", PROMPT, *same, "--model", "demo", "--out", "named"]) == 0
    assert main(["generate", PROMPT, *same, "--out", "default"]) == 0
    assert pixels(tmp_path / "named") == pixels(tmp_path / "default")
    transformer = str(BUNDLE / "transformer")
    assert main(["export", "diffusers", "exported", "--base", "demo", "--transformer", transformer]) == 0
    assert main(["generate", PROMPT, *same, "--model", "exported", "--out", "from-export"]) == 0
    assert pixels(tmp_path / "from-export") == pixels(tmp_path / "default")
