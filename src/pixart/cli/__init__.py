"""The `pixart` command: a thin shell over the library. Each subcommand lives in its own module here.

Every public module of this package is a subcommand: it defines ``register(subparsers)``, which adds
its parser and sets ``func`` to a function taking the parsed arguments and returning an exit code.
Adding a command is adding a module; nothing here lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
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
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"pixart.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
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
