"""DMD distillation: the losses against DMD's formulas, exact resume, 1 vs 2 processes, and the student sampled by
``pixart generate --sampler dmd``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from pixart.checkpoints.convert import load_transformer
from pixart.checkpoints.ours import save_pixart
from pixart.errors import PixArtError
from pixart.model.text import TextEncoder
from pixart.model.transformer import PixArtTransformer
from pixart.train.config import load_config
from pixart.train.diffusion import GaussianDiffusion
from pixart.train.dmd import (
    classifier_loss,
    dissimilarity,
    distribution_matching_loss,
    fake_score_loss,
    ssim_distance,
    ssim_map,
)
from pixart.train.loop import setup as setup_run
from pixart.train.loop import train
from pixart.train.objective import DiffusionObjective
from pixart.train.state import complete_checkpoints
from test_lcm import toy
from test_train import cli, overrides, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")


def dmd_overrides(setup, out: Path, *extra: str) -> list[str]:
    """A DMD run of the tiny α pipeline on its 8 cached images: 8 teacher pairs of 2 dpm++ steps."""
    pipe = setup[1]
    dmd = [f"--model.source={pipe}", "--model.preset=", "--dmd.enabled=true", "--dmd.num_pairs=8"]
    dmd += ["--dmd.pair_steps=2", "--diffusion.caption_dropout=0", "--data.batch_size=4"]
    return overrides(setup, out, *dmd, *extra)


def test_distribution_matching_gradient_is_dmds():
    """d loss / dx = (μ_fake − μ_real) / mean|x − μ_real| / (C·h·w), written out in numpy from the paper."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, 4, generator=gen).requires_grad_(True)
    noise, t = torch.randn(3, 4, 4, 4, generator=gen), torch.tensor([20, 500, 980])
    text = (torch.full((3, 5, 2), 0.3), torch.ones(3, 5, dtype=torch.long))
    null = (torch.full((3, 5, 2), -0.2), torch.ones(3, 5, dtype=torch.long))
    loss = distribution_matching_loss(x, toy(1.1), toy(0.7), GaussianDiffusion(), t, noise, text, null, 4.5)
    loss.sum().backward()

    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()].reshape(-1, 1, 1, 1)
    xn, nn = x.detach().double().numpy(), noise.double().numpy()
    xt = np.sqrt(ab) * xn + np.sqrt(1 - ab) * nn
    cond, uncond = 1.1 * xt * 0.3, 1.1 * xt * -0.2
    mu_real = (xt - np.sqrt(1 - ab) * (uncond + 4.5 * (cond - uncond))) / np.sqrt(ab)
    mu_fake = (xt - np.sqrt(1 - ab) * 0.7 * xt * 0.3) / np.sqrt(ab)
    weight = np.abs(xn - mu_real).mean(axis=(1, 2, 3), keepdims=True)
    expected = (mu_fake - mu_real) / weight / 64
    np.testing.assert_allclose(x.grad.double().numpy(), expected, rtol=1e-4, atol=1e-9)


def test_fake_equal_to_real_gives_no_gradient(setup):
    """Unguided, a fake score equal to the real one matches the student's distribution: no DM gradient at all."""
    teacher = load_transformer(setup[1]).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=gen).requires_grad_(True)
    noise, t = torch.randn(2, 4, 32, 32, generator=gen), torch.tensor([100, 700])
    text = (torch.randn(2, 16, 32, generator=gen), torch.ones(2, 16, dtype=torch.long))
    null = (torch.zeros(2, 16, 32), torch.ones(2, 16, dtype=torch.long))
    micro = torch.tensor([[256.0, 256.0]]), torch.tensor([1.0])  # the tiny α has micro-conditions
    score = lambda x, t, f, m: teacher(x, t, f, m, *micro)  # noqa: E731
    loss = distribution_matching_loss(x, score, score, GaussianDiffusion(), t, noise, text, null, 1.0)
    loss.sum().backward()
    assert torch.count_nonzero(x.grad) == 0
    # With guidance the real score moves away from the unguided fake one, and the gradient is not zero.
    x.grad = None
    distribution_matching_loss(x, score, score, GaussianDiffusion(), t, noise, text, null, 4.5).sum().backward()
    assert x.grad.abs().sum() > 0


