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


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dresd", description="Dense-retrieval speculative decoding: build stores, decode."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from dresd import commands

    commands.register(sub)
    for ep in entry_points(group="dresd.commands"):
        ep.load()(sub)
    return parser


# pipelines.options maps --runner=DaskRunner to the builder's fixed DaskRunner, whose options
# (--dask_client_address, ...) are those of Beam's.
_RUNNER_MODULES = {"DaskRunner": "apache_beam.runners.dask.dask_runner"}


def unknown_beam_options(extra: list[str]) -> list[str]:
    """The arguments among ``extra`` that no Beam pipeline options class knows (a misspelled
    dresd option such as ``--dimm`` included). A runner named by its module path
    (``--runner=apache_beam.runners.dask.dask_runner.DaskRunner``) is imported first, so its
    own options (``--dask_client_address``) are known."""
    import importlib

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # Beam logs warnings about cloud clients on import
    try:
        from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser
    finally:
        root.setLevel(level)

    for i, a in enumerate(extra):
        runner = a.split("=", 1)[1] if a.startswith("--runner=") else (
            extra[i + 1] if a == "--runner" and i + 1 < len(extra) else "")
        # Short names whose options live in a module Beam does not import by itself.
        module = _RUNNER_MODULES.get(runner) or (runner.rsplit(".", 1)[0] if "." in runner
                                                 else "")
        if module:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    parser = _BeamArgumentParser(allow_abbrev=False)
    seen = set()
    for cls in PipelineOptions.__subclasses__():
        if str(cls) not in seen:
            seen.add(str(cls))
            cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(extra)
    return unknown


def _one_line(e: BaseException) -> str:
    """The first line of an error (a runner may append a traceback to the message)."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return text.splitlines()[0]


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
        unknown = unknown_beam_options(extra) if extra else []
        if unknown:
            print(f"dresd {args.command}: error: unrecognized arguments: {' '.join(unknown)} "
                  f"(neither an option of this command nor a Beam pipeline option; see dresd "
                  f"{args.command} --help)", file=sys.stderr)
            return 2
        args.extra = extra  # Beam pipeline options pass through untouched
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"dresd {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dresd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
