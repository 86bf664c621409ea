"""`pixart generate|eval --log wandb|tensorboard`: the real commands run with the bundled demo model, and the logs
they leave are read back with the loggers' own formats (W&B's offline run file, TensorBoard's event files)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port, closed here: whatever tries the network fails at once


def offline_env(tmp: Path) -> dict[str, str]:
    """W&B offline with every folder it writes (runs, staged artifacts, cache, settings) under ``tmp``."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp / "wandb-dir"),
        "WANDB_DATA_DIR": str(tmp / "wandb-data"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
        "WANDB_BASE_URL": CLOSED,
        "HTTP_PROXY": CLOSED,
        "HTTPS_PROXY": CLOSED,
        "NO_PROXY": "",
        "HF_HUB_OFFLINE": "1",
    }


def pixart(*args: str, env: dict[str, str] | None = None, code: int = 0) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # No W&B setting of this process (nor the service address an in-process run left) reaches the command; its
    # own session, so W&B's service shutting down can signal nothing of the test process's group.
    environment = {k: v for k, v in environment.items() if "WANDB_" not in k or k in (env or {})}
    done = subprocess.run([sys.executable, "-m", "pixart", *args], capture_output=True, text=True, env=environment,
                          cwd=ROOT, timeout=600, start_new_session=True)  # fmt: skip
    assert done.returncode == code, done.stderr[-3000:]
    return done


