"""The ``optorch`` command: ``optorch demo`` and ``optorch bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="optorch",
        description="Purely functional optimizers for PyTorch: demo and benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    from optorch import bench, demo

    demo.add_arguments(commands.add_parser("demo", help=demo.HELP, description=demo.DESCRIPTION))
    bench.add_arguments(
        commands.add_parser("bench", help=bench.HELP, description=bench.DESCRIPTION)
    )
    args = parser.parse_args(argv)
    runner = demo.run if args.command == "demo" else bench.run
    try:
        return int(runner(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"optorch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
