"""bf16 and int8 on the CPU's matrix units: detection from real cpuinfo texts, the fp32 fallback where the units are
missing, the images' cost against fp32, seeds, metadata round trips, and bf16 training.

The detection tests read saved /proc/cpuinfo texts of three machines; the generation and training tests need the
units on this machine (they run bf16 and int8 for real) and are skipped without them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from pixart.checkpoints.convert import load_transformer
from pixart.cli import main as cli_main
from pixart.errors import PixArtError
from pixart.inference.cpu_units import cpu_units, describe_cpu
from pixart.inference.devices import resolve_dtype, resolve_quantize
from pixart.inference.options import GenerationOptions, LoadSettings
from pixart.inference.pipeline import PixArtPipeline
from pixart.model.config import preset
from pixart.model.quantize import check_quantize, quantize_int8
from pixart.model.transformer import Mlp, PixArtTransformer, onednn_bf16
from pixart.train.loop import check_cpu_precision
from pixart.train.state import complete_checkpoints
from test_train import cli, fixed_loss
from tiny import HERE, needs_bf16, needs_int8, save_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# The first processor's entry of three machines' /proc/cpuinfo (flags cut to the x86-64 baseline and the units).
ZEN4 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9R14 96-Core Processor
flags		: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl \
avx512_bf16 avx512_vnni avx512_vbmi2 avx_vnni

processor	: 1
model name	: AMD EPYC 9R14 96-Core Processor
flags		: fpu
"""
SAPPHIRE_RAPIDS = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8488C
flags		: fpu sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8 avx_vnni
"""
SKYLAKE = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz
flags		: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl
"""


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path

    return write


def test_units_are_read_from_real_cpuinfo_texts(cpuinfo, tmp_path):
    zen4, spr, skylake = (cpu_units(cpuinfo(text)) for text in (ZEN4, SAPPHIRE_RAPIDS, SKYLAKE))
    assert (zen4.has_bf16(), zen4.has_int8()) == (True, True)
    assert (spr.has_bf16(), spr.has_int8()) == (True, True)
    assert (skylake.has_bf16(), skylake.has_int8()) == (False, False)  # AVX-512 without bf16 or VNNI
    assert zen4.model == "AMD EPYC 9R14 96-Core Processor"
    assert zen4.describe("AVX512") == (
        "AMD EPYC 9R14 96-Core Processor: avx512_bf16 avx512_vnni avx_vnni (fast: bf16, int8), torch kernels AVX512"
    )
    assert "amx_bf16 avx512_bf16 amx_int8" in spr.describe()
    assert skylake.describe() == "Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz: no bf16/int8 matrix units (fp32 only)"
    assert not cpu_units(tmp_path / "absent").has_bf16()  # no cpuinfo (not Linux): no units assumed
    line = describe_cpu(cpuinfo(ZEN4))
    assert "\n" not in line and line.endswith(f"torch kernels {torch.backends.cpu.get_cpu_capability()}")


def test_bf16_and_int8_where_the_units_are_missing_run_fp32_with_one_line(cpuinfo, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="pixart.inference.devices"):
        assert resolve_dtype("bf16", cpu, cpuinfo(ZEN4)) == torch.bfloat16
        assert resolve_quantize("int8", cpu, cpuinfo(ZEN4)) == "int8"
        assert caplog.records == []  # with the units: no warning
        assert resolve_dtype("bf16", cpu, cpuinfo(SKYLAKE)) == torch.float32
        assert resolve_quantize("int8", cpu, cpuinfo(SKYLAKE)) is None
    bf16, int8 = (r.getMessage() for r in caplog.records)
    assert bf16.startswith("bf16 asked for, but this CPU (Intel(R) Xeon(R) Platinum 8175M")
    assert "running in fp32" in bf16
    assert "--quantize int8" in int8 and "no int8 units (amx_int8/avx512_vnni/avx_vnni)" in int8
    assert "\n" not in bf16 + int8


