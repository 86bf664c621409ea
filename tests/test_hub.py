"""The one hub resolver and its callers: local folders in place, hub ids from the cache, one-line errors offline.

Nothing here reaches the network: hub calls run in a fresh interpreter with HF_HUB_OFFLINE=1 and a HF_HOME
of our own, where huggingface_hub's real snapshot_download either finds our cached copy or fails.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pixart.checkpoints.export import export_pipeline
from pixart.checkpoints.hub import resolve_pipeline
from pixart.errors import PixArtError
from pixart.inference.pipeline import resolve_model
from pixart.train import cache

HUB_ID = "PixArt-alpha/PixArt-XL-2-1024-MS"
HUB_ID_RE = re.compile(r"PixArt-alpha/[\w.-]+")  # the releases' owner: other words of a command are no hub ids

# Each caller's hub path, printing the error (or the folder) it ends with.
CALLERS = """
import sys
from pixart.errors import PixArtError
from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.export import export_pipeline
from pixart.inference.pipeline import resolve_model
from pixart.train.cache import resolve_model as cache_model

source = sys.argv[1]
calls = {
    "generate": lambda: resolve_model(source),
    "cache": lambda: cache_model(source),
    "export": lambda: export_pipeline(source, "unused.pth", "out"),
    "convert": lambda: load_transformer(source),
}
for name, call in calls.items():
    try:
        print(name, "->", call())
    except PixArtError as err:
        print(name, "error:", err)
"""


def run_callers(source: str, hf_home: Path, cwd: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    done = subprocess.run(
        [sys.executable, "-c", CALLERS, source], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4, done.stdout  # one line each
    return dict(line.split(" ", 1) for line in lines)


def test_offline_hub_id_without_a_cached_copy_is_one_error_for_every_caller(tmp_path):
    results = run_callers(HUB_ID, tmp_path / "hf-home", tmp_path)
    for name, result in results.items():
        assert result == (
            f"error: cannot fetch {HUB_ID!r}: the hub is unreachable (offline?) and it is not cached; "
            "connect and retry, or pass a local path"
        ), name
    file_id = f"{HUB_ID}/PixArt-XL-2-1024-MS.pth"
    convert = run_callers(file_id, tmp_path / "hf-home", tmp_path)["convert"]
    assert convert.startswith(f"error: cannot fetch {file_id!r}: the hub is unreachable (offline?)")
    assert not (tmp_path / "out").exists()


def test_offline_hub_id_with_a_cached_copy_resolves_to_it(tmp_path):
    # The hub cache's own layout: refs/main names the snapshot folder of the cached files.
    repo = tmp_path / "hf-home" / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (snapshot / "text_encoder").mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    results = run_callers(HUB_ID, tmp_path / "hf-home", tmp_path)
    assert results["generate"] == results["cache"] == f"-> {snapshot}"
    # export reads the cached base and stops at the first part the snapshot lacks; convert finds no transformer.
    assert results["export"].startswith(f"error: base {HUB_ID!r} has no tokenizer, text_encoder, vae, scheduler")
    assert results["convert"].startswith(f"error: hub model {HUB_ID!r} has no diffusers transformer")


def test_local_folders_are_used_in_place(tmp_path, monkeypatch):
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    (indexed / "model_index.json").write_text("{}")
    parts = tmp_path / "parts"
    (parts / "text_encoder").mkdir(parents=True)
    assert resolve_pipeline(indexed, []) == indexed and resolve_model(parts) == parts
    monkeypatch.chdir(tmp_path)
    assert cache.resolve_model("indexed") == indexed  # absolute: the cache manifest records it


@pytest.mark.parametrize("name", ["empty", "file.txt"])
def test_a_local_path_that_is_no_pipeline_folder_is_refused(tmp_path, name):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    path = str(tmp_path / name)
    with pytest.raises(PixArtError, match=rf"^model '{path}' is not a diffusers pipeline folder"):
        resolve_model(path)
    with pytest.raises(PixArtError, match=rf"^base '{path}' is not a diffusers pipeline folder"):
        export_pipeline(path, "unused.pth", tmp_path / "out")


@pytest.mark.parametrize("source", ["./missing", "/no/such/folder", "a/b/c", "owner/"])
def test_neither_a_folder_nor_a_hub_id(source):
    with pytest.raises(PixArtError, match=rf"^model '{source}' is neither an existing folder nor a hub id such as"):
        cache.resolve_model(source)


def test_readme_lists_every_release_with_a_command_that_names_it():
    from pixart.checkpoints.hub import HUB_FILE, RELEASES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Every released checkpoint", 1)[1].split("\n\n- ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`pixart generate" in line]
    commands = [row.split("`")[1] for row in rows]
    words = [word for command in commands for word in command.split()]
    named = {word for word in words if HUB_ID_RE.fullmatch(word) or HUB_FILE.fullmatch(word)}
    assert named == set(RELEASES)  # every release has a row, and every row names only releases
    assert all(command.startswith('pixart generate "') for command in commands)
    assert sum("--model" not in command for command in commands) == 1  # only the bundled demo needs no model
