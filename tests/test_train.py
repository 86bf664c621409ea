"""The trainer end to end on tiny real models: learning, 1 vs 2 processes, kill and resume, config errors, CLI.

Runs use one intra-op thread everywhere (in this process and in subprocesses): bit-identical resume needs
the same float reductions on both sides, and 2-thread OpenMP on a busy 2-core machine is ~20× slower.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pixart.checkpoints.convert import load_transformer
from pixart.cli import main as cli_main
from pixart.errors import PixArtError
from pixart.model.config import preset
from pixart.model.transformer import PixArtTransformer
from pixart.train.cache import open_cache
from pixart.train.config import load_config, recipe_names
from pixart.train.diffusion import GaussianDiffusion
from pixart.train.loop import train
from pixart.train.objective import sample_generator
from pixart.train.state import complete_checkpoints, find_checkpoint
from test_files import assert_plain_modes
from test_model import saved_for_backward
from tiny import save_pipeline

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(setup, out: Path, *extra: str) -> list[str]:
    _, pipe, _, cache = setup
    return [
        f"--model.pipeline={pipe}",
        f"--data.cache={cache}",
        "--data.image_size=256",
        f"--run.output_dir={out}",
        "--logging.progress=false",
        *extra,
    ]


def run_in_process(setup, out: Path, *extra: str) -> Path:
    return train(load_config("debug", overrides(setup, out, *extra)))


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixart", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with 2 CPU processes (accelerate joins them with gloo) running args."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    return subprocess.run([*launch, *args], capture_output=True, text=True, env=ENV, timeout=300)


def assert_same_finals(straight: Path, resumed: Path) -> None:
    """final and final-ema of a resumed run are bit-identical to those of an uninterrupted run."""
    for name in ("final.safetensors", "final-ema.safetensors"):
        a, b = weights(straight / name), weights(resumed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def fixed_loss(model: PixArtTransformer, cache: Path) -> float:
    """The training loss over the cached set at fixed timesteps and noise (independent of the trainer)."""
    data = open_cache(cache)
    batch, _ = data.load_batch(1.0, data.groups[1.0], [False] * len(data.groups[1.0]))
    diffusion, gen = GaussianDiffusion(), torch.Generator().manual_seed(123)
    x0 = batch["latent_mean"] * data.scaling_factor
    total = 0.0
    with torch.no_grad():
        for t_value in (50, 250, 500, 750, 950):
            t = torch.full((len(x0),), t_value)
            noise = torch.randn(x0.shape, generator=gen)
            xt = diffusion.q_sample(x0, t, noise)
            out = model(xt, t, batch["text_features"], batch["text_mask"], batch["resolution"], batch["aspect_ratio"])
            total += diffusion.training_loss(out, x0, xt, t, noise)["mse"].mean().item()
    return total / 5


def test_loss_falls_on_a_fixed_tiny_set(setup, tmp_path):
    cache = setup[3]
    torch.manual_seed(0)  # the trainer's from-scratch init for seed 0
    before = fixed_loss(PixArtTransformer(preset("debug-alpha")).eval(), cache)
    run = run_in_process(setup, tmp_path / "run", "--schedule.max_steps=40", "--checkpoint.every=0")
    after = fixed_loss(load_transformer(run / "final.safetensors"), cache)
    assert after < 0.7 * before, (before, after)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_two_processes_match_one_process(setup, tmp_path):
    common = ["--schedule.max_steps=3", "--data.batch_size=4", "--optim.grad_accum=2", "--checkpoint.every=0"]
    one = run_in_process(setup, tmp_path / "one", *common)
    result = torchrun("-m", "pixart", "train", "debug", *overrides(setup, tmp_path / "two", *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    a, b = weights(one / "final.safetensors"), weights(tmp_path / "two" / "final.safetensors")
    assert a.keys() == b.keys()
    torch.manual_seed(0)  # the trainer's from-scratch init for seed 0: unseeded, any draw differs from a
    start = PixArtTransformer(preset("debug-alpha")).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
use_cpu: true
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: NO_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def test_fsdp_config_on_cpus_is_refused_not_run_as_ddp(setup, tmp_path):
    """FSDP cannot be tested on CPUs: accelerate (1.15) turns FSDP on only for GPU-like devices and runs CPU
    processes under an FSDP config as DDP (torch's own fully_shard does work on CPU with gloo). So the
    trainer refuses, and this checks it does, through a real `accelerate launch` with an FSDP config file."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--main_process_port", free_port(), "-m", "pixart", "train", "debug"]
    result = subprocess.run(
        [*launch, *overrides(setup, tmp_path / "run", "--schedule.max_steps=2", "--data.batch_size=4")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    # Each process prints the one-line error (the lines may interleave) and exits 2; the launcher then fails.
    message = "error: the accelerate config asks for FSDP, but accelerate shards only on GPUs"
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert "pixart/train.py" not in result.stderr  # no traceback through our code
    assert "training" not in result.stderr and not (tmp_path / "run" / "final.safetensors").exists()


def kill_after_first_checkpoint(setup, run_dir: Path, *extra: str) -> list[Path]:
    """Start `pixart train debug` as a real process, SIGKILL it once a checkpoint is complete; its checkpoints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixart", "train", "debug", *overrides(setup, run_dir, *extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 240
        while not complete_checkpoints(run_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    found = complete_checkpoints(run_dir)
    assert found and not (run_dir / "final.safetensors").exists(), "the run must die between checkpoints"
    return found


def test_killed_run_resumes_bit_identically(setup, tmp_path):
    extra = ["--schedule.max_steps=40", "--checkpoint.every=4", "--checkpoint.keep_last=2", "--optim.ema_decay=0.9"]
    extra += ["--schedule.warmup_steps=5", "--schedule.lr_schedule=cosine", "--diffusion.snr_gamma=5"]
    killed = tmp_path / "killed"
    found = kill_after_first_checkpoint(setup, killed, *extra)
    # The folder layout that earlier runs wrote too, so their checkpoints resume (docs/design.md), + the manifest.
    layout = ["ema.safetensors", "lr_schedule.pt", "manifest.json", "optimizer.pt", "rng-0.pt", "state.json"]
    layout += ["trainable.safetensors"]
    assert sorted(p.name for p in found[-1].iterdir()) == layout
    saved = json.loads((found[-1] / "state.json").read_text())
    assert [*saved] == ["step", "epoch", "batch", "num_processes", "config"]
    assert found[-1].name == f"step-{saved['step']:08d}"
    # A checkpoint interrupted while being written leaves a temporary folder; resume must not use it.
    fake = killed / "checkpoints" / ".tmp-step-00000039"
    fake.mkdir(exist_ok=True)
    (fake / "state.json").write_text('{"step": 39}')
    assert find_checkpoint(killed, "latest") == found[-1]

    run_in_process(setup, killed, *extra, "--run.resume=latest")
    straight = run_in_process(setup, tmp_path / "straight", *extra)
    assert_same_finals(straight, killed)
    # Rotation: only the newest keep_last=2 checkpoints remain.
    assert [p.name for p in complete_checkpoints(straight)] == ["step-00000036", "step-00000040"]
    assert [p.name for p in complete_checkpoints(killed)] == ["step-00000036", "step-00000040"]
    assert not list((killed / "checkpoints").glob(".tmp-*"))  # the next checkpoint swept the leftovers
    assert_plain_modes(straight)  # checkpoints with their EMA weights, final and final-ema


@pytest.mark.parametrize("adapters", [[], ["--lora.rank=4"]], ids=["full", "lora"])
def test_killed_lcm_run_resumes_bit_identically(setup, tmp_path, capsys, adapters):
    """LCM distillation keeps a target network (an EMA of the student) that checkpoints must carry."""
    pipe = setup[1]
    extra = [f"--model.source={pipe}", "--model.preset=", "--lcm.enabled=true", "--diffusion.caption_dropout=0"]
    extra += ["--schedule.max_steps=12", "--checkpoint.every=4", "--optim.ema_decay=0.9", *adapters]
    killed = tmp_path / "killed"
    found = kill_after_first_checkpoint(setup, killed, *extra)
    layout = {"lr_schedule.pt", "manifest.json", "optimizer.pt", "rng-0.pt", "state.json"}
    assert {p.name for p in found[-1].iterdir()} == layout | {
        f"{name}.safetensors" for name in ("trainable", "ema", "target")
    }
    trained, target = (weights(found[-1] / f"{name}.safetensors") for name in ("trainable", "target"))
    assert target.keys() == trained.keys()  # only the copies of what trains; the rest is the frozen source
    assert any(not torch.equal(trained[k], target[k]) for k in trained)  # the target lags the student

    # A checkpoint without the target (an LCM run before targets were saved) is refused, not resumed.
    old = tmp_path / "old" / found[-1].name
    shutil.copytree(found[-1], old)
    (old / "target.safetensors").unlink()
    (old / "manifest.json").unlink()  # such checkpoints predate manifests too (with one, it would be "damaged")
    capsys.readouterr()
    code = cli_main(["train", "debug", *overrides(setup, tmp_path / "old", *extra, f"--run.resume={old}")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: checkpoint {old} has no LCM target network (target.safetensors)"), err

    run_in_process(setup, killed, *extra, "--run.resume=latest")
    straight = run_in_process(setup, tmp_path / "straight", *extra)
    assert_same_finals(straight, killed)
    a, b = (weights(complete_checkpoints(run)[-1] / "target.safetensors") for run in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_plain_modes(straight)


def test_lora_from_images_with_came_trains_only_adapters(setup, tmp_path):
    root, pipe, images, _ = setup
    source = tmp_path / "base.safetensors"
    from pixart.checkpoints.ours import save_pixart

    torch.manual_seed(1)
    base_model = PixArtTransformer(preset("debug-alpha"))
    with torch.no_grad():  # as if pretrained: the zero-initialised output layer would block every gradient
        for p in base_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_pixart(base_model, source)
    config = load_config(
        "debug",
        [
            f"--model.source={source}",
            "--model.preset=",
            f"--model.pipeline={pipe}",
            f"--data.dataset={images}",
            "--data.image_size=256",
            f"--run.output_dir={tmp_path / 'run'}",
            "--schedule.max_steps=2",
            "--lora.rank=4",
            "--lora.targets=attn",
            "--logging.progress=false",
            "--validation.prompts=a red square",
            "--validation.steps=2",
            "--logging.tensorboard=true",
            "--optim.optimizer=came",
        ],
    )
    run = train(config)
    trained = weights(run / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert trained and all(".lora_" in k for k in trained)
    assert (run / "final-lora").is_dir()
    base, merged = weights(source), load_transformer(run / "final.safetensors").state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".attn.qkv." in k or ".attn.proj." in k for k in changed)
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-00000002-0.png"]
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # TensorBoard scalars
    assert_plain_modes(run)  # checkpoint, final weights, final-lora/ and config.json alike


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_logs_to_the_configured_project_and_tensorboard_keeps_its_folder(setup, tmp_path, monkeypatch):
    """A real offline W&B run: logging.wandb_project names its project; TensorBoard still writes to logs/pixart."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    project = "pixart-project-from-config"
    extra = ["--schedule.max_steps=2", "--checkpoint.every=0", "--logging.every=1", "--logging.tensorboard=true"]
    run = run_in_process(setup, tmp_path / "run", *extra, "--logging.wandb=true", f"--logging.wandb_project={project}")
    [offline] = (tmp_path / "wandb").glob("offline-run-*")
    [records] = offline.glob("run-*.wandb")
    # The run record's project field. W&B's service process writes the record file on its own schedule, and on a
    # loaded machine it may still be flushing after the run returned: wait for it, boundedly.
    deadline = time.monotonic() + 60
    while project.encode() not in records.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert project.encode() in records.read_bytes()
    assert f"finishing run {project}/" in (offline / "logs" / "debug.log").read_text()
    assert list((run / "logs" / "pixart").glob("events.out.tfevents.*"))
    import wandb

    wandb.teardown()  # stop the W&B service this test process started, so no later test shares or outlives it


def test_sample_randomness_depends_only_on_seed_step_and_index():
    a = torch.randn(3, generator=sample_generator(0, 5, 2))
    assert torch.equal(a, torch.randn(3, generator=sample_generator(0, 5, 2)))
    for other in [(1, 5, 2), (0, 6, 2), (0, 5, 3)]:
        assert not torch.equal(a, torch.randn(3, generator=sample_generator(*other)))


def test_config_files_overrides_and_types(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nsource = "m.safetensors"\n[data]\ndataset = "imgs"\n'
        "[optim]\nlr = 1\nbetas = [0.9, 0.99]\n[lora]\nrank = 8\n"
    )
    config = load_config(path, ["--optim.weight_decay=0", "--lora.targets=attn,cross_attn", "--logging.wandb=yes"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.betas == [0.9, 0.99] and config.optim.weight_decay == 0.0
    assert config.lora.targets == ["attn", "cross_attn"] and config.logging.wandb is True
    debug = load_config("debug", ["--model.pipeline=pipe", "--data.dataset=images"])  # a shipped recipe by name
    assert debug.model.preset == "debug-alpha" and debug.data.dataset == "images"
    assert {"pokemon", "pokemon-lora", "scratch", "dreambooth-lora"} <= set(recipe_names())
    for recipe in set(recipe_names()) - {"debug"}:  # debug needs a pipeline folder, loaded above
        load_config(recipe)  # every shipped recipe is valid as it stands
    path.write_text('[optim]\nlr = "fast"\n')
    with pytest.raises(PixArtError, match=r"^optim.lr='fast': expected a number$"):
        load_config(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lrr=1"], "unknown key optim.'lrr'; known keys of [optim]: optimizer, lr,"),
        (["--optim.lr=fast"], "optim.lr='fast': expected a number"),
        (["--optim.lr=-1e-4"], "optim.lr=-0.0001: expected a positive number"),
        (["--schedule.max_steps=2.5"], "schedule.max_steps='2.5': expected an integer"),
        (["--optim.optimizer=sgd"], "optim.optimizer='sgd': expected one of adamw, came"),
        (["--colour.key=1"], "unknown section 'colour'"),
        (["--data.dataset=/no/such/folder"], "dataset '/no/such/folder' not found"),
        (["--optim.mixed_precision=fp16"], "optim.mixed_precision='fp16' needs a GPU"),
        (["--resume", "/no/such/checkpoint"], "resume='/no/such/checkpoint': not a checkpoint folder"),
        (["--logging.wandb=true"], "logging.wandb=true needs wandb: pip install wandb"),
    ],
)
def test_bad_config_inputs_give_one_line(args, message, tmp_path, capsys, monkeypatch):
    # An install without wandb, as most users have: a None entry in sys.modules is what Python reads as "not there".
    monkeypatch.setitem(sys.modules, "wandb", None)
    base = [f"--model.pipeline={tmp_path}", f"--data.dataset={tmp_path}", f"--run.output_dir={tmp_path}"]
    code = cli_main(["train", "debug", *base, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_cli_help_and_bad_input_as_real_processes(tmp_path):
    helped = cli("train", "--help")
    assert helped.returncode == 0 and "--section.key=value" in helped.stdout and "pokemon-lora" in helped.stdout
    bad = cli("train", "no-such-recipe")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: config 'no-such-recipe' is neither a TOML file nor a shipped recipe")
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_cache_of_another_text_encoder_is_refused(setup, tmp_path, capsys):
    other = save_pipeline(tmp_path / "other", "alpha", seed=1)
    capsys.readouterr()
    code = cli_main(["train", "debug", *overrides(setup, tmp_path / "run", f"--model.pipeline={other}")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: feature cache") and "is stale: text_encoder is" in err


def test_gradient_checkpointing_keeps_the_result(setup, tmp_path):
    """model.gradient_checkpointing=true trains to the same weights while keeping far fewer activations."""
    finals, saved = [], []
    for name, checkpointing in (("plain", "false"), ("ckpt", "true")):
        with saved_for_backward() as sizes:
            run = run_in_process(setup, tmp_path / name, "--schedule.max_steps=3", "--data.batch_size=4",
                                 f"--model.gradient_checkpointing={checkpointing}")  # fmt: skip
        finals.append(weights(run / "final.safetensors"))
        saved.append(sum(sizes))
    plain, checkpointed = finals
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    torch.manual_seed(0)  # the trainer's from-scratch init for seed 0
    start = PixArtTransformer(preset("debug-alpha")).state_dict()
    assert any(not torch.equal(plain[k], start[k]) for k in plain)  # training moved the weights
    assert saved[1] < saved[0] / 2, saved  # the blocks' activations were recomputed, not kept


def test_cached_and_uncached_training_agree(setup, tmp_path):
    """Features from the cache and from running the VAE and T5 during training are the same inputs."""
    common = ["--schedule.max_steps=2", "--data.batch_size=4"]
    cached = run_in_process(setup, tmp_path / "cached", *common)
    uncached = run_in_process(setup, tmp_path / "uncached", *common, "--data.cache=", f"--data.dataset={setup[2]}")
    other_noise = run_in_process(setup, tmp_path / "seed1", *common, "--run.seed=1")
    a, b = weights(cached / "final.safetensors"), weights(uncached / "final.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    c = weights(other_noise / "final.safetensors")
    assert any(not torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6) for k in a)  # the comparison can fail
