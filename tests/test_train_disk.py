"""Training checkpoints against the disk: flushed before they are published, a full disk ends the run with one
line and keeps the previous checkpoint, damaged checkpoints are told apart by their manifest and skipped by
``--resume latest``, and an unwritable run folder is refused before anything loads.

The disk faults are real: a small tmpfs (ENOSPC; needs root and a kernel that lets us mount) and a file size
limit (RLIMIT_FSIZE, EFBIG) on a real ``pixart train`` process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pixart.cli import main as cli_main
from test_train import ENV, assert_same_finals, overrides, run_in_process, weights

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA = ["--schedule.max_steps=12", "--checkpoint.every=4", "--checkpoint.keep_last=3", "--optim.ema_decay=0.9"]
STEP = [f"step-{n:08d}" for n in (4, 8, 12)]


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> Path:
    """A run that never stopped: checkpoints at steps 4, 8 and 12, final and final-ema."""
    return run_in_process(setup, tmp_path_factory.mktemp("finished") / "run", *EXTRA)


def copy_run(finished: Path, out: Path, without_step_12: bool = False) -> Path:
    """The finished run's checkpoints (not its final weights) in ``out``, as a run stopped after step 12 (or 8)."""
    shutil.copytree(finished / "checkpoints", out / "checkpoints")
    if without_step_12:
        shutil.rmtree(out / "checkpoints" / STEP[2])
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_checkpoint_lists_each_file_s_size_and_sha256(finished):
    for name in STEP:
        folder = finished / "checkpoints" / name
        manifest = json.loads((folder / "manifest.json").read_text())["files"]
        files = {p.name for p in folder.iterdir()} - {"manifest.json"}
        assert set(manifest) == files and "trainable.safetensors" in files
        for file in files:
            assert manifest[file] == {"size": (folder / file).stat().st_size, "sha256": sha256(folder / file)}


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_last_byte(path: Path) -> None:
    """One bit of the last tensor's data: the file still loads, only its hash tells it from the original."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm, reason", [(truncate, "has 241452 bytes, the manifest says 482904"),
                                          (flip_last_byte, "does not match its SHA-256 in the manifest")],
                         ids=["truncated", "flipped"])  # fmt: skip
def test_resume_latest_skips_a_damaged_checkpoint(setup, finished, tmp_path, caplog, capsys, harm, reason):
    run = copy_run(finished, tmp_path / "run")
    damaged = run / "checkpoints" / STEP[2]
    harm(damaged / "trainable.safetensors")

    # Named by path, a damaged checkpoint is refused in one line rather than loaded.
    capsys.readouterr()
    code = cli_main(["train", "debug", *overrides(setup, run, *EXTRA, f"--run.resume={damaged}")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == f"error: resume='{damaged}': damaged checkpoint (trainable.safetensors {reason}); " + (
        "pass 'latest' or another step-N folder\n"
    )

    # Resumed as 'latest', it is skipped with one warning and the run goes on from step 8 to the same end.
    with caplog.at_level(logging.INFO):
        run_in_process(setup, run, *EXTRA, "--run.resume=latest")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"--resume latest: skipping damaged checkpoint {damaged} (trainable.safetensors {reason})"]
    assert any(m.startswith(f"resumed from {run / 'checkpoints' / STEP[1]} at step 8 (") for m in caplog.messages)
    assert_same_finals(finished, run)
    assert weights(damaged / "trainable.safetensors").keys()  # rewritten whole at step 12


def test_checkpoint_written_before_manifests_still_resumes(setup, finished, tmp_path, caplog):
    run = copy_run(finished, tmp_path / "run")
    for name in STEP:
        (run / "checkpoints" / name / "manifest.json").unlink()
    with caplog.at_level(logging.INFO):
        run_in_process(setup, run, *EXTRA, "--run.resume=latest")
    assert any(m.startswith(f"resumed from {run / 'checkpoints' / STEP[2]} at step 12 (") for m in caplog.messages)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert_same_finals(finished, run)


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("fault", ["full-tmpfs", "file-size-limit"])
def test_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous(setup, finished, tmp_path, fault):
    mount = tmp_path / "disk"
    limit = None
    if fault == "full-tmpfs":
        mount_tmpfs(mount, "64m")
    try:
        run = copy_run(finished, mount / "run", without_step_12=True)
        checkpoint = sum(p.stat().st_size for p in (finished / "checkpoints" / STEP[2]).iterdir())
        if fault == "full-tmpfs":  # room for half a checkpoint more
            room = shutil.disk_usage(mount).used + checkpoint // 2
            subprocess.run(["mount", "-o", f"remount,size={room}", str(mount)], check=True)
        else:  # smaller than trainable.safetensors, larger than the files written before it
            limit = (finished / "checkpoints" / STEP[2] / "trainable.safetensors").stat().st_size // 2
        before = {p: sha256(p) for p in (run / "checkpoints" / STEP[1]).iterdir()}
        args = overrides(setup, run, *EXTRA, "--run.resume=latest")
        command = [sys.executable, "-m", "pixart", "train", "debug", *args]
        done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=240,
                              preexec_fn=limit_file_size(limit) if limit else None)  # fmt: skip
        what = "disk full" if fault == "full-tmpfs" else "file size limit hit"
        folder = run / "checkpoints"
        last = done.stderr.splitlines()[-1]
        assert done.returncode == 2, done.stderr[-3000:]
        assert last.startswith(f"error: {what} while writing checkpoint {STEP[2]} in {folder} ("), done.stderr
        assert last.endswith(f" free); the previous checkpoint {STEP[1]} is intact"), last
        assert "Traceback" not in done.stderr
        assert sorted(p.name for p in folder.iterdir()) == STEP[:2]  # no temporary folder left
        assert {p: sha256(p) for p in (folder / STEP[1]).iterdir()} == before
        assert not (run / "final.safetensors").exists()
    finally:
        if fault == "full-tmpfs":
            subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_unwritable_output_dir_is_refused_before_anything_loads(setup, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the run folder should be")
    out = blocker if where == "a-file" else blocker / "run"
    reason = "File exists" if where == "a-file" else "Not a directory"
    # A feature cache that does not exist: refusing the folder first shows that nothing was opened before.
    capsys.readouterr()
    code = cli_main(["train", "debug", *overrides(setup, out, f"--data.cache={tmp_path / 'no-cache'}")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == f"error: run.output_dir='{out}' is not a folder this process can write to ({reason}); " + (
        "pass a writable folder\n"
    )


def test_checkpoint_files_and_folder_reach_the_disk_before_the_rename_that_publishes_them(setup, tmp_path, monkeypatch):
    """Watches the real os.fsync and os.replace calls (each still runs) of a one-checkpoint run."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        calls.append(("replace", str(src), str(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = run_in_process(setup, tmp_path / "run", "--schedule.max_steps=2", "--checkpoint.every=2")
    folder = run / "checkpoints"
    final, tmp = folder / "step-00000002", folder / ".tmp-step-00000002"
    publish = calls.index(("replace", str(tmp), str(final)))
    synced_before = {c[1] for c in calls[:publish] if c[0] == "fsync"}
    assert {str(tmp / p.name) for p in final.iterdir()} | {str(tmp)} <= synced_before
    assert ("fsync", str(folder)) in calls[publish + 1 :]  # the rename itself
    # final.safetensors through atomic_write: its temporary file before its rename, the run folder after.
    [(_, src, _)] = [c for c in calls if c[0] == "replace" and c[2] == str(run / "final.safetensors")]
    assert calls.index(("fsync", src)) < calls.index(("replace", src, str(run / "final.safetensors")))
    assert ("fsync", str(run)) in calls[calls.index(("replace", src, str(run / "final.safetensors"))) :]


def test_full_disk_while_writing_the_final_weights_is_one_line(setup, finished, tmp_path):
    """A run resumed at its last step only writes final-ema and final: the disk fills up during the first."""
    mount = tmp_path / "disk"
    mount_tmpfs(mount, "64m")
    try:
        run = copy_run(finished, mount / "run")
        room = shutil.disk_usage(mount).used + (finished / "final-ema.safetensors").stat().st_size // 2
        subprocess.run(["mount", "-o", f"remount,size={room}", str(mount)], check=True)
        args = overrides(setup, run, *EXTRA, "--run.resume=latest")
        done = subprocess.run([sys.executable, "-m", "pixart", "train", "debug", *args], capture_output=True, text=True,
                              env=ENV, timeout=240)  # fmt: skip
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        last = done.stderr.splitlines()[-1]
        assert last.startswith(f"error: disk full while writing the final weights in {run} ("), last
        assert last.endswith(f" free); the previous checkpoint {STEP[2]} is intact"), last
        assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # no half-written or temporary file
    finally:
        subprocess.run(["umount", str(mount)], check=True)
