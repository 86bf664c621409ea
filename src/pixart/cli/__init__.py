"""The `pixart` command: a thin shell over the library. Each subcommand lives in its own module here.

Every public module of this package is a subcommand: it defines ``register(subparsers)``, which adds
its parser and sets ``func`` to a function taking the parsed arguments and returning an exit code.
Adding a command is adding a module; nothing here lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from pixart import __version__
from pixart.errors import PixArtError


class OneLineErrorParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line, like PixArtError's, instead of the usage block plus a line.

    ``add_subparsers`` makes subcommand parsers of the parent's class, so every subcommand and
    sub-subcommand (``pixart export openvino``) inherits this; ``--help`` is unchanged.
    """

    def error(self, message: str) -> NoReturn:
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's, but blames unrecognized arguments on the subcommand they were given to, not on `pixart`."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.chosen_parser(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def chosen_parser(self, namespace: argparse.Namespace) -> OneLineErrorParser:
        """The innermost subcommand parser that ``namespace`` selected (this one if none was)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None))
                if isinstance(chosen, OneLineErrorParser):
                    return chosen.chosen_parser(namespace)
        return self


def command_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="pixart",
        description="PixArt-α / PixArt-Σ text-to-image: generate, convert, train and serve.",
    )
    parser.add_argument("--version", action="version", version=f"pixart {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show debug logs and libraries' logs, warnings and progress bars",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"pixart.cli.{name}").register(subparsers)
    return parser


QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TORCH_LOGS": "-all",
    "WANDB_SILENT": "true",
}
"""The libraries' own logging switches as environment variables, which each reads when imported: errors only
(TORCH_LOGS "-all" covers dynamo's graph-break warnings under --compile; WANDB_SILENT hides W&B's banner and run
summary under --log wandb)."""


def quiet_libraries(verbose: bool) -> None:
    """Show pixart's own log lines and progress bars, and the libraries' chatter only with ``-v``.

    Called once the command line is parsed, before the command imports any library: every switch here is
    one the library reads later (environment variables, huggingface_hub's progress-bar state, which
    transformers copies when imported), so ``--help`` stays fast. Libraries that log through the root logger
    (accelerate, huggingface_hub, ...) show only errors. NNCF has no such switch: pixart.inference.openvino
    quietens it where it imports it. Without ``-v`` Python warnings are ignored: pixart reports through
    logging, so every warning (TracerWarning, FutureWarning, ...) comes from a library.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not verbose:
        handler.addFilter(lambda record: record.name.split(".")[0] == "pixart" or record.levelno >= logging.ERROR)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("httpx", "httpcore", "urllib3", "PIL", "matplotlib"):  # their debug lines would bury ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)  # a value the user set wins
    warnings.simplefilter("ignore")
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    disable_progress_bars()  # transformers' bars ("Loading weights", "Writing model shards") follow this one
    enable_progress_bars("huggingface_hub")  # but downloads keep theirs: a 20 GB fetch needs one


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PixArtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
