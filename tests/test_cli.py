"""Command-line mistakes argparse catches end like our own errors: one line naming the command, exit 2."""

import argparse
import subprocess
import sys

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
        (["export", "openvino", "OUT"], see("pixart export openvino", "the following arguments are required: --model")),
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
