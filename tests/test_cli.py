"""Command-line mistakes argparse catches end like our own errors: one line naming the command, exit 2."""

import argparse
import subprocess
import sys
import time

import pytest

from pixart.cli import build_parser


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixart", *args], capture_output=True, text=True, timeout=120)


def see(prog: str, message: str) -> str:
    return f"{prog}: error: {message} (see {prog} --help)"


@pytest.mark.parametrize(
    "args, line",
    [
        (["shapes", "OUT", "--count", "abc"], see("pixart shapes", "argument --count: invalid int value: 'abc'")),
        (
            ["shapes", "OUT", "--count", "1", "--pairs", "abc"],
            see("pixart shapes", "argument --pairs: invalid float value: 'abc'"),
        ),
        (
            ["shapes", "OUT", "--count", "1", "--split", "nope"],
            see("pixart shapes", "argument --split: invalid choice: 'nope' (choose from 'train', 'heldout')"),
        ),
        (["shapes", "OUT"], see("pixart shapes", "the following arguments are required: --count")),
        (["shapes", "OUT", "--count", "1", "--bogus"], see("pixart shapes", "unrecognized arguments: --bogus")),
        (
            ["convert", "a.pth", "b", "--to", "pixart", "--num-heads", "many"],
            see("pixart convert", "argument --num-heads: invalid int value: 'many'"),
        ),
        (
            ["convert", "a.pth", "b", "--to", "pixart", "--family", "beta"],
            see("pixart convert", "argument --family: invalid choice: 'beta' (choose from 'alpha', 'sigma')"),
        ),
        (["convert", "a.pth", "b"], see("pixart convert", "the following arguments are required: --to")),
        (
            ["convert", "a.pth", "b", "--to", "pixart", "--bogus", "x"],
            see("pixart convert", "unrecognized arguments: --bogus x"),
        ),
        (
            ["export", "openvino", "OUT", "--model", "m", "--width", "wide"],
            see("pixart export openvino", "argument --width: invalid int value: 'wide'"),
        ),
        (["export", "openvino"], see("pixart export openvino", "the following arguments are required: OUT")),
        (
            ["export", "openvino", "OUT", "--model", "m", "--bogus"],
            see("pixart export openvino", "unrecognized arguments: --bogus"),
        ),
        (
            ["export", "onnx"],
            see("pixart export", "argument TARGET: invalid choice: 'onnx' (choose from 'diffusers', 'openvino')"),
        ),
        (["--bogus"], see("pixart", "unrecognized arguments: --bogus")),
        (["train"], see("pixart train", "the following arguments are required: CONFIG")),
    ],
)
def test_argparse_errors_are_one_line(args, line):
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr, done.stderr
    assert [x for x in done.stderr.splitlines() if x.strip()] == [line], done.stderr
    assert done.stdout == ""


def test_unknown_command_names_the_commands():
    done = run_cli("nope")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("pixart: error: argument COMMAND: invalid choice: 'nope' (choose from 'cache'")
    assert done.stderr.endswith(" (see pixart --help)\n") and done.stderr.count("\n") == 1


def test_a_commands_own_parser_error_is_one_line_too(capsys):
    """What a subcommand reports with parser.error() takes the same path, even a message with line breaks."""
    export = build_parser().chosen_parser(argparse.Namespace(command="export"))
    with pytest.raises(SystemExit) as exited:
        export.error("--base and --transformer\n  disagree")
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err
        == "pixart export: error: --base and --transformer disagree (see pixart export --help)\n"
    )


HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "gradio", "openvino", "nncf")
"""Libraries that take seconds to import: reading a command's help must load none of them."""


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every (sub)command of ``parser`` whose help a user can ask for, e.g. ("export", "openvino")."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths


def imported_modules(importtime_log: str) -> set[str]:
    """Top-level package names from the stderr of ``python -X importtime``."""
    names = set()
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_command_paths_cover_nested_commands():
    paths = command_paths(build_parser())
    assert {(), ("generate",), ("train",), ("export",), ("export", "openvino"), ("export", "diffusers")} <= set(paths)


@pytest.mark.parametrize("path", command_paths(build_parser()), ids=lambda p: " ".join(p) or "pixart")
def test_help_imports_no_heavy_library(path):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pixart", *path, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: pixart"), done.stdout
    modules = imported_modules(done.stderr)
    assert "pixart" in modules and "argparse" in modules  # the log was parsed: an empty set proves nothing
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))


def test_help_is_fast():
    """Loosely timed (a loaded CI machine); importing torch alone takes several times this budget here."""
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        done = run_cli("--help")
        seconds.append(time.perf_counter() - start)
        assert done.returncode == 0 and "generate" in done.stdout
    assert min(seconds) < 1.5, seconds


def test_the_transformer_is_still_importable_from_the_package():
    """`from pixart import PixArtTransformer` (README) works though the package loads it only on first use."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys, pixart; assert 'torch' not in sys.modules; "
         "from pixart import PixArtTransformer; print(PixArtTransformer.__module__, 'torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pixart.model.transformer", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import pixart

        pixart.nope  # noqa: B018