def test_the_default_is_bf16_where_the_units_are_and_fp32_elsewhere(cpuinfo, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="pixart.inference.devices"):
        assert resolve_dtype(None, cpu, cpuinfo(ZEN4)) == torch.bfloat16
        assert resolve_dtype("auto", cpu, cpuinfo(SAPPHIRE_RAPIDS)) == torch.bfloat16
        assert resolve_dtype(None, cpu, cpuinfo(SKYLAKE)) == torch.float32
        assert resolve_dtype("auto", torch.device("cuda"), cpuinfo(SKYLAKE)) == torch.float16
        assert resolve_dtype("fp32", cpu, cpuinfo(ZEN4)) == torch.float32  # asked for: kept
    assert caplog.records == []  # a default is chosen quietly, on either kind of CPU


@pytest.mark.parametrize(
    "mode, device, dtype, message",
    [
        ("int4", "cpu", torch.float32, "unknown quantization 'int4'; choose int8 (or none)"),
        ("int8", "cuda", torch.float16, "--quantize int8 runs on the CPU only, not cuda; on a GPU use --dtype fp16"),
        ("int8", "cpu", torch.bfloat16, "--quantize int8 keeps activations in fp32; drop --dtype bf16"),
    ],
)
def test_quantize_refusals_are_one_line(mode, device, dtype, message):
    with pytest.raises(PixArtError, match="^" + re.escape(message) + "$"):
        check_quantize(mode, torch.device(device), dtype)


@needs_int8
@pytest.mark.parametrize("backend", ["torch", "torchao"])
def test_both_int8_backends_quantise_every_linear_and_stay_close(backend):
    if backend == "torchao":
        pytest.importorskip("torchao", reason="the torchao backend needs pip install torchao")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        exact = mlp(x)
        quantized = quantize_int8(mlp, backend)(x)
    if backend == "torch":  # fbgemm's dynamic int8 modules in place of nn.Linear
        assert all(type(m).__module__ == "torch.ao.nn.quantized.dynamic.modules.linear" for m in mlp[::2])
    else:  # nn.Linear kept, its weight an int8 tensor subclass
        assert all(type(m.weight).__name__ == "Int8Tensor" for m in mlp[::2])
    error = ((quantized - exact).norm() / exact.norm()).item()
    assert 0 < error < 0.03, error  # measured 4e-3 (torchao) and 8e-3 (torch) on wider layers
    with pytest.raises(PixArtError, match="^unknown int8 backend 'onnx'; choose torch, torchao$"):
        quantize_int8(mlp, "onnx")


def test_cli_refuses_int8_beside_bf16_before_loading(tmp_path, capsys):
    code = cli_main(["generate", "a tree", "--quantize", "int8", "--dtype", "bf16", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --quantize int8 keeps activations in fp32; drop --dtype bf16\n"


def test_cpu_training_precision_refusals(cpuinfo):
    check_cpu_precision("bf16", cpuinfo(ZEN4))  # allowed: bf16 units
    with pytest.raises(PixArtError, match=r"'fp16' needs a GPU; on this CPU pass --optim.mixed_precision=bf16 \("):
        check_cpu_precision("fp16", cpuinfo(ZEN4))
    with pytest.raises(PixArtError, match=r"'bf16' needs a GPU or a CPU with bf16 units .* pass --optim.mixed_prec"):
        check_cpu_precision("bf16", cpuinfo(SKYLAKE))


def psnr(a, b) -> float:
    a, b = (np.asarray(image).astype(np.float64) for image in (a, b))
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_pipeline(root / family, family) for family in ("alpha", "sigma")}


OPTIONS = GenerationOptions(seed=3, steps=4, width=64, height=64, binning=False)


@needs_bf16
@needs_int8
@pytest.mark.parametrize("family", ["alpha", "sigma"])
def test_bf16_and_int8_images_are_close_to_fp32_and_seeds_reproduce(pipelines, family):
    images, first_inputs = {}, {}
    for mode, kwargs in {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "int8": {"quantize": "int8"}}.items():
        pipe = PixArtPipeline.from_pretrained(pipelines[family], device="cpu", **kwargs)
        calls: list[torch.Tensor] = []
        pipe.transformer.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(args[0].clone()))
        images[mode] = pipe("a red tree", OPTIONS, show_progress=False)[0]
        first_inputs[mode] = calls[0]
        assert np.array_equal(np.asarray(pipe("a red tree", OPTIONS, show_progress=False)[0]), np.asarray(images[mode]))
    # The seed's noise is drawn in fp32 and only then cast: bf16 starts from fp32's noise, rounded.
    assert first_inputs["bf16"].dtype == torch.bfloat16
    assert torch.equal(first_inputs["bf16"], first_inputs["fp32"].to(torch.bfloat16))
    assert torch.equal(first_inputs["int8"], first_inputs["fp32"])
    # Measured on these tiny random weights: bf16 and int8 both about 51 dB from fp32.
    assert 40 < psnr(images["fp32"], images["bf16"]) < float("inf")
    assert 35 < psnr(images["fp32"], images["int8"]) < float("inf")