def test_fake_score_learns_from_the_student_output_detached():
    x = torch.randn(2, 4, 4, 4).requires_grad_(True)
    w = torch.tensor(0.5, requires_grad=True)
    fake = lambda x, t, f, m: w * x  # noqa: E731
    text = (torch.ones(2, 3, 2), torch.ones(2, 3, dtype=torch.long))
    loss = fake_score_loss(fake, GaussianDiffusion(), x, torch.tensor([10, 900]), torch.randn(2, 4, 4, 4), text)
    loss.sum().backward()
    assert x.grad is None and w.grad is not None and w.grad != 0


def test_one_pass_trains_the_fake_score_only_and_the_student_only_through_dmd(setup, tmp_path):
    """Inside the DM pass the fake score's loss reaches the fake score alone; the pass's own loss then reaches the
    student alone (the teacher and fake score judge it without gradients)."""
    run = setup_run(load_config("debug", dmd_overrides(setup, tmp_path / "run")))
    state = run.state
    objective, student = state.objective, run.accelerator.unwrap_model(state.model)
    batch = next(iter(run.loader.epoch(0)))
    loss = objective.loss(state.model, batch, 0, 0)
    assert all(p.grad is None for p in student.parameters())
    fake_grads = {n: p.grad.clone() for n, p in objective.fake.named_parameters() if p.grad is not None}
    assert fake_grads and any(g.abs().sum() > 0 for g in fake_grads.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(torch.equal(p.grad, fake_grads[n]) for n, p in objective.fake.named_parameters() if p.grad is not None)
    assert all(p.grad is None for p in objective.teacher.parameters())


def resume_copy(setup, straight: Path, checkpoint: Path, resumed: Path, *options: str) -> tuple[Path, int]:
    """Resume, in a new run folder, from a copy of ``checkpoint`` of the run ``straight`` and its teacher pairs; the
    folder and the pairs' modification time before the resumed run."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    shutil.copy(straight / "dmd-pairs.safetensors", resumed / "dmd-pairs.safetensors")
    pairs_made = (resumed / "dmd-pairs.safetensors").stat().st_mtime_ns
    train(load_config("debug", dmd_overrides(setup, resumed, *options, "--run.resume=latest")))
    return resumed, pairs_made


def assert_same_weights(a_run: Path, b_run: Path, *names: str) -> None:
    for name in names:
        a, b = load_file(str(a_run / name)), load_file(str(b_run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_is_exact_and_pairs_are_kept(setup, tmp_path, capsys):
    """A run resumed from its step-3 checkpoint (fake score and its optimizer included) ends bit-identical; making
    the pairs shows a progress bar, reusing them does not."""
    steps = ["--schedule.max_steps=6", "--checkpoint.every=3", "--checkpoint.keep_last=2"]
    shown = "--logging.progress=true"  # the suite's runs hide their bars
    straight = train(load_config("debug", dmd_overrides(setup, tmp_path / "straight", *steps, shown)))
    made = capsys.readouterr().err
    assert "teacher pairs: 100%" in made and "8/8" in made
    first = complete_checkpoints(straight)[0]
    assert {p.name for p in first.glob("*.safetensors")} == {
        "trainable.safetensors", "fake.safetensors", "fake_optimizer.safetensors"
    }  # fmt: skip
    assert len(load_file(str(first / "fake_optimizer.safetensors"))) > 0
    resumed, pairs_made = resume_copy(setup, straight, first, tmp_path / "resumed", *steps, shown)
    assert (resumed / "dmd-pairs.safetensors").stat().st_mtime_ns == pairs_made  # the same settings: reused
    assert "teacher pairs" not in capsys.readouterr().err
    assert_same_weights(straight, resumed, "final.safetensors", "checkpoints/step-00000006/fake.safetensors")
    teacher = load_transformer(setup[1]).state_dict()
    student = load_transformer(straight / "final.safetensors").state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # it trained


def test_a_finished_run_continued_to_more_steps_is_the_longer_run(setup, tmp_path):
    """demo-dmd's constant learning rate: a run that ended at step 2, resumed with schedule.max_steps=4, ends with
    the weights, EMA and fake score of a run set to 4 steps from the start (how the recipe's 4000 steps were run)."""
    every = ["--optim.ema_decay=0.9", "--checkpoint.every=2", "--checkpoint.keep_last=2"]
    straight = train(
        load_config("debug", dmd_overrides(setup, tmp_path / "straight", "--schedule.max_steps=4", *every))
    )
    short = train(load_config("debug", dmd_overrides(setup, tmp_path / "short", "--schedule.max_steps=2", *every)))
    ended = complete_checkpoints(short)[-1]
    assert ended.name == "step-00000002"
    a, b = (load_file(str(run / "final.safetensors")) for run in (short, straight))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # steps 3 and 4 train on
    longer, _ = resume_copy(setup, short, ended, tmp_path / "longer", "--schedule.max_steps=4", *every)
    assert_same_weights(straight, longer, "final.safetensors", "final-ema.safetensors",
                        "checkpoints/step-00000004/fake.safetensors")  # fmt: skip


def test_more_pairs_extend_the_file_and_fewer_read_its_first(setup, tmp_path, capsys, monkeypatch):
    """Raising dmd.num_pairs makes only the new pairs, and the file is the one made whole (each pair's noise is seeded
    by its index); lowering it reads the file's first pairs and leaves the file alone."""
    encoded = []  # the batches whose captions (and images) are encoded, by their size
    inputs = DiffusionObjective.inputs

    def counted(self, batch, *args, **kwargs):
        encoded.append(len(batch["aspect_ratio"]))
        return inputs(self, batch, *args, **kwargs)

    monkeypatch.setattr(DiffusionObjective, "inputs", counted)

    def pairs_of(out: Path, n: int, *extra: str) -> dict:
        config = load_config("debug", dmd_overrides(setup, out, f"--dmd.num_pairs={n}", *extra))
        encoded.clear()
        return setup_run(config).state.objective.pairs

    whole = pairs_of(tmp_path / "whole", 10)
    assert encoded == [4, 4, 4]
    first = pairs_of(tmp_path / "grown", 6)  # mid-batch (batches of 4): the next run starts inside a batch
    capsys.readouterr()
    grown = pairs_of(tmp_path / "grown", 10, "--logging.progress=true")
    assert encoded == [4, 4]  # pairs 6-9 lie in the second and third batches: the first is not encoded again
    shown = capsys.readouterr().err
    assert "6/10" in shown and "10/10" in shown  # the bar starts at the pairs kept
    file = tmp_path / "grown" / "dmd-pairs.safetensors"
    assert all(torch.equal(grown[k][:6], first[k]) for k in first)
    assert all(torch.equal(grown[k], whole[k]) for k in whole if k != "latents")  # same captions, same noise
    torch.testing.assert_close(grown["latents"], whole["latents"], rtol=1e-4, atol=1e-5)  # other batch splits
    assert not torch.equal(grown["latents"][6:], grown["latents"][2:6])  # new pairs, not repeats
    made = file.stat().st_mtime_ns
    fewer = pairs_of(tmp_path / "grown", 4)
    assert file.stat().st_mtime_ns == made and len(load_file(str(file))["noise"]) == 10
    assert fewer.keys() == grown.keys() and all(torch.equal(fewer[k], grown[k][:4]) for k in grown)


def test_extra_fake_updates_step_the_fake_score_each_time_and_resume_exactly(setup, tmp_path):
    """dmd.fake_updates=3: the fake score's optimizer steps three times per student step (DMD2's rule), which changes
    the student from its second step on; a run resumed between steps still ends bit-identical."""
    steps = ["--schedule.max_steps=4", "--checkpoint.every=2", "--checkpoint.keep_last=2"]
    runs = {n: train(load_config("debug", dmd_overrides(setup, tmp_path / f"u{n}", *steps, f"--dmd.fake_updates={n}")))
            for n in (1, 3)}  # fmt: skip
    first = {n: complete_checkpoints(run)[0] for n, run in runs.items()}
    for n, checkpoint in first.items():  # AdamW counts its steps per parameter: 2 student steps × n
        assert load_file(str(checkpoint / "fake_optimizer.safetensors"))["0.step"].item() == 2 * n
    a, b = (load_file(str(first[n] / "trainable.safetensors")) for n in (1, 3))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    resumed, _ = resume_copy(setup, runs[3], first[3], tmp_path / "resumed", *steps, "--dmd.fake_updates=3")
    assert_same_weights(runs[3], resumed, "final.safetensors", "checkpoints/step-00000004/fake.safetensors")


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """The weight without its attention-key bias, whose gradient is zero in exact arithmetic (softmax ignores a
    shift shared by a query's logits): float noise of ~1e-10 there, different on 1 and 2 processes, is all AdamW's
    first steps see, and they move it by up to lr either way."""
    if name.endswith("attn.qkv.bias"):
        third = len(value) // 3
        return torch.cat([value[:third], value[2 * third :]])
    if name.endswith("cross_attn.kv_linear.bias"):
        return value[len(value) // 2 :]
    return value


def test_two_processes_match_one_process(setup, tmp_path):
    # Two fake-score updates a step: the extra one's images and gradients are averaged over the processes too.
    common = ["--schedule.max_steps=3", "--optim.grad_accum=2", "--checkpoint.every=0", "--dmd.fake_updates=2"]
    one = train(load_config("debug", dmd_overrides(setup, tmp_path / "one", *common)))
    result = torchrun("-m", "pixart", "train", "debug", *dmd_overrides(setup, tmp_path / "two", *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    a, b = load_file(str(one / "final.safetensors")), load_file(str(tmp_path / "two" / "final.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(*(without_key_bias(key, w[key]) for w in (a, b)), rtol=1e-4, atol=1e-6, msg=key)
    pairs = [load_file(str(run / "dmd-pairs.safetensors")) for run in (one, tmp_path / "two")]
    assert all(torch.equal(pairs[0][k], pairs[1][k]) for k in pairs[0])


def test_student_is_sampled_by_generate_with_the_dmd_sampler(setup, tmp_path):
    """`pixart generate --transformer final --sampler dmd`: one student pass at 400 from the seed's noise, x̂0
    decoded, written out here by hand."""
    pipe = setup[1]
    run = train(load_config("debug", dmd_overrides(setup, tmp_path / "run", "--schedule.max_steps=2",
                                                   "--checkpoint.every=0")))  # fmt: skip
    out = tmp_path / "out"
    args = ["generate", "a red square", "--model", str(pipe), "--transformer", str(run / "final.safetensors")]
    args += ["--sampler", "dmd", "--seed", "5", "--width", "256", "--height", "256", "--no-binning", "--out", str(out)]
    args += ["--dtype", "fp32"]  # the hand-written pass below runs in fp32
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    (image,) = out.glob("*.png")
    got = np.asarray(Image.open(image).convert("RGB"))

    text = TextEncoder.from_pretrained(pipe).encode(["a red square"], 120)
    student = load_transformer(run / "final.safetensors").eval()
    vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae").eval()
    micro = (torch.tensor([[256.0, 256.0]]), torch.tensor([1.0])) if student.config.micro_conditions else ()
    with torch.no_grad():
        z = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(5))
        eps = student(z, torch.tensor([400]), *text, *micro)[:, :4]
        ab = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[400])
        x0 = (z - (1 - ab) ** 0.5 * eps) / ab**0.5
        pixels = vae.decode(x0 / vae.config.scaling_factor).sample
    expected = ((pixels[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_a_checkpoint_is_sampled_as_its_run_and_starts_a_new_student(setup, tmp_path):
    """RUN/checkpoints/step-N loads as the run's model with the checkpoint's weights (or their EMA): the same
    transformer as the final files of a run that ended there, and the same image from `pixart generate`. A new DMD run
    starts its student there (dmd.student) while the teacher and fake score stay model.source; a student of another
    shape, a LoRA run's checkpoint and dmd.student without DMD are refused in one line."""
    pipe = setup[1]
    steps = ["--schedule.max_steps=2", "--checkpoint.every=2", "--optim.ema_decay=0.9"]
    run = train(load_config("debug", dmd_overrides(setup, tmp_path / "run", *steps)))
    (checkpoint,) = complete_checkpoints(run)
    for ema, final in [(False, "final.safetensors"), (True, "final-ema.safetensors")]:
        got, want = load_transformer(checkpoint, ema=ema).state_dict(), load_transformer(run / final).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), final
    teacher = load_transformer(pipe).state_dict()
    assert any(not torch.equal(want[k], teacher[k]) for k in teacher)  # it trained: the weights are the run's

    images = {}
    for name, transformer in [("checkpoint", checkpoint), ("final", run / "final-ema.safetensors")]:
        args = ["generate", "a red square", "--model", str(pipe), "--transformer", str(transformer), "--sampler", "dmd"]
        args += ["--seed", "3", "--width", "256", "--height", "256", "--no-binning", "--out", str(tmp_path / name)]
        result = cli(*args, *(["--ema"] if name == "checkpoint" else []))
        assert result.returncode == 0, result.stderr[-3000:]
        (png,) = (tmp_path / name).glob("*.png")
        images[name] = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(images["checkpoint"], images["final"])

    again = setup_run(load_config("debug", dmd_overrides(setup, tmp_path / "again", f"--dmd.student={checkpoint}")))
    student = again.accelerator.unwrap_model(again.state.model).state_dict()
    final = load_transformer(run / "final.safetensors").state_dict()
    assert all(torch.equal(student[k], final[k]) for k in final)
    for net in (again.state.objective.teacher, again.state.objective.fake):
        assert all(torch.equal(net.state_dict()[k], teacher[k]) for k in teacher)

    deeper = load_transformer(pipe)
    deeper = PixArtTransformer(dataclasses.replace(deeper.config, depth=deeper.config.depth + 1))
    save_pixart(deeper, tmp_path / "deeper.safetensors")
    with pytest.raises(PixArtError, match=r"^dmd.student=.* is not the teacher's architecture \(it differs in depth\)"):
        setup_run(
            load_config(
                "debug", dmd_overrides(setup, tmp_path / "no", f"--dmd.student={tmp_path / 'deeper.safetensors'}")
            )
        )
    lora = tmp_path / "lora-step"
    shutil.copytree(checkpoint, lora)
    state = json.loads((lora / "state.json").read_text())
    state["config"]["lora"]["rank"] = 4
    (lora / "state.json").write_text(json.dumps(state))
    (lora / "manifest.json").unlink()  # the edit would otherwise read as damage, as it should
    with pytest.raises(PixArtError, match=r"^.*lora-step is a LoRA run's checkpoint: it holds the LoRA's weights"):
        load_transformer(lora)
    with pytest.raises(PixArtError, match=r"^dmd.student is where a DMD student starts; set dmd.enabled=true"):
        load_config("debug", overrides(setup, tmp_path / "x", f"--dmd.student={checkpoint}"))


def test_ssim_regression_compares_decoded_images_and_reaches_the_student(setup, tmp_path):
    """dmd.regression_distance=ssim: 1 − SSIM of the decoded images, 0 for the teacher's own latents, larger for a
    blurred copy than for a slightly shifted one's brightness, with gradients through the frozen decoder; a run
    with it trains to other weights than with the latents' MSE."""
    vae = AutoencoderKL.from_pretrained(setup[1], subfolder="vae").eval().requires_grad_(False)
    target = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = torch.nn.functional.avg_pool2d(target, 3, 1, 1)
    brighter = target + 0.05
    x = torch.stack([blurred[0], brighter[1]]).requires_grad_(True)
    distance = ssim_distance(vae, 0.0, vae.config.scaling_factor, x, target)
    assert ssim_distance(vae, 0.0, vae.config.scaling_factor, target, target).abs().max() < 1e-5
    assert distance[0] > distance[1] > 0
    distance.sum().backward()
    assert x.grad.abs().sum() > 0
    runs = {d: train(load_config("debug", dmd_overrides(setup, tmp_path / d, "--schedule.max_steps=2",
                                                        "--checkpoint.every=0", "--dmd.regression_weight=1",
                                                        f"--dmd.regression_distance={d}")))
            for d in ("mse", "ssim", "detail_ssim")}  # fmt: skip
    a, b, c = (load_file(str(run / "final.safetensors")) for run in runs.values())
    assert any(not torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(b[k], c[k]) for k in b)
    with pytest.raises(PixArtError, match=r"dmd.regression_distance"):
        load_config("dmd", ["--dmd.regression_distance=lpips"])


def test_detail_ssim_counts_a_small_objects_edges_as_a_large_ones():
    """dmd.regression_distance=detail_ssim: the SSIM map (whose plain mean is pytorch_msssim's SSIM) averaged in
    weights of the reference's local variance. A student that leaves out a reference's only object: the plain mean
    scores a missing 8-px square 8× lighter than a missing 32-px one (the background's area dilutes it); the
    detail weighting within 1.5× of it. A right image scores 0 either way."""
    import pytorch_msssim

    gen = torch.Generator().manual_seed(0)
    x, y = (torch.rand(3, 3, 40, 40, generator=gen) * 2 - 1 for _ in range(2))
    similarity, variance = ssim_map(x, y, data_range=2.0)
    torch.testing.assert_close(similarity.flatten(1).mean(1), pytorch_msssim.ssim(x, y, data_range=2.0,
                                                                                  size_average=False))  # fmt: skip
    torch.testing.assert_close(variance.flatten(1).mean(1),
                               ssim_map(y, y, data_range=2.0)[1].flatten(1).mean(1))  # y's, not x's  # fmt: skip
    background = torch.full((1, 3, 64, 64), -0.2)

    def square(size: int) -> torch.Tensor:
        image = background.clone()
        image[..., 16 : 16 + size, 16 : 16 + size] = 0.8
        return image

    small, large = square(8), square(32)
    plain = [dissimilarity(background, ref).item() for ref in (small, large)]
    detail = [dissimilarity(background, ref, detail=True).item() for ref in (small, large)]
    assert plain[1] / plain[0] > 8 and detail[1] / detail[0] < 1.5
    assert dissimilarity(small, small, detail=True).abs().max() < 1e-6


def test_dmd_config_errors():
    with pytest.raises(PixArtError, match=r"dmd.enabled needs model.source"):
        load_config("debug", ["--model.pipeline=p", "--data.dataset=d", "--dmd.enabled=true"])
    with pytest.raises(PixArtError, match=r"dmd.max_timestep=10: expected an integer from 20 to 999"):
        load_config("dmd", ["--dmd.max_timestep=10"])
    with pytest.raises(PixArtError, match=r"dmd.gan_weight=-0.1: expected"):
        load_config("dmd", ["--dmd.gan_weight=-0.1"])
    with pytest.raises(PixArtError, match=r"dmd.fake_updates=0: expected an integer >= 1"):
        load_config("dmd", ["--dmd.fake_updates=0"])
    with pytest.raises(PixArtError, match=r"dmd.enabled trains the whole student; it does not combine with lora"):
        load_config("dmd", ["--lora.rank=4"])


def test_recipes_are_valid_as_they_stand():
    """The GPU recipe and the demo one load (model.source a hub id or the bundle) and distil at timestep 400."""
    for recipe in ("dmd", "demo-dmd"):
        config = load_config(recipe)
        assert config.dmd.enabled and config.dmd.start_timestep == 400


def test_classifier_loss_is_non_saturating_logistic():
    """softplus(−logit_data) + softplus(logit_student), i.e. −log σ(data) − log(1 − σ(student)), written out."""
    data, student = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([0.5, -3.0, 0.0])
    sigmoid = lambda v: 1 / (1 + np.exp(-v.numpy()))  # noqa: E731
    expected = -np.log(sigmoid(data)) - np.log(1 - sigmoid(student))
    np.testing.assert_allclose(classifier_loss(data, student).numpy(), expected, rtol=1e-6)


def test_gan_pass_trains_the_classifier_on_the_data_and_the_student_through_it(setup, tmp_path):
    """DMD2's GAN term: inside the pass the classifier's loss reaches the fake score and its head (and depends on the
    micro-batch's own latents, the data), and the student's GAN loss reaches the student alone, through both held
    fixed. A head with a non-zero last layer (as after training) changes the student's gradient."""
    run = setup_run(load_config("debug", dmd_overrides(setup, tmp_path / "run", "--dmd.gan_weight=0.5")))
    state = run.state
    objective, student = state.objective, run.accelerator.unwrap_model(state.model)
    torch.nn.init.normal_(objective.head.net[-1].weight, std=0.1)
    batch = next(iter(run.loader.epoch(0)))

    def pass_grads(batch):
        for p in [*student.parameters(), *objective.fake.parameters(), *objective.head.parameters()]:
            p.grad = None
        loss = objective.loss(state.model, batch, 0, 0)
        assert all(p.grad is None for p in student.parameters())
        judge = {n: p.grad.clone() for n, p in [*objective.fake.named_parameters(), *objective.head.named_parameters()]}
        loss.backward()
        after = {n: p.grad for n, p in [*objective.fake.named_parameters(), *objective.head.named_parameters()]}
        assert all(torch.equal(judge[n], after[n]) for n in judge)  # the student's loss left the judge alone
        assert all(p.requires_grad for p in [*objective.fake.parameters(), *objective.head.parameters()])
        return judge, {n: p.grad.clone() for n, p in student.named_parameters()}

    judge, student_grads = pass_grads(batch)
    assert all(g.abs().sum() > 0 for n, g in judge.items() if n.startswith("net."))  # the head learns
    # Other data latents: the head learns otherwise; the student's gradient does not depend on the data.
    other = dict(batch, latent_mean=batch["latent_mean"].flip(0), latent_std=batch["latent_std"].flip(0))
    judge_other, student_other = pass_grads(other)
    assert any(not torch.equal(judge[n], judge_other[n]) for n in judge if n.startswith("net."))
    assert all(torch.equal(student_grads[n], student_other[n]) for n in student_grads)
    # Without the GAN term the same draws give another student gradient.
    objective.head, objective.settings.gan_weight = None, 0.0
    for p in student.parameters():
        p.grad = None
    objective.loss(state.model, batch, 0, 0).backward()
    assert any(not torch.equal(student_grads[n], p.grad) for n, p in student.named_parameters())


def test_gan_run_resumes_exactly_with_its_head_and_from_a_run_without_one(setup, tmp_path):
    """With dmd.gan_weight (and two fake updates a step, whose second also trains the head) the head is checkpointed
    and a resumed run ends bit-identical; a GAN run resumed from a plain DMD checkpoint starts a new head."""
    steps = ["--schedule.max_steps=4", "--checkpoint.every=2", "--checkpoint.keep_last=2"]
    gan = ["--dmd.gan_weight=0.5", "--dmd.fake_updates=2", "--dmd.fake_lr=1e-5", "--dmd.gan_head_lr=1e-3"]
    straight = train(load_config("debug", dmd_overrides(setup, tmp_path / "straight", *steps, *gan)))
    first = complete_checkpoints(straight)[0]
    assert (first / "fake_head.safetensors").is_file()
    head = load_file(str(first / "fake_head.safetensors"))
    assert head["net.3.weight"].abs().sum() > 0  # it left its zero start
    # The head's own rate: AdamW's first steps move a weight by up to the rate each, 1e-3 here, not the fake score's.
    assert 4 * 1e-5 < head["net.3.weight"].abs().max() <= 4 * 1e-3 * 1.01
    resumed, _ = resume_copy(setup, straight, first, tmp_path / "resumed", *steps, *gan)
    assert_same_weights(straight, resumed, "final.safetensors", "checkpoints/step-00000004/fake.safetensors",
                        "checkpoints/step-00000004/fake_head.safetensors")  # fmt: skip
    plain = train(load_config("debug", dmd_overrides(setup, tmp_path / "plain", *steps)))
    from_plain, _ = resume_copy(setup, plain, complete_checkpoints(plain)[0], tmp_path / "from-plain", *steps, *gan)
    assert (from_plain / "checkpoints/step-00000004/fake_head.safetensors").is_file()