def wandb_records(run_folder: Path) -> list:
    """The records of an offline run's ``run-*.wandb`` file: LevelDB's log format (32 KiB blocks of chunks with a
    7-byte header: CRC, length, type 1 full / 2 first / 3 middle / 4 last) after W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_folder.glob("run-*.wandb")
    data, pos, chunks, records = path.read_bytes(), 7, [], []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def logged(records: list) -> tuple[dict, dict, dict[str, str]]:
    """The run's config, its logged values (last value per key) and the logged tables' files (name → local path)."""
    config, values, files = {}, {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            for item in record.history.item:
                values["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "artifact":  # a logged wandb.Table goes in a run_table artifact, its images beside it
            files |= {entry.path: entry.local_path for entry in record.artifact.manifest.contents}
    return config, values, files


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image).convert("RGB"))


def test_generate_logs_a_wandb_table_offline_in_the_diffusers_autolog_layout(tmp_path):
    out = tmp_path / "out"
    env = offline_env(tmp_path)
    args = ["a red circle", "a blue square | left", "--negative-prompt", "green", "--seed", "11", "--steps", "2"]
    done = pixart("generate", *args, "--sampler", "ddim", "--out", str(out), "--log", "wandb", env=env)
    assert "wandb:" not in done.stderr  # W&B's banner and summary stay quiet without -v
    written = [Path(line) for line in done.stdout.splitlines()]
    assert [p.name for p in written] == ["00000-11.png", "00001-12.png"]
    [run] = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")  # WANDB_DIR wins over the default OUT/logs
    assert not (out / "logs").exists()
    config, values, files = logged(wandb_records(run))

    [call] = config["workflow"]
    assert call["stage"] == "Pipeline-Call-1" and call["pipeline"]["pipeline-name"] == "PixArtPipeline"
    assert call["pipeline"]["model"] == "bundled demo" and call["pipeline"]["device"] == "cpu"
    params = call["params"]
    assert (params["sampler"], params["steps"], params["guidance"], params["seed"]) == ("ddim", 2, 4.5, 11)
    assert (params["negative_prompt"], params["images"], params["batch_size"]) == ("green", 2, 1)
    assert config["command"] == "generate"
    assert values["Timing/load_seconds"] > 0 and values["Timing/steps_per_second"] > 0
    assert values["Timing/seconds_per_image"] == pytest.approx(values["Timing/generation_seconds"] / 2)

    table = json.loads(Path(files["Result-Table/Pipeline-Call-1.table.json"]).read_text())
    assert table["columns"] == ["Prompt", "Negative-Prompt", "Seed", "Sampler", "Steps", "Guidance", "Size", "Model",
                                "Generated-Image"]  # fmt: skip
    size = "x".join(str(n) for n in Image.open(written[0]).size)
    assert [row[:-1] for row in table["data"]] == [
        ["a red circle", "green", 11, "ddim", 2, 4.5, size, "bundled demo"],
        ["a blue square | left", "green", 12, "ddim", 2, 4.5, size, "bundled demo"],
    ]
    for row, png in zip(table["data"], written, strict=True):
        assert row[-1]["_type"] == "image-file"
        assert np.array_equal(pixels(files[row[-1]["path"]]), pixels(png))
    # The media panel's copy (the last image logged under the key) is the last PNG too.
    media = run / "files" / values["Generated-Image/Pipeline-Call-1/path"]
    assert np.array_equal(pixels(media), pixels(written[-1]))
    assert values["Generated-Image/Pipeline-Call-1/caption"] == "a blue square | left"


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = folder.iterdir()
    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


def test_generate_logs_images_settings_and_timings_to_tensorboard(tmp_path):
    out = tmp_path / "out"
    args = ["a red circle", "a blue square | left", "--seed", "3", "--steps", "2", "--num-images", "2"]
    done = pixart("generate", *args, "--batch-size", "2", "--out", str(out), "--log", "tensorboard")
    written = [Path(line) for line in done.stdout.splitlines()]
    events = tensorboard_events(out / "logs")  # the default: next to the images

    tags = [f"Generated-Image/{i:04d}" for i in range(4)]
    assert events.Tags()["images"] == tags
    for tag, png in zip(tags, written, strict=True):
        [image] = events.Images(tag)
        assert np.array_equal(pixels(io.BytesIO(image.encoded_image_string)), pixels(png))

    def text(tag: str) -> list[str]:
        [event] = events.Tensors(f"{tag}/text_summary")  # where torch's add_text puts a text
        return event.tensor_proto.string_val[0].decode().splitlines()

    table = text("Result-Table/Pipeline-Call-1")
    assert table[0] == "| Tag | Prompt | Negative-Prompt | Seed | Sampler | Steps | Guidance | Size | Model |"
    size = "x".join(str(n) for n in Image.open(written[0]).size)
    assert table[2:] == [
        f"| Generated-Image/0000 | a red circle |  | 3 | dpm++ | 2 | 4.5 | {size} | bundled demo |",
        f"| Generated-Image/0001 | a red circle |  | 4 | dpm++ | 2 | 4.5 | {size} | bundled demo |",
        f"| Generated-Image/0002 | a blue square \\| left |  | 5 | dpm++ | 2 | 4.5 | {size} | bundled demo |",
        f"| Generated-Image/0003 | a blue square \\| left |  | 6 | dpm++ | 2 | 4.5 | {size} | bundled demo |",
    ]
    settings = text("Run-Config")
    for line in ["| command | generate |", "| params.sampler | dpm++ |", "| params.images | 4 |",
                 "| params.batch_size | 2 |", "| pipeline.model | bundled demo |", "| params.seed | 3 |"]:  # fmt: skip
        assert line in settings
    scalars = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
    assert scalars["Timing/load_seconds"] > 0 and scalars["Timing/steps_per_second"] > 0
    assert scalars["Timing/seconds_per_image"] == pytest.approx(scalars["Timing/generation_seconds"] / 4, rel=1e-5)


def test_eval_logs_its_scores_to_wandb_under_log_dir(tmp_path):
    env = offline_env(tmp_path)
    done = pixart("-v", "eval", "--prompts", "3", "--steps", "2", "--batch-size", "3", "--json", "--log", "wandb",
                  "--log-dir", str(tmp_path / "logs"), "--wandb-project", "shapes-eval", env=env)  # fmt: skip
    scores = json.loads(done.stdout)
    assert "wandb: Tracking run with wandb" in done.stderr  # -v lets the libraries talk, W&B too
    [run] = (tmp_path / "logs" / "wandb").glob("offline-run-*")  # --log-dir wins over WANDB_DIR
    records = wandb_records(run)
    [project] = {r.run.project for r in records if r.WhichOneof("record_type") == "run"}
    assert project == "shapes-eval"
    config, values, files = logged(records)
    assert config["command"] == "eval" and config["workflow"][0]["params"]["images"] == 3
    assert {k.removeprefix("Eval/"): v for k, v in values.items() if k.startswith("Eval/")} == scores
    table = json.loads(Path(files["Result-Table/Pipeline-Call-1.table.json"]).read_text())
    assert [row[2] for row in table["data"]] == [0, 1, 2]  # image i of the held-out prompts has seed + i


@pytest.mark.parametrize(
    "args, message",
    [
        (["--log-dir", "x"], "--log-dir applies to a log; add --log wandb or --log tensorboard"),
        (["--wandb-project", "p"], "--wandb-project applies to a log; add --log wandb or --log tensorboard"),
        (["--log", "tensorboard", "--wandb-project", "p"], "--wandb-project applies to --log wandb, not --log tens"),
    ],
)
@pytest.mark.parametrize("command", [["generate", "a circle"], ["eval", "--prompts", "2"]])
def test_log_flags_are_refused_without_their_logger(command, args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*command, *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []  # refused before any folder is made


@pytest.mark.parametrize("backend, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_logger_names_its_pip_install_before_any_work(backend, package, tmp_path, monkeypatch, capsys):
    # An install without the package, as Python sees it: a None entry in sys.modules.
    monkeypatch.setitem(sys.modules, package, None)
    assert main(["generate", "a circle", "--out", str(tmp_path / "out"), "--log", backend]) == 2
    assert capsys.readouterr().err == f"error: --log {backend} needs {package}, which is not installed: " \
                                      f"pip install {package}\n"  # fmt: skip
    assert not (tmp_path / "out").exists()  # refused before the output folder is made, let alone the model


def test_wandb_without_an_account_is_refused_before_the_model_loads(tmp_path):
    """Online mode with no API key anywhere (no WANDB_API_KEY, an empty netrc): one line, and no image made."""
    env = {**offline_env(tmp_path), "WANDB_MODE": "online", "NETRC": str(tmp_path / "netrc")}
    (tmp_path / "netrc").write_text("")
    done = pixart("generate", "a circle", "--out", str(tmp_path / "out"), "--log", "wandb", env=env, code=2)
    assert done.stderr.startswith("error: --log wandb could not start a run: ")
    assert done.stderr.endswith("; or set WANDB_MODE=offline to log to local files only\n")
    assert "loading" not in done.stderr and not list((tmp_path / "out").glob("*.png"))