def test_the_vae_runs_in_bf16_and_upcasts_only_from_fp16(pipelines):
    """force_upcast guards fp16's overflow (diffusers upcasts only from fp16); bf16 has fp32's range."""
    folder = pipelines["sigma"]
    assert json.loads((folder / "vae" / "config.json").read_text())["force_upcast"] is True
    for dtype, vae_dtype in [("bf16", torch.bfloat16), ("fp16", torch.float32), ("fp32", torch.float32)]:
        if dtype == "bf16" and not HERE.has_bf16():
            continue  # runs fp32 on this CPU, covered by the refusal tests
        pipe = PixArtPipeline.from_pretrained(folder, device="cpu", dtype=dtype)
        with pipe._stage("vae") as vae:
            assert next(vae.parameters()).dtype == vae_dtype, dtype


@needs_bf16
@needs_int8
def test_the_mode_is_recorded_and_reproduced_from_the_png(pipelines):
    folder = str(pipelines["sigma"])
    for kwargs, recorded in [({"dtype": "bf16"}, ("bfloat16", None)), ({"quantize": "int8"}, ("float32", "int8"))]:
        image = PixArtPipeline.from_pretrained(folder, device="cpu", **kwargs)("a red tree", OPTIONS)[0]
        assert (image.info["dtype"], image.info.get("quantize")) == recorded
        prompt, options, load = GenerationOptions.from_metadata(image.info)
        assert (load.dtype, load.quantize) == ({"bfloat16": "bf16", "float32": "fp32"}[recorded[0]], recorded[1])
        again = PixArtPipeline.from_pretrained(load, device="cpu")(prompt, options)[0]
        assert np.array_equal(np.asarray(again), np.asarray(image))
        assert again.info == image.info
    # Nothing asked: bf16 on this CPU with the units, and recorded; int8 alone keeps its fp32 activations.
    assert PixArtPipeline.from_pretrained(folder, device="cpu")("a red tree", OPTIONS)[0].info["dtype"] == "bfloat16"
    assert PixArtPipeline.from_pretrained(folder, device="cpu", quantize="int8").dtype == torch.float32
    # A GPU's fp16 image remade on a CPU runs in the CPU's default, bf16 here; a bad record is one line.
    assert PixArtPipeline.from_pretrained(LoadSettings(folder, dtype="fp16"), device="cpu").dtype == torch.bfloat16
    with pytest.raises(PixArtError, match="^the image's dtype metadata 'float8' is not one of float32, float16, bf"):
        LoadSettings.from_metadata({"dtype": "float8"})
    with pytest.raises(PixArtError, match="^the image's quantize metadata 'int4' is not one of int8$"):
        LoadSettings.from_metadata({"quantize": "int4"})


