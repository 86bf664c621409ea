"""docs/first-hour.md runs as written: every ```bash block of the page, in order, in one fresh folder.

Two substitutions, both for the test machine rather than the user's: the fine-tune runs 2 steps instead of the
recipe's 400 (`--schedule.max_steps=2` is added), and the web page listens on a free port instead of 7860 (the
`pixart serve` block gets `--port N`, and `7860` in the next block becomes N), so parallel runs cannot collide.
The `pixart serve` block runs as a real server in the background; the page's `curl` of /api/info must answer
before it is stopped. The install commands stay in the page's prose: they need the network.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart.inference.options import GenerationOptions
from pixart.inference.pipeline import PixArtPipeline
from tiny import run_shell, shell_environment

PAGE = Path(__file__).resolve().parents[1] / "docs" / "first-hour.md"
TRAIN = "pixart train demo-finetune --data.dataset=my-images/"
STEPS = (TRAIN, f"{TRAIN} --schedule.max_steps=2")


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", markdown, re.S | re.M)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(serve: str, ask: str, cwd: Path, port: int) -> str:
    """Start the page's server command in the background, run the page's question until it answers, stop it."""
    command = serve.strip().replace("pixart serve", f"pixart serve --port {port}", 1)
    log = cwd / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=shell_environment(), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"the server exited with {server.returncode}:\n{log.read_text()}"
            answer = run_shell(ask.replace("7860", str(port)), cwd, timeout=60)
            if answer.returncode == 0 and answer.stdout:
                return answer.stdout
            assert time.monotonic() < deadline, f"no answer within 180 s:\n{log.read_text()}"
            time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group, started above
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_page_has_the_newcomers_nine_steps():
    page = PAGE.read_text()
    titles = re.findall(r"^## (\d)\. (.*)$", page, re.M)
    assert [int(n) for n, _ in titles] == list(range(1, 10)), titles
    blocks = bash_blocks(page)
    assert sum(STEPS[0] in b for b in blocks) == 1 and sum(b.strip() == "pixart serve" for b in blocks) == 1
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "(docs/first-hour.md)" in readme.split("## Install")[0]  # linked where a newcomer starts reading


@pytest.mark.slow  # every command of the page, in order
def test_every_command_of_the_page_runs_in_order(tmp_path):
    blocks = bash_blocks(PAGE.read_text())
    port = free_port()
    i = 0
    while i < len(blocks):
        block = blocks[i].replace(*STEPS)
        if block.strip() == "pixart serve":
            info = json.loads(serve_and_ask(block, blocks[i + 1], tmp_path, port))
            assert info["model"] == "the bundled demo" and info["sizes"] == [[64, 64]] and "dpm++" in info["samplers"]
            i += 2
            continue
        result = run_shell(block, tmp_path, timeout=900)
        assert result.returncode == 0, f"block {i + 1}:\n{block}\n{result.stderr[-3000:]}"
        i += 1

    # What the page says each step leaves behind.
    first, again = (Image.open(tmp_path / "outputs" / name) for name in ("00000-1.png", "00001-1.png"))
    assert first.size == (64, 64) and np.array_equal(np.asarray(first), np.asarray(again))  # --from-png
    keys = ["prompt", "seed", "steps", "sampler", "guidance", "width", "height", "binning", "max_tokens", "clean",
            "model", "transformer", "dtype", "generator"]  # fmt: skip
    assert list(first.info) == keys and first.info["sampler"] == "dpm++" and first.info["steps"] == "20"
    lcm = Image.open(tmp_path / "lcm" / "00000-1.png").info  # the shipped LCM-LoRA
    assert (lcm["sampler"], lcm["steps"], json.loads(lcm["loras"])) == ("lcm", "4", [["demo-lcm", 1.0]])
    captions = sorted(p.read_text() for p in (tmp_path / "my-images").glob("*.txt"))
    assert len(captions) == 10 and "a small pink square on the left" in captions
    run = tmp_path / "runs" / "demo-finetune"
    assert len(list((run / "preserve-demo").glob("*.png"))) == 200  # the demo's own scenes, kept while it learns
    assert (run / "final.safetensors").is_file() and (run / "final-lora").is_dir()
    assert len(list((run / "validation").glob("*.png"))) == 3
    pink = Image.open(tmp_path / "pink" / "00000-1.png")
    assert json.loads(pink.info["loras"]) == [["runs/demo-finetune/final-lora", 1.0]]
    assert (tmp_path / "pink-diffusers" / "model_index.json").is_file()
    assert Image.open(tmp_path / "pink-diffusers.png").size == (64, 64)
    for name in ("transformer.xml", "transformer.bin", "pixart_openvino.json"):
        assert (tmp_path / "pink-ov" / name).is_file(), name
    # OpenVINO (an fp32 IR) runs step 7's network with the LoRA merged: PyTorch's fp32 image of the PNG's settings
    # to within a pixel level or two. The page's own image ran in the CPU's default dtype (bf16 where the units are).
    ov = np.asarray(Image.open(tmp_path / "pink-ov-images" / "00000-1.png"), dtype=np.int16)
    prompt, options, load = GenerationOptions.from_metadata(pink.info)
    load = load.replace(loras=tuple((str(tmp_path / path), scale) for path, scale in load.loras), dtype="fp32")
    fp32 = PixArtPipeline.from_pretrained(load, device="cpu")(prompt, options, show_progress=False)[0]
    difference = np.abs(ov - np.asarray(fp32, dtype=np.int16))
    assert difference.max() <= 2 and difference.mean() < 0.1
