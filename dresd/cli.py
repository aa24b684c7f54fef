"""The ``dresd`` command.

Runtime commands live in ``dresd.commands``; the builder's commands (build, update, compact,
generate-corpus) are registered by the ``pipelines`` package through the ``dresd.commands``
entry-point group, so the runtime never imports the pipelines.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dresd", description="Dense-retrieval speculative decoding: build stores, decode."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from dresd import commands

    commands.register(sub)
    for ep in entry_points(group="dresd.commands"):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "accepts_extra", False):
        args.extra = extra  # Beam pipeline options pass through untouched
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dresd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