@needs_int8
def test_cli_int8_run_reproduces_from_its_png_and_v_names_the_cpu(tmp_path, capsys, caplog):
    common = ["--seed", "1", "--steps", "2"]
    with caplog.at_level("DEBUG", logger="pixart.cli.generate"):
        assert cli_main(["generate", "a red circle", "--quantize", "int8", *common, "--out", str(tmp_path / "a")]) == 0
    assert f"CPU: {describe_cpu()}" in caplog.messages
    made = Path(capsys.readouterr().out.strip())
    assert Image.open(made).info["quantize"] == "int8"
    assert cli_main(["generate", "--from-png", str(made), "--out", str(tmp_path / "b")]) == 0
    again = Path(capsys.readouterr().out.strip())
    assert Image.open(again).info == Image.open(made).info
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
    # The image's int8 beside a bf16 asked for on the command line: refused in one line, before loading.
    assert cli_main(["generate", "--from-png", str(made), "--dtype", "bf16", "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == "error: --quantize int8 keeps activations in fp32; drop --dtype bf16\n"


@needs_bf16
def test_bf16_training_on_cpu_follows_fp32_and_resumes_exactly(setup, tmp_path):
    _, pipe, _, cache = setup

    def run(out: Path, *extra: str) -> Path:
        base = [f"--model.pipeline={pipe}", f"--data.cache={cache}", "--data.image_size=256"]
        common = ["--schedule.max_steps=8", "--checkpoint.every=4", "--logging.tensorboard=false"]
        args = [*base, *common, "--logging.progress=false", f"--run.output_dir={out}", *extra]
        # A process of its own: accelerate keeps one mixed-precision setting per process.
        done = cli("train", "debug", *args)
        assert done.returncode == 0, done.stderr[-2000:]
        return out

    fp32, bf16 = run(tmp_path / "fp32"), run(tmp_path / "bf16", "--optim.mixed_precision=bf16")
    x, y = load_file(str(fp32 / "final.safetensors")), load_file(str(bf16 / "final.safetensors"))
    assert any(not torch.equal(x[k], y[k]) for k in x)  # autocast really ran bf16 matmuls
    torch.manual_seed(0)  # the trainer's from-scratch init for seed 0
    start = fixed_loss(PixArtTransformer(preset("debug-alpha")).eval(), cache)
    after = [fixed_loss(load_transformer(path / "final.safetensors"), cache) for path in (fp32, bf16)]
    assert after[1] < 0.95 * start and abs(after[1] - after[0]) < 0.02 * after[0], (start, after)
    # Resume: a run stopped at its first checkpoint and resumed ends with the same weights, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(bf16, resumed)
    for leftover in [*resumed.glob("final*.safetensors"), complete_checkpoints(resumed)[-1]]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    run(resumed, "--optim.mixed_precision=bf16", "--run.resume=latest")
    z = load_file(str(resumed / "final.safetensors"))
    assert y.keys() == z.keys() and all(torch.equal(y[k], z[k]) for k in y)


@needs_bf16
def test_bf16_inference_runs_fc1_and_gelu_as_one_onednn_kernel():
    """The MLP's fc1, bias and tanh GELU run as oneDNN's fused kernel in bf16 inference on CPU, rounding once
    where the separate ops round after the matmul and again after the GELU; with gradients it runs them apart."""
    torch.manual_seed(0)
    mlp = Mlp(576, 2304, 576)
    x = torch.randn(2, 64, 576)
    exact = mlp(x).detach()
    mlp, x = mlp.bfloat16(), x.bfloat16()
    assert onednn_bf16()

    def error(y: torch.Tensor) -> float:
        return ((y.float() - exact).norm() / exact.norm()).item()

    with torch.no_grad():
        fused = mlp(x)
        apart = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    assert not torch.equal(fused, apart)  # the fused kernel ran
    assert error(fused) < error(apart) < 1e-2  # measured 2.4e-3 against 3.2e-3
    trained = mlp(x)  # the parameters want gradients: the separate ops, which have a backward
    assert torch.equal(trained.detach(), apart)
    trained.float().sum().backward()
    assert mlp.fc1.weight.grad is not None
