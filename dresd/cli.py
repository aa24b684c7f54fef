"""The ``dresd`` command.

Runtime commands live in ``dresd.commands``; the builder's commands (build, update, compact,
generate-corpus) are registered by the ``pipelines`` package through the ``dresd.commands``
entry-point group, so the runtime never imports the pipelines.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
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
    parser.add_argument("--debug", action="store_true",
                        help="on an error, the full traceback (also DRESD_DEBUG=1); without it an "
                        "error is one line naming the cause")
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


# Loggers whose records are this project's own; any other library's error record that carries
# a traceback is the same failure the command reports in its last line, so it is dropped.
_OWN_LOGGERS = ("dresd", "pipelines", "schemas", "benchmarks", "__main__")


class _DropLibraryTracebacks(logging.Filter):
    """Without --debug: a library's error record that carries a traceback (Beam's and Dask's
    report of the failure this command ends with) is dropped, as is Beam's import-time note
    that its GCP client is not installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in _OWN_LOGGERS
        if record.exc_info and not own and record.levelno >= logging.ERROR:
            return False
        return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


class _OneLineFormatter(logging.Formatter):
    """Without --debug: a record's first line, no traceback (the record itself is left as it
    is for any other handler)."""

    def format(self, record: logging.LogRecord) -> str:
        record = copy.copy(record)
        record.exc_info = record.exc_text = record.stack_info = None
        text = super().format(record)
        return text.splitlines()[0] if text.strip() else text


def debugging(args=None) -> bool:
    """Whether errors show their traceback: ``--debug`` or DRESD_DEBUG=1."""
    return bool(getattr(args, "debug", False)) or os.environ.get("DRESD_DEBUG", "") not in (
        "", "0")


def _configure_logging(args) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # Beam's notes on import about cloud clients it does not find
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
    if not debugging(args):
        for handler in logging.getLogger().handlers:
            handler.addFilter(_DropLibraryTracebacks())
            handler.setFormatter(_OneLineFormatter(handler.formatter._fmt if handler.formatter
                                                   else None))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _configure_logging(args)
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
    except KeyboardInterrupt:
        print(f"dresd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debugging(args):
            raise
        known = isinstance(e, (ValueError, OSError, RuntimeError))
        hint = "" if known else f" ({type(e).__name__}; rerun with --debug for the traceback)"
        print(f"dresd {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
