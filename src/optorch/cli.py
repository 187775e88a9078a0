"""The ``optorch`` command: ``optorch demo`` and ``optorch bench``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["main", "output_folder"]


def output_folder(path: str | os.PathLike[str]) -> Path:
    """``--out`` made (with its parents) and checked writable before any work starts;
    ``ValueError`` naming it otherwise (a file in the way, no permission, ...)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"Invalid --out: {str(folder)!r} ({exc.strerror or exc})") from None
    return folder


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line on stderr (exit 2), as every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="optorch",
        description="Purely functional optimizers for PyTorch: demo and benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    from optorch import bench, demo

    subcommands = {
        "demo": commands.add_parser("demo", help=demo.HELP, description=demo.DESCRIPTION),
        "bench": commands.add_parser("bench", help=bench.HELP, description=bench.DESCRIPTION),
    }
    demo.add_arguments(subcommands["demo"])
    bench.add_arguments(subcommands["bench"])
    words = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(words)
    if unknown:  # named by the command they were given to (or to optorch, before it)
        before = words[: words.index(args.command)] if args.command in words else words
        owner = parser if any(word in before for word in unknown) else subcommands[args.command]
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    runner = demo.run if args.command == "demo" else bench.run
    try:
        return int(runner(args) or 0)
    except (ValueError, OSError, TypeError) as exc:
        # OSError: a file or folder the run reads or writes (FileNotFoundError included)
        print(f"optorch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
