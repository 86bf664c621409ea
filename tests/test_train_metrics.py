"""Training works the first time: without tensorboard (the base install) metrics go to RUN/logs/metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HIDDEN = ("tensorboard", "tensorboardX")


@pytest.fixture(scope="module")
def no_tensorboard(tmp_path_factory) -> dict[str, str]:
    """The environment of a Python that cannot import tensorboard: packages of the same names, first on the
    path, that raise ImportError, as a missing package does (torch's writer imports `tensorboard`)."""
    shim = tmp_path_factory.mktemp("shim")
    for name in HIDDEN:
        (shim / name).mkdir()
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by the test')\n")
    path = os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    hidden = subprocess.run([sys.executable, "-c", "import torch.utils.tensorboard"], env=env, capture_output=True)
    assert hidden.returncode != 0 and b"hidden by the test" in hidden.stderr  # the shim works
    return env


def train(setup, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    _, pipe, _, cache = setup
    args = [f"--model.pipeline={pipe}", f"--data.cache={cache}", "--data.image_size=256", f"--run.output_dir={out}",
            "--logging.progress=false", "--logging.tensorboard=true", "--logging.every=2", "--schedule.max_steps=5",
            "--checkpoint.every=0"]  # fmt: skip
    command = [sys.executable, "-m", "pixart", "train", "debug", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_a_run_without_tensorboard_logs_metrics_as_json_lines(setup, tmp_path, no_tensorboard):
    done = train(setup, tmp_path / "run", no_tensorboard)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "final.safetensors").is_file()
    said = [line for line in done.stderr.splitlines() if "tensorboard is" in line]
    assert said == [f"tensorboard is not installed: metrics go to {tmp_path / 'run' / 'logs' / 'metrics.jsonl'} "
                    "(pip install tensorboard for TensorBoard logs)"], done.stderr  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 5]  # every 2 steps, and the last
    for row in rows:
        assert set(row) >= {"step", "loss", "lr", "samples_per_s"}
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["lr"] == pytest.approx(1e-3)
    assert not (tmp_path / "run" / "logs" / "pixart").exists()


def test_tensorboard_stays_the_default_where_installed(setup, tmp_path):
    pytest.importorskip("tensorboard")
    done = train(setup, tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "tensorboard is not installed" not in done.stderr
    assert list((tmp_path / "run" / "logs" / "pixart").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "logs" / "metrics.jsonl").exists()
